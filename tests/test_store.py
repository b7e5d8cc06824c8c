"""Resumable statistics (lora_da_ref.torch.store): an interrupted init resumes to bit-identical
factors without re-running the saved passes; a directory of other inputs is refused."""

from __future__ import annotations

import pytest
import torch

from lora_da_ref.torch import LoraDAConfig, init_lora_da
from tests.torch_cases import llama_batches, single_thread, tiny_llama  # noqa: F401


class _Stop(Exception):
    pass


def _counting_loss(calls: list, stop_after: int | None = None):
    def loss_fn(model, batch):
        calls.append(1)
        if stop_after is not None and len(calls) > stop_after:
            raise _Stop("interrupted")
        return model(**batch).loss

    return loss_fn


@pytest.mark.parametrize("diagnostics", ["cheap", "off"])
def test_interrupted_init_resumes_to_bit_identical_factors(tmp_path, diagnostics):
    model = tiny_llama()
    batches = llama_batches()
    config = LoraDAConfig(rank=2, layers_per_pass=1, diagnostics=diagnostics)  # two passes
    reference = init_lora_da(model, batches, config, progress=False)
    calls: list = []
    with pytest.raises(_Stop):  # killed during the second pass
        init_lora_da(
            model, batches, config, loss_fn=_counting_loss(calls, len(batches) + 1),
            progress=False, statistics_dir=tmp_path,
        )  # fmt: skip
    assert (tmp_path / "pass_0.safetensors").is_file()
    assert not (tmp_path / "pass_1.safetensors").exists()
    with pytest.raises(ValueError, match="already holds saved statistics"):
        init_lora_da(model, batches, config, progress=False, statistics_dir=tmp_path)
    calls.clear()
    resumed = init_lora_da(
        model, batches, config, loss_fn=_counting_loss(calls), progress=False,
        statistics_dir=tmp_path, resume=True,
    )  # fmt: skip
    assert len(calls) == len(batches)  # only the missing pass ran
    for name, f in reference.items():
        assert torch.equal(f.A, resumed[name].A) and torch.equal(f.B, resumed[name].B), name
        for key in ("calibration_snr", "precision_bound", "damping", "cond"):
            assert f.diagnostics.get(key) == resumed[name].diagnostics.get(key), (name, key)
    calls.clear()
    again = init_lora_da(  # everything saved: no pass at all
        model, batches, config, loss_fn=_counting_loss(calls), progress=False,
        statistics_dir=tmp_path, resume=True,
    )  # fmt: skip
    assert not calls and all(torch.equal(again[n].A, reference[n].A) for n in reference)


def test_resume_refuses_statistics_of_other_inputs(tmp_path):
    model = tiny_llama()
    batches = llama_batches()
    config = LoraDAConfig(rank=2)
    init_lora_da(model, batches, config, progress=False, statistics_dir=tmp_path)
    with pytest.raises(ValueError, match="the calibration data"):
        init_lora_da(
            model, batches[:2], config, progress=False, statistics_dir=tmp_path, resume=True
        )
    with pytest.raises(ValueError, match="the statistics settings"):
        init_lora_da(
            model, batches, config.replace(token_mask="labels"), progress=False,
            statistics_dir=tmp_path, resume=True,
        )  # fmt: skip
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    with pytest.raises(ValueError, match="the model's weights"):
        init_lora_da(other, batches, config, progress=False, statistics_dir=tmp_path, resume=True)
    # the solve-only settings do not matter: a new rank resumes from the same statistics
    init_lora_da(model, batches, config.replace(rank=3), progress=False, statistics_dir=tmp_path,
                 resume=True)  # fmt: skip


def test_cli_resume_gives_the_same_adapter_and_report_full_needs_no_pass(tmp_path):
    """lora-da init --save-statistics, a run cut after its first pass (the second pass's file
    and manifest entry removed), --resume: the same adapter bit for bit. lora-da report --full
    then adds the split-half and probe diagnostics from the saved statistics."""
    import json

    from lora_da_ref.cli.main import main
    from lora_da_ref.data import TINY_TEXTS
    from lora_da_ref.torch.store import MANIFEST

    root = tmp_path
    assert main(["make-tiny-model", str(root / "model"), "--layers", "2"]) == 0
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXTS))
    base = ["init", "--model", str(root / "model"), "--data", str(data), "--rank", "2",
            "--max-length", "32", "--no-progress", "--layers-per-pass", "1"]  # fmt: skip
    stats = root / "stats"
    assert main([*base, "--out", str(root / "a"), "--save-statistics", str(stats)]) == 0
    manifest = json.loads((stats / MANIFEST).read_text())
    assert sorted(manifest["passes"]) == ["0", "1"]
    (stats / "pass_1.safetensors").unlink()  # as if killed during the second pass
    del manifest["passes"]["1"]
    (stats / MANIFEST).write_text(json.dumps(manifest))
    assert main([*base, "--out", str(root / "b"), "--resume", str(stats)]) == 0
    from safetensors.torch import load_file

    a = load_file(root / "a" / "adapter_model.safetensors")
    b = load_file(root / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    main(["report", str(root / "b"), "--full", "--no-figure"])
    layers = json.loads((root / "b" / "lora_da.json").read_text())["layers"]
    assert all("split_angle_max" in d and "precision_probe" in d for d in layers.values())


def test_one_progress_bar_covers_every_pass_and_the_solves(monkeypatch):
    """progress=True shows ONE bar, planned before any work (every pass's batches, every
    layer's predicted solve), which sees each batch of each pass and each layer's solve exactly
    once (not one bar per stage restarting at 0 %); its stages name the pass plan. Catches a
    per-pass bar, a bar without the solves, a double count."""
    from lora_da_ref.torch import pipeline

    bars = []

    class Recorder(pipeline.RunProgress):
        @classmethod
        def for_init(cls, positions, passes, solve_seconds, enabled=True):
            bar = super().for_init(positions, passes, solve_seconds, enabled=False)
            bar.plan, bar.steps, bar.solves, bar.stages = (
                (positions, passes, solve_seconds),
                0,
                [],
                [],
            )
            bars.append(bar)
            return bar

        def stage(self, text):
            self.stages.append(text)

        def step(self, n=1):
            self.steps += n
            super().step(n)

        def solved(self, names, *, here=True):
            self.solves += list(names)
            super().solved(names, here=here)

    monkeypatch.setattr(pipeline, "RunProgress", Recorder)
    model, batches = tiny_llama(), llama_batches()
    factors = init_lora_da(model, batches, LoraDAConfig(rank=2, layers_per_pass=1), progress=True)
    assert len(bars) == 1
    (bar,) = bars
    positions, passes, predicted = bar.plan
    assert passes == 2 and len(positions) == len(batches) and bar.steps == 2 * len(batches)
    assert sorted(bar.solves) == sorted(factors) == sorted(predicted)
    assert min(predicted.values()) > 0 and bar.remaining_seconds() == 0
    assert bar.stages[0] == "statistics, pass 1/2 (1 layers)" and "solves, pass 2/2" in bar.stages
