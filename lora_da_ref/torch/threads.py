"""One BLAS/LAPACK thread for the per-layer solves, so that layers can be solved side by side.

The solves of Algorithm 1 (steps 2–5) are dense factorisations, triangular solves and
eigen-solves of d × d float64 matrices, d the layer width. At LLaMA-like widths up to a few
thousand, a threaded BLAS barely speeds up one of them, while solving several layers at once,
one thread each, scales with the cores (one SmolLM2 decoder layer's solves: 16.5 s on 2 threads,
15.7 s on 1; the tiny-LLaMA benchmark: ``docs/numerics.md``, "Cost"). One thread
per solve also makes the factors independent of how many solve side by side: a threaded BLAS
rounds differently for different thread counts.

:func:`one_blas_thread` limits torch's intra-op threads and, through ``threadpoolctl``, the
BLAS of NumPy/SciPy (SciPy's ``syevr`` in the ``eigh`` solver, ``syrk`` in
:mod:`lora_da_ref.torch.blas`) to one thread inside the block and restores both afterwards. Both
settings are process-wide.

:func:`one_scipy_blas_thread` limits only NumPy/SciPy's BLAS, for one group solved at a time on
torch's threads: the solves alternate short torch calls (OpenMP pool) with short SciPy calls
(OpenBLAS's own pool), and on 2 cores the two pools' waiting threads slow each other down. The
benchmark's 56 layers, one worker (official preset, Algorithm 1 only): 9.4 s with both pools on
2 threads, 4.0 s with SciPy's on one; default config 10.3 → 6.1 s. At d = 4096 one long SciPy
call gains from its threads (``syevr`` + ``syrk``: 6.2 s on one, 3.2 s on two), so
:func:`lora_da_ref.torch.pipeline.solve_layers` limits it only up to that width.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

__all__ = ["one_blas_thread", "one_scipy_blas_thread"]


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


@contextmanager
def one_scipy_blas_thread() -> Iterator[None]:
    """NumPy/SciPy's BLAS/LAPACK on one thread inside the block; torch's threads untouched."""
    with threadpool_limits(1, user_api="blas"):
        yield
