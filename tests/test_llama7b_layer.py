"""benchmarks/llama7b_layer.py (one LLaMA-2-7B layer, part by part) and benchmarks/gpu_check.py:
the quick run end to end, its extrapolation recomputed from its own parts, resuming, and the GPU
check's behaviour without a GPU (no timing assertions: timings live in the benchmark)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SOLVERS = ("eigh", "official_lobpcg", "certified")
QUICK = {"hidden": 64, "intermediate": 176, "sequences": 2, "length": 16}
REL = 1e-3  # the JSON keeps 5 significant digits


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run of every part into a fresh file: (its JSON, its stdout lines)."""
    out = tmp_path_factory.mktemp("llama7b") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "llama7b_layer.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # no thread oversubscription on shared CI
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(out.read_text()), lines, out


def _numbers(tree, key=""):
    """(key, value) of every number in a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, k)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v, key)
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield key, tree


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-300)


def test_quick_run_records_every_part_with_finite_times_and_exact_eigh(quick_run):
    """Every part is in the file and was printed; every number is finite; the tokens are the
    sequences × length measured; eigh's subspace is at angle 0 to itself on every Ω; the
    official LOBPCG ran its 10 iterations and its products were counted. Catches a part that is
    not written (or written with NaN/inf from a 0/0), an angle taken against the wrong vectors,
    or a solver call that silently ignored the official options."""
    data, lines, _ = quick_run
    parts = data["parts"]
    assert set(parts) == {"statistics", "fisher", "eigen", "extrapolate"}
    assert [line["part"] for line in lines] == ["statistics", "fisher", "eigen", "extrapolate"]
    for key, value in _numbers(parts):
        assert math.isfinite(value), (key, value)
    stats = parts["statistics"]
    assert (
        stats["tokens"]
        == QUICK["sequences"] * QUICK["length"]
        == stats["tokens_counted_by_the_pass"]
    )
    assert all(v > 0 for v in stats["seconds"].values())
    assert set(parts["fisher"]["projections"]) == set(PROJECTIONS)
    cached = {p for p, r in parts["fisher"]["projections"].items() if r["z_factor_cached"]}
    assert cached == {"k_proj", "v_proj", "up_proj"}  # the pipeline's shared Z factors
    cases = [*parts["eigen"]["real"].values()]
    cases += [v for k, v in parts["eigen"]["smollm2_spectra"].items() if k.isdigit()]
    assert {c["d"] for c in parts["eigen"]["real"].values()} == {64, 176}
    assert len(cases) == 4  # real Ω and SmolLM2-like Ω at both widths
    for case in cases:
        assert case["eigh"]["angle_to_eigh"] < 1e-12
        assert case["official_lobpcg"]["iterations"] == 10
        assert 0 <= case["official_lobpcg"]["angle_to_eigh"] <= math.pi / 2
        if "seconds" in case.get("certified", {}):
            assert case["certified"]["angle_to_eigh"] <= 1e-3  # certified, or eigh after all
    for case in parts["eigen"]["real"].values():
        counted = case["official_lobpcg"]["omega_products"]
        assert counted["reads"] == 22 and counted["matvecs"] > 8 * 10


def test_extrapolation_is_the_parts_arithmetic(quick_run):
    """The whole-model figures recomputed here from the parts' own numbers: per token per layer
    = (2-layer − 1-layer seconds) / tokens; ours = that × calibration tokens × 32 layers + 32 ×
    Σ_projections (Fisher + ΔW + Ω + the eigen-solve at its d_in); the official code = 5 passes
    (statistics + 4 plain passes per token per layer) + its LOBPCG; and the H100 figures from the
    flop model. Catches a units slip (per sequence for per token, seconds of the 2-layer model for
    the marginal layer), a wrong layer or pass count, a solver's time taken at the wrong width,
    and an on-paper rate or flop count that differs from the one the docstring states."""
    data, _, _ = quick_run
    parts = data["parts"]
    stats, fisher, eigen, ext = (parts[k] for k in ("statistics", "fisher", "eigen", "extrapolate"))
    sec, tokens = stats["seconds"], stats["tokens"]
    ptl, plain = stats["statistics_per_token_per_layer_s"], stats["plain_per_token_per_layer_s"]
    for per_token, kind in ((ptl, "statistics"), (plain, "plain")):
        two, one = sec[f"{kind}_two_layers"], sec[f"{kind}_one_layer"]
        # the difference of two 5-digit numbers: to their rounding, not relative to itself
        assert abs(per_token * tokens - (two - one)) <= 1e-4 * (two + one), kind
    calib = 256 * 512
    assert ext["tokens"] == calib and ext["model_layers"] == 32 and ext["solves"] == 224
    h, m = QUICK["hidden"], QUICK["intermediate"]
    d_in = {p: (m if p == "down_proj" else h) for p in PROJECTIONS}
    fisher_layer = sum(fisher["projections"][p]["total_s"] for p in PROJECTIONS)

    def solves(solver):
        eigen_layer = sum(eigen["real"][str(d_in[p])][solver]["seconds"] for p in PROJECTIONS)
        return 32 * (fisher_layer + eigen_layer)

    official = ext["measured"]["official"]
    assert official["passes"] == 5
    assert _close(official["statistics_s"], calib * 32 * (ptl + 4 * plain))
    assert _close(official["solves_s"], solves("official_lobpcg"))
    for solver in SOLVERS:
        ours = ext["measured"]["ours"][solver]
        if "skipped" in ours:
            assert "seconds" not in eigen["real"][str(h)].get(solver, {})
            continue
        assert _close(ours["statistics_s"], ptl * calib * 32)
        assert _close(ours["solves_s"], solves(solver))
        total = ptl * calib * 32 + solves(solver)
        assert _close(ours["over_official"], total / official["total_s"])
    paper = ext["h100_on_paper"]
    P = 4 * h * h + 3 * h * m
    assert paper["flop_model_per_token_per_layer"]["projection_weights"] == P
    assert _close(paper["plain_pass_per_layer_s"], calib * (6 * P + 6 * 512 * h) / 989e12)
    for d in (h, m):
        assert _close(paper["eigen_per_solve_s"]["eigh"][str(d)], 9 * d**3 / 67e12)
        counted = eigen["real"][str(d)]["official_lobpcg"]["omega_products"]
        lobpcg = max(counted["matvecs"] * 2 * d * d / 67e12, counted["reads"] * 8 * d * d / 3.35e12)
        assert _close(paper["eigen_per_solve_s"]["official_lobpcg"][str(d)], lobpcg)
    stats_layer = paper["statistics_per_layer_s"]
    assert _close(
        paper["official"]["statistics_s"],
        32 * (stats_layer + 4 * paper["plain_pass_per_layer_s"]),
    )


def test_resume_skips_finished_parts_and_redo_measures_again(quick_run, tmp_path, monkeypatch):
    """A rerun on a file with every part measures nothing again (the measuring parts are
    replaced by functions that fail if called) and keeps their records byte for byte, while the
    extrapolation, arithmetic only, is redone; ``--redo PART`` measures that part again and only
    it; a file measured with other settings is refused instead of mixed. Catches a resume that
    re-measures (hours at full size) or drops finished parts, and one that mixes shapes."""
    _, _, source = quick_run
    path = tmp_path / "resume.json"
    shutil.copy(source, path)
    before = json.loads(path.read_text())["parts"]
    bench = _module("llama7b_layer")

    def measured_again(run):
        raise AssertionError("a finished part was measured again")

    for part in ("statistics", "fisher", "eigen"):
        monkeypatch.setitem(bench.PART_FUNCTIONS, part, measured_again)
    assert bench.main(["--quick", "--out", str(path)]) == 0
    after = json.loads(path.read_text())["parts"]
    for part in ("statistics", "fisher", "eigen"):
        assert after[part] == before[part]
    assert after["extrapolate"]["measured_at"] != before["extrapolate"]["measured_at"]

    monkeypatch.setitem(bench.PART_FUNCTIONS, "fisher", lambda run: {"stub": 1})
    assert bench.main(["--quick", "--out", str(path), "--parts", "fisher", "--redo", "fisher"]) == 0
    redone = json.loads(path.read_text())["parts"]
    assert redone["fisher"]["stub"] == 1
    assert redone["statistics"] == before["statistics"] and redone["eigen"] == before["eigen"]

    with pytest.raises(SystemExit, match="other settings"):
        bench.main(["--quick", "--out", str(path), "--sequences", "3"])


def test_gpu_check_without_cuda_exits_0_with_the_message(tmp_path):
    """Without a CUDA device the GPU check says so plainly, exits 0 and writes nothing. Catches a
    script that fails (or writes a report of failed steps) on every machine without a GPU, as CI."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA device: nothing to run"
    assert not out.exists()


def test_gpu_check_commands_are_accepted_by_their_programs(tmp_path):
    """Every command the GPU run will start parses with its program's own parser, and the pytest
    marker it selects is registered. Catches a misspelt flag that would only show on the GPU,
    after the machine's start-up time is spent."""
    from lora_da_ref.cli.validate_args import build_parser

    check = _module("gpu_check")
    commands = check.steps(tmp_path)
    assert set(commands) == set(check.LIMITS_S)
    assert sum(check.LIMITS_S.values()) <= check.TOTAL_S < 600
    tests = commands["cuda_tests"]
    assert tests[tests.index("-m", 2) + 1] == "cuda"  # the marker after `python -m pytest`
    assert '"cuda: ' in (ROOT / "pyproject.toml").read_text()
    validate = build_parser().parse_args(commands["validate_smollm2"][3:])
    assert validate.case == ["smollm2"] and validate.device == "cuda" and validate.json
    layer = _module("llama7b_layer").parse_args(commands["llama7b_layer"][2:])
    assert layer.device == "cuda" and layer.parts == ["statistics", "fisher", "eigen"]
    assert not layer.quick


def test_gpu_check_writes_one_json_with_every_step(tmp_path, monkeypatch):
    """With a (pretended) GPU and stand-in commands, the one JSON holds every step's command,
    return code and time, the validation's JSON report, the layer benchmark's results file, and
    a step that outlives its limit is recorded (return code null) instead of ending the run.
    Catches a report assembled wrongly on the GPU, where no CPU test would ever see it."""
    check = _module("gpu_check")
    py = sys.executable
    fake = {}

    def steps(work):
        layer = str(work / check.LAYER_RESULTS)
        fake.setdefault("cuda_tests", [py, "-c", "print('3 passed')"])
        fake.setdefault("validate_smollm2", [py, "-c", "print('{\"layers\": 2}')"])
        fake.setdefault("llama7b_layer", [py, "-c", f"open({layer!r}, 'w').write('{{}}')"])
        return fake

    monkeypatch.setattr(check, "steps", steps)
    monkeypatch.setattr(check, "environment", lambda: {"gpu": "stand-in"})
    monkeypatch.setattr(check, "missing_smollm2_packages", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "gpu_check.json"
    assert check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"] == {"gpu": "stand-in"}
    steps = report["steps"]
    assert [steps[k]["returncode"] for k in fake] == [0, 0, 0]
    assert steps["validate_smollm2"]["report"] == {"layers": 2}
    assert steps["llama7b_layer"]["results"] == {}
    assert "3 passed" in steps["cuda_tests"]["stdout_tail"]
    assert all("_stdout" not in s for s in steps.values())

    fake["llama7b_layer"] = [py, "-c", "import time; time.sleep(30)"]
    monkeypatch.setitem(check.LIMITS_S, "llama7b_layer", 1)
    assert check.main(["--out", str(out)]) == 0
    stopped = json.loads(out.read_text())["steps"]["llama7b_layer"]
    assert stopped["returncode"] is None and "stopped after its limit" in stopped["stderr_tail"]
