"""``python -m proofs_check``: run the claims and print one table (or JSON).

Usage::

    python -m proofs_check            # all claims, quick mode (< 2 min on 2 cores)
    python -m proofs_check --full     # larger sizes / more Monte-Carlo replications
    python -m proofs_check --only 3   # one claim
    python -m proofs_check --json     # the same rows as JSON

The exit code is 1 if any row fails. Every claim is seeded: the same command prints the same
numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from proofs_check._record import ClaimResult, Mode
from proofs_check._registry import CLAIMS

COLUMNS = ("id", "ref", "measured", "value", "criterion", "s.e.", "result")
WIDTHS = (8, 18, 60, 11, 13, 9, 6)


def run_claims(ids: Sequence[str], mode: Mode) -> tuple[list[ClaimResult], dict[str, float]]:
    """Run the claims ``ids`` in ``mode``; return all rows and the seconds each claim took."""
    rows: list[ClaimResult] = []
    seconds: dict[str, float] = {}
    for cid in ids:
        t0 = time.perf_counter()
        rows.extend(CLAIMS[cid].run(mode))
        seconds[cid] = time.perf_counter() - t0
    return rows, seconds


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3e}"


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: Sequence[ClaimResult]) -> str:
    """The human-readable table: one line per row, then its tolerance justification and details."""
    head = " ".join(c.ljust(w) for c, w in zip(COLUMNS, WIDTHS))
    lines = [head, "-" * len(head)]
    for r in rows:
        crit = f"{r.relation} {r.tolerance:.2e}"
        cells = (
            r.id,
            r.ref,
            r.measured,
            _fmt(r.value),
            crit,
            _fmt(r.se),
            "PASS" if r.passed else "FAIL",
        )
        lines.append(" ".join(_cell(c, w).ljust(w) for c, w in zip(cells, WIDTHS)))
        lines.append(f"{'':9}tolerance: {r.justification}")
        for key, val in r.details.items():
            shown = f"{val:.4g}" if isinstance(val, float) else str(val)
            lines.append(f"{'':9}· {key}: {shown}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m proofs_check", description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (default)")
    size.add_argument("--full", action="store_true", help="larger sizes, more MC replications")
    p.add_argument(
        "--only",
        metavar="ID",
        choices=sorted(CLAIMS, key=int),
        help="run one claim (its number in docs/theory.md)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 = every row passed)."""
    args = _parser().parse_args(argv)
    mode: Mode = "full" if args.full else "quick"
    ids = [args.only] if args.only else sorted(CLAIMS, key=int)
    rows, seconds = run_claims(ids, mode)
    ok = all(r.passed for r in rows)
    if args.json:
        out = {"mode": mode, "passed": ok, "rows": [r.to_dict() for r in rows], "seconds": seconds}
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        print(f"proofs_check ({mode} mode): {len(rows)} checks from {len(ids)} claims")
        print(format_table(rows))
        n_fail = sum(not r.passed for r in rows)
        print(f"\n{len(rows) - n_fail}/{len(rows)} PASS" + (f", {n_fail} FAIL" if n_fail else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
