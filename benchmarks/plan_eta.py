"""The plan's estimate and the progress bar's time left, against a measured SmolLM2 init.

Usage: python benchmarks/plan_eta.py [--problems 64 256] [--out F.json]

For each size it follows the README's recipe from the command line: ``lora-da real-model``,
``lora-da gsm8k-data --split fit --limit N``, then ``lora-da plan --json`` and ``lora-da init``
(default preset, progress on) as separate processes, each timed from outside, so the init's
time includes the interpreter's start and the imports, as a user's would. The init runs under a
recorder (this script with ``--record``: the command line's ``main`` with
:class:`~lora_da_ref.torch.progress.RunProgress` noting each estimate it shows), so afterwards
the true time left at every point is known. Reported:

* the plan's total over the measured init (goal: within ±25 %), and its parts;
* the bar's estimated over true time left (true: until the bar closes) at every update from
  10 % of the bar's run onward: min, median, max and the share within ±30 % (goal: all).

Timings: run it on a quiet machine (nothing else running). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["--prompt-field", "prompt", "--completion-field", "completion"]


def lora_da(*args: str, capture: bool = True) -> tuple[str, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "lora_da_ref", *args],
        cwd=ROOT, check=True, text=True, capture_output=capture,
    )  # fmt: skip
    return out.stdout if capture else "", time.perf_counter() - t0


def record(trace: str, argv: list[str]) -> int:
    """``lora-da`` with every estimate the bar shows noted in ``trace`` (JSON lines)."""
    from lora_da_ref.cli.main import main
    from lora_da_ref.torch import progress

    points: list[tuple[float, float | None]] = []
    show, close = progress.RunProgress._show, progress.RunProgress.close

    def noting_show(self: progress.RunProgress) -> None:
        points.append((time.perf_counter(), self.remaining_seconds()))
        show(self)

    def noting_close(self: progress.RunProgress) -> None:
        if self._work is not None:
            points.append((time.perf_counter(), 0.0))
            Path(trace).write_text("".join(json.dumps(p) + "\n" for p in points))
        close(self)

    progress.RunProgress._show = noting_show  # type: ignore[method-assign]
    progress.RunProgress.close = noting_close  # type: ignore[method-assign]
    return main(argv)


def eta_quality(points: list[list[float | None]]) -> dict:
    """Estimated over true time left at each update from 10 % of the bar's run on (true: until
    the bar closes), overall and per tenth of the run."""
    start, end = points[0][0], points[-1][0]
    rows = []  # (share of the run elapsed, ratio, seconds off)
    for t, est in points[:-1]:
        if t - start < 0.1 * (end - start) or est is None or end - t <= 0:
            continue
        rows.append(((t - start) / (end - start), est / (end - t), est - (end - t)))
    ratios = sorted(r for _, r, _ in rows)
    if not ratios:
        return {"bar_seconds": end - start, "updates_from_10pct": 0}
    tenths = {}
    for k in range(1, 10):
        part = [r for f, r, _ in rows if k / 10 <= f < (k + 1) / 10]
        if part:
            tenths[f"{k * 10}-{k * 10 + 10}%"] = [min(part), max(part)]
    return {
        "bar_seconds": end - start,
        "updates_from_10pct": len(rows),
        "ratio_min": ratios[0], "ratio_median": ratios[len(ratios) // 2], "ratio_max": ratios[-1],
        "share_within_30pct": sum(0.7 <= r <= 1.3 for r in ratios) / len(ratios),
        "largest_error_seconds": max((abs(e) for _, _, e in rows), default=0.0),
        "ratio_range_by_tenth": tenths,
    }  # fmt: skip


def run(problems: list[int], work: str | None = None) -> dict:
    model, t_model = lora_da("real-model")
    model = model.strip().splitlines()[-1]
    out: dict = {"model": model, "real_model_seconds": t_model, "threads": os.cpu_count()}
    if hasattr(os, "getloadavg"):
        out["load_average_1min_at_start"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = scratch if work is None else work
        os.makedirs(tmp, exist_ok=True)
        for n in problems:
            data = os.path.join(tmp, f"gsm8k_{n}.jsonl")
            lora_da("gsm8k-data", "--split", "fit", "--limit", str(n), "--out", data)
            flags = ["--model", model, "--data", data, *FIELDS]
            text, t_plan = lora_da("plan", *flags, "--json")
            plan = json.loads(text)
            trace = os.path.join(tmp, f"trace_{n}.jsonl")
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, __file__, "--record", trace, "--", "init", *flags,
                 "--out", os.path.join(tmp, f"adapter_{n}")],
                cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            t_init = time.perf_counter() - t0
            points = [json.loads(line) for line in Path(trace).read_text().splitlines()]
            keys = ("setup_seconds", "first_batch_seconds", "statistics_seconds",
                    "solve_seconds", "seconds", "passes", "probe_sequences")  # fmt: skip
            out[str(n)] = {
                "plan": {k: plan[k] for k in keys},
                "plan_command_seconds": t_plan,
                "init_seconds": t_init,
                "plan_over_init": plan["seconds"] / t_init,
                "eta": eta_quality(points),
            }
            print(json.dumps({n: out[str(n)]}), file=sys.stderr, flush=True)
    if hasattr(os, "getloadavg"):
        out["load_average_1min_at_end"] = os.getloadavg()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--record"]:
        return record(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, nargs="+", default=[64, 256])
    p.add_argument("--out", default=None)
    p.add_argument("--work", default=None, help="keep the data, traces and adapters here")
    args = p.parse_args(argv)
    result = run(args.problems, args.work)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
