"""Text tables of a :func:`~lora_da_ref.torch.validation.compare.validate` report."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report"]


def format_report(report: dict[str, Any]) -> str:
    """The per-layer tables of a :func:`validate` report, as text."""
    lines = [
        f"LoRA-DA validation: case {report['case']} ({report.get('description', '')}), "
        f"r = {report['rank']}, N = {report['n_train']}, device {report['device']}, "
        f"statistics {report['stats_dtype']}, {report['seconds']:.1f} s"
    ]
    for name, layer in report["layers"].items():
        lines += ["", *_layer_lines(name, layer)]
    return "\n".join(lines)


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
