"""``python -m paper_figs {fig3,fig2,fig4,table7,fisher_samples,init_time,regime,real_regime,all} --out DIR [--quick]``.

Each item writes ``DIR/<item>.png`` and ``DIR/<item>.csv`` (the plotted numbers) and prints a
one-line summary. ``--quick`` is the small variant the tests run; ``--seeds`` overrides the number
of seeds of the seeded items.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from paper_figs.output import (
    ItemResult,
)

ITEMS = ("fig3", "fig2", "fig4", "table7", "fisher_samples", "init_time")
# Items not in ``all`` (minutes even with --quick; tested in their own test module).
EXTRA_ITEMS = ("regime", "fig2_lr", "real_regime")


def run_item(name: str, out: Path, quick: bool = False, seeds: int | None = None) -> ItemResult:
    """Run one item (module ``paper_figs.<name>``) and return its :class:`ItemResult`."""
    if name not in ITEMS + EXTRA_ITEMS:
        raise ValueError(f"unknown item {name!r}; choose one of {ITEMS + EXTRA_ITEMS} or 'all'")
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    out.mkdir(parents=True, exist_ok=True)
    return importlib.import_module(f"paper_figs.{name}").run(out, quick=quick, seeds=seeds)


def run_all(out: Path, quick: bool = False, seeds: int | None = None) -> dict[str, ItemResult]:
    results = {}
    for name in ITEMS:
        t0 = time.perf_counter()
        results[name] = run_item(name, out, quick, seeds)
        print(f"{results[name].summary}  [{time.perf_counter() - t0:.1f} s]", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m paper_figs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("item", choices=[*ITEMS, *EXTRA_ITEMS, "all"])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="small, fast variant (tests)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    args = parser.parse_args(argv)
    if args.item == "all":
        run_all(args.out, args.quick, args.seeds)
    else:
        t0 = time.perf_counter()
        res = run_item(args.item, args.out, args.quick, args.seeds)
        print(f"{res.summary}  [{time.perf_counter() - t0:.1f} s]")


if __name__ == "__main__":
    main()
