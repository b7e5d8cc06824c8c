"""``python -m paper_figs {fig3,fig2,fig4,table7,fisher_samples,init_time,regime,fig2_lr,real_regime,all} --out DIR [--quick]``.

Each item writes ``DIR/<item>.png`` and ``DIR/<item>.csv`` (the plotted numbers) and prints a
one-line summary. ``--quick`` is the small variant the tests run; ``--seeds`` overrides the number
of seeds of the seeded items.

``--help`` lists every item with the first line of its module's docstring, read from the source
(not imported: the items import torch and matplotlib), so it answers at once and cannot drift
from the scripts.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paper_figs.output import ItemResult

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


def item_summary(name: str) -> str:
    """The first paragraph of ``paper_figs/<name>.py``'s docstring, on one line, RST markup off."""
    source = (Path(__file__).parent / f"{name}.py").read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source)) or ""
    line = " ".join(doc.split("\n\n")[0].split())
    return re.sub(r"``([^`]*)``|:\w+:`~?([^`]*)`", lambda m: m.group(1) or m.group(2), line)


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<15} {item_summary(name)}" for name in ITEMS]
    lines += [f"  {name:<15} {item_summary(name)} (not in all: minutes)" for name in EXTRA_ITEMS]
    lines.append(f"  {'all':<15} every item above but {' and '.join(EXTRA_ITEMS)}")
    parser = argparse.ArgumentParser(
        prog="python -m paper_figs",
        description="The paper's figures and tables at small scale, from real runs. Each item "
        "writes OUT/<item>.png and OUT/<item>.csv (the plotted numbers).",
        epilog="items:\n" + "\n".join(lines),
        formatter_class=_Formatter,
    )
    parser.add_argument("item", choices=[*ITEMS, *EXTRA_ITEMS, "all"], help="what to make")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="small, fast variant (tests)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (default: each item's own)"
    )
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The item list as written; each option with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.item == "all":
        run_all(args.out, args.quick, args.seeds)
    else:
        t0 = time.perf_counter()
        res = run_item(args.item, args.out, args.quick, args.seeds)
        print(f"{res.summary}  [{time.perf_counter() - t0:.1f} s]")


if __name__ == "__main__":
    main()
