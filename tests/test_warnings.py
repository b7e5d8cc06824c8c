"""Warnings point at the user's line, whatever the depth of the package call that raised them
(a fixed ``stacklevel`` lands on a package line for some entry points: Python then prints that
line, e.g. ``return run_pipeline(``, under the message)."""

from __future__ import annotations

import sys
import warnings

import torch

from lora_da_ref.torch import LoraFactors
from lora_da_ref.torch.pipeline import warn_untrusted


def _untrusted() -> dict[str, LoraFactors]:
    info = {"precision_bound": 0.5, "statistics_dtype": "float32"}
    return {"x": LoraFactors(torch.zeros(2, 1), torch.zeros(1, 2), torch.zeros(1), info)}


def test_a_warning_names_the_callers_file_at_any_depth():
    for depth in (0, 3):  # called directly, and through three more package-free frames

        def call(k: int) -> None:
            if k:
                call(k - 1)
            else:
                warn_untrusted(_untrusted())

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(depth)
        assert len(caught) == 1
        assert caught[0].filename == __file__, caught[0].filename


def test_an_init_warns_at_the_users_call(monkeypatch):
    """Through ``init_lora_da`` the precision warning is two package frames deeper than when
    ``warn_untrusted`` is called directly: it still names this file (a fixed stacklevel named
    ``lora_da_ref/torch/init.py`` and printed its ``return run_pipeline(``)."""
    from lora_da_ref.torch import LoraDAConfig, init_lora_da, pipeline
    from tests.torch_cases import LLAMA_TARGETS, llama_batches, tiny_llama

    monkeypatch.setattr(pipeline, "untrusted_layers", lambda factors: dict.fromkeys(factors, 0.5))
    config = LoraDAConfig(rank=2, target_modules=LLAMA_TARGETS, diagnostics="off")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init_lora_da(tiny_llama(), llama_batches(n_batches=1), config, progress=False)
    mine = [w for w in caught if "may rotate their A0" in str(w.message)]
    assert len(mine) == 1 and mine[0].filename == __file__, [w.filename for w in caught]


def test_the_command_line_prints_no_source_line(capsys):
    from lora_da_ref.cli.main import _warnings_in_flag_names

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # Python's own display (pytest's replaces it): the formatted warning to stderr
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line)
        )
        with _warnings_in_flag_names():
            warn_untrusted(_untrusted())
    err = capsys.readouterr().err
    assert err.startswith("lora-da: RuntimeWarning: LoRA-DA: the precision check could not clear 1")
    assert "--dtype float64" in err and "warn_untrusted" not in err
    assert len(err.strip().splitlines()) == 1  # the message only: no file, line or source line
