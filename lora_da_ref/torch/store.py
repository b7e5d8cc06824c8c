"""Resumable statistics: each pass's reduced statistics saved to a directory as it completes.

A LoRA-DA init on a real model is hours of statistics passes and seconds of solves. With a
:class:`StatisticsStore` the pipeline (:func:`lora_da_ref.torch.pipeline.run_pipeline`) writes
each pass's :class:`~lora_da_ref.torch.statistics.KFACStatistics` (the normalised statistics
the solves read, float64 sums divided by their counts) once the pass completes, and on a later
run reads every pass already there instead of running it again: an interrupted init continues
where it stopped and gives bit-identical factors (the same float64 statistics, the same
solves). The saved statistics also let the full diagnostics be computed later
(``lora-da report --full``) without a new pass.

Layout of the directory: ``manifest.json`` (the run's key and the passes saved) and one
``pass_<i>.safetensors`` per pass (the tensors; the counts and the input groups in its
metadata). Every file is written to a temporary name and renamed, so a run killed while saving
leaves the previous state. The **key** fixes what the statistics depend on: the settings of
the pass (token mask, label shift, score scale, gradient weight, output factor, dtype,
whether the split-half sums are kept), the target names and shapes, a fingerprint of each
target's base weight and a SHA-256 of the calibration batches. A directory written for another
key is refused with the field that differs, never silently reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lora_da_ref.torch.adapter import weight_fingerprint
from lora_da_ref.torch.config import LoraDAConfig, StatisticsConfig, statistics_config_of
from lora_da_ref.torch.statistics import Batch, KFACStatistics

__all__ = ["MANIFEST", "StatisticsStore", "saved_passes", "statistics_key"]

MANIFEST = "manifest.json"
FORMAT = 1
# StatisticsConfig fields the values of a pass depend on (the pass plan's fields decide only
# which layers share a pass; the rounding measurement adds a record, not a change).
PASS_FIELDS = (
    "token_mask", "label_shift", "score_scale", "gradient_weight", "output_factor", "dtype",
)  # fmt: skip


def statistics_key(
    config: StatisticsConfig | LoraDAConfig,
    targets: Mapping[str, nn.Linear],
    batches: Iterable[Batch],
) -> dict[str, Any]:
    """What a pass's statistics depend on (module docstring), as JSON-ready values."""
    config = statistics_config_of(config)
    settings = {f: str(getattr(config, f)) for f in PASS_FIELDS}
    settings["split_sums"] = config.split_halves  # the key's name in saved manifests
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            value = batch[name]
            if isinstance(value, Tensor):
                digest.update(name.encode())
                digest.update(str(tuple(value.shape)).encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return {
        "format": FORMAT,
        "settings": settings,
        "targets": {n: [m.in_features, m.out_features] for n, m in targets.items()},
        "weights": {n: weight_fingerprint(m.weight) for n, m in targets.items()},
        "data_sha256": digest.hexdigest(),
    }


class StatisticsStore:
    """A directory of per-pass statistics for one key (module docstring).

    Args:
        directory: where the passes live; created if missing.
        key: :func:`statistics_key` of this run.
        resume: read the passes already saved (their key must equal ``key``); ``False`` starts
            afresh and refuses a directory that already holds saved passes.
    """

    def __init__(self, directory: str | os.PathLike[str], key: Mapping[str, Any], *, resume: bool):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"statistics directory {self.directory} is a file, not a directory")
        self.key = json.loads(json.dumps(key))  # as it reads back from the manifest
        self.passes: dict[str, list[str]] = {}
        manifest = self.directory / MANIFEST
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if not resume:
                raise ValueError(
                    f"{self.directory} already holds saved statistics ({len(saved['passes'])} "
                    "pass(es)): resume from it (lora-da init --resume DIR) or choose a new one"
                )
            _check_key(saved["key"], self.key, self.directory)
            self.passes = {str(i): list(names) for i, names in saved["passes"].items()}

    def load(self, index: int, names: list[str]) -> KFACStatistics | None:
        """The saved statistics of pass ``index`` over ``names``, or ``None`` if not saved."""
        saved = self.passes.get(str(index))
        if saved is None:
            return None
        if saved != list(names):
            raise ValueError(
                f"{self.directory}: pass {index} was saved for other layers (a different pass "
                "plan: keep max_statistics_bytes and layers_per_pass as in the first run)"
            )
        from safetensors.torch import safe_open

        path = self.directory / f"pass_{index}.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["statistics"])
            fields: dict[str, Any] = {}
            for f in dataclasses.fields(KFACStatistics):
                if f.name in meta["tensors"]:
                    fields[f.name] = {
                        n: fh.get_tensor(f"{f.name}/{n}") for n in meta["tensors"][f.name]
                    }
                elif f.name in meta["values"]:
                    fields[f.name] = meta["values"][f.name]
                elif f.name == "dtype":  # saved before the statistics recorded it: the key's
                    fields[f.name] = str(self.key["settings"]["dtype"]).removeprefix("torch.")
        fields["split_weights"] = tuple(fields["split_weights"])
        return KFACStatistics(**fields)

    def save(self, index: int, names: list[str], stats: KFACStatistics) -> None:
        """Write pass ``index`` (atomically), then the manifest that lists it."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"tensors": {}, "values": {}}
        for f in dataclasses.fields(KFACStatistics):
            value = getattr(stats, f.name)
            if isinstance(value, dict) and all(isinstance(v, Tensor) for v in value.values()):
                meta["tensors"][f.name] = list(value)
                for n, t in value.items():
                    tensors[f"{f.name}/{n}"] = t.detach().cpu().contiguous()
            else:
                meta["values"][f.name] = value
        path = self.directory / f"pass_{index}.safetensors"
        save_file(tensors, str(path) + ".tmp", metadata={"statistics": json.dumps(meta)})
        os.replace(str(path) + ".tmp", path)
        self.passes[str(index)] = list(names)
        manifest = {"key": self.key, "passes": self.passes}
        tmp = self.directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.directory / MANIFEST)


def saved_passes(directory: str | os.PathLike[str]) -> list[tuple[list[str], KFACStatistics]]:
    """Every pass saved in ``directory`` (its layers and statistics), in pass order, without a
    key to check (the caller vouches for the inputs, e.g. the adapter that recorded it)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{directory}: no {MANIFEST} (not a statistics directory)")
    saved = json.loads(path.read_text())
    store = StatisticsStore(directory, saved["key"], resume=True)
    return [(names, store.load(int(i), names)) for i, names in sorted(
        store.passes.items(), key=lambda kv: int(kv[0]))]  # fmt: skip


def _check_key(saved: Mapping[str, Any], wanted: Mapping[str, Any], directory: Path) -> None:
    for field in ("format", "settings", "targets", "weights", "data_sha256"):
        if saved.get(field) != wanted.get(field):
            what = {
                "format": "the file format",
                "settings": "the statistics settings",
                "targets": "the target layers",
                "weights": "the model's weights",
                "data_sha256": "the calibration data",
            }[field]
            raise ValueError(
                f"{directory}: the saved statistics were computed for other inputs ({what} "
                "differ); resume only with the same model, data and statistics settings"
            )
