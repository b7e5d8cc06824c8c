"""One BLAS/LAPACK thread for the per-layer solves, so that layers can be solved side by side.

The solves of Algorithm 1 (steps 2–5) are dense factorisations, triangular solves and
eigen-solves of d × d float64 matrices, d the layer width. At LLaMA-like widths up to a few
thousand, a threaded BLAS barely speeds up one of them, while solving several layers at once,
one thread each, scales with the cores (one SmolLM2 decoder layer's solves: 16.5 s on 2 threads,
15.7 s on 1; the tiny-LLaMA benchmark: ``docs/numerics.md``, "Cost"). One thread
per solve also makes the factors independent of how many solve side by side: a threaded BLAS
rounds differently for different thread counts.

:func:`one_blas_thread` limits torch's intra-op threads and, through ``threadpoolctl``, the
BLAS of NumPy/SciPy (SciPy's ``syevr`` in the ``eigh`` solver) to one thread inside the block
and restores both afterwards. Both settings are process-wide.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

__all__ = ["one_blas_thread"]


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """torch and NumPy/SciPy's BLAS/LAPACK on one thread inside the block (process-wide)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)
