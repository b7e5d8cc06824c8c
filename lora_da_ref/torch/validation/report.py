"""Text tables of a :func:`~lora_da_ref.torch.validation.compare.validate` report."""

from __future__ import annotations

from typing import Any

__all__ = ["SOLVER_TARGET_RAD", "format_report", "summary_lines"]

SOLVER_TARGET_RAD = 1e-3  # a solver run passes when its A is this close to eigh's on the same Ω
COND_INFINITE = 1e15  # cond(J) above ~1/eps(float64): J is numerically singular
DEGENERATE_TOL = 1e-6  # eigenvalue error and residual of an equally optimal subspace


def format_report(report: dict[str, Any]) -> str:
    """The per-layer tables of a :func:`validate` report, as text."""
    lines = [
        f"LoRA-DA validation: case {report['case']} ({report.get('description', '')}), "
        f"r = {report['rank']}, N = {report['n_train']}, device {report['device']}, "
        f"statistics {report['stats_dtype']}, {report['seconds']:.1f} s"
    ]
    for name, layer in report["layers"].items():
        lines += ["", *_layer_lines(name, layer)]
    return "\n".join([*lines, "", *summary_lines(report)])


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The closing pass/fail summary: a layer passes when every solver run reproduces dense
    eigh's subspace on the same Ω within :data:`SOLVER_TARGET_RAD` (largest principal angle; a
    run that fell back to eigh counts as what it returned), or, when the r-th eigenvalue is
    (near-)degenerate and the subspace is not unique, returns an equally optimal invariant
    subspace (eigenvalue error and residual both ≤ :data:`DEGENERATE_TOL`); a warning names the layers whose
    exact cond(J) is numerically infinite (their angles against the exact reference measure the
    damping, not the method)."""
    failed: dict[str, list[str]] = {}
    singular = []
    for name, layer in report["layers"].items():
        for omega_of, runs in layer["solvers"].items():
            for key, s in runs.items():
                if not _solver_passes(s):
                    failed.setdefault(name, []).append(
                        f"{key} on {omega_of} ({s['angle']:.1e} rad)"
                    )
        if any(not ex["cond_J"] < COND_INFINITE for ex in layer["exact"].values()):
            singular.append(name)
    n = len(report["layers"])
    verdict = "PASS" if not failed else "FAIL"
    lines = [
        f"summary: {verdict}: {n - len(failed)} of {n} layers: every solver within "
        f"{SOLVER_TARGET_RAD:g} rad of eigh"
    ]
    lines += [f"  FAIL {name}: {', '.join(runs)}" for name, runs in failed.items()]
    if singular:
        lines.append(
            f"  WARNING: cond(J) is numerically infinite (> {COND_INFINITE:.0e}) in "
            f"{len(singular)} layer(s): {', '.join(singular)}; the exact Fisher is singular at "
            "this calibration size, so errors against it reflect the damping"
        )
    return lines


def _solver_passes(s: dict[str, Any]) -> bool:
    if s["angle"] <= SOLVER_TARGET_RAD:  # NaN fails
        return True
    return s["eig_err"] <= DEGENERATE_TOL and s["residual"] <= DEGENERATE_TOL


def _layer_lines(name: str, layer: dict[str, Any]) -> list[str]:
    d1, d2 = layer["shape"]
    ex = next(iter(layer["exact"].values()))
    head = (
        f"{name}  W {d1}x{d2}  tokens {ex['tokens']}  cond(J) {ex['cond_J']:.2e}  "
        f"var/bias {ex['var_over_bias']:.2g}"
    )
    rows = [
        head,
        f"  {'method':<10}{'G err':>9}{'J err':>9}{'dW err':>9}{'Omega err':>10}{'angle':>9}"
        f"{'rel regret':>11}{'eig err':>9}  solver",
    ]
    for method, m in layer["methods"].items():
        solver = m["solver"] + (" (fallback)" if m["fallback"] else "")
        rows.append(
            f"  {method:<10}{m['G_err']:>9.1e}{m['J_err']:>9.1e}{m['delta_w_err']:>9.1e}"
            f"{m['omega_err']:>10.1e}{m['angle']:>9.1e}{m['rel_regret']:>11.1e}"
            f"{m['eig_err']:>9.1e}  {solver}"
        )
    rows.append(f"  {'solver':<12}{'on Omega of':<20}{'angle':>9}{'eig err':>10}{'iters':>7}"
                f"{'residual':>10}")  # fmt: skip
    for omega_of, runs in layer["solvers"].items():
        for key, s in runs.items():
            its = "-" if s["iterations"] is None else str(s["iterations"])
            note = "  fallback: " + s["fallback"][:48] if s["fallback"] else ""
            rows.append(
                f"  {key:<12}{omega_of:<20}{s['angle']:>9.2e}{s['eig_err']:>10.2e}{its:>7}"
                f"{s['residual']:>10.2e}{note}"
            )
    return rows
