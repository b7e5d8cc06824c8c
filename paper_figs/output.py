"""Output helpers of the figure scripts: method labels and colours, the CSV of plotted series,
plotting and PNG writing, and the :class:`ItemResult` every item returns."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from paper_figs.task import mean_sd

DPI = 100

METHOD_LABELS = {
    "full": "full FT",
    "lora": "LoRA",
    "lora_one_subspace": "LoRA-One subspace, B0 = 0",
    "lora_da": "LoRA-DA",
    "lora_da_no_bias": "LoRA-DA w/o bias",
    "lora_da_no_variance": "LoRA-DA w/o variance",
    "lora_da_no_variance_no_fisher": "LoRA-DA w/o variance & Fisher",
    "pissa": "PiSSA",
    "milora": "MiLoRA",
    "lora_da_oracle": "(ref.) LoRA-DA, oracle ΔW & exact J",
    "lora_da_population": "(ref.) LoRA-DA, population G & exact J",
    "lora_da_debiased": "LoRA-DA, debiased (1/N + 1/|S|)",
    "lora_da_official": "LoRA-DA (official preset)",
    "lora_da_paper": "LoRA-DA (paper preset)",
}
METHOD_COLORS = {
    "full": "black",
    "lora": "tab:blue",
    "lora_one_subspace": "tab:orange",
    "lora_da": "tab:green",
    "lora_da_no_bias": "tab:olive",
    "lora_da_no_variance": "tab:cyan",
    "lora_da_no_variance_no_fisher": "tab:gray",
    "pissa": "tab:purple",
    "milora": "tab:brown",
    "lora_da_oracle": "tab:pink",
    "lora_da_population": "tab:red",
    "lora_da_debiased": "darkgreen",
    "lora_da_official": "tab:green",
    "lora_da_paper": "tab:red",
}


CSV_DIGITS = 7  # significant digits kept in the CSVs (and in what is plotted, so both agree)


def round_sig(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to :data:`CSV_DIGITS` significant digits (exactly what the CSV stores)."""
    return np.array([float(f"{v:.{CSV_DIGITS}g}") for v in np.ravel(a)]).reshape(np.shape(a))


@dataclass
class Series:
    """One plotted curve or set of points: ``y`` (± ``sd``) against ``x``, on panel ``panel``.

    Values are rounded to :data:`CSV_DIGITS` significant digits on construction, so the figure
    shows exactly the numbers written to the CSV.
    """

    panel: str
    name: str
    x: np.ndarray
    y: np.ndarray
    sd: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.x, self.y = round_sig(self.x), round_sig(self.y)
        self.sd = None if self.sd is None else round_sig(self.sd)


CSV_FIELDS = ("panel", "series", "x", "y", "sd")


def write_series_csv(path: Path, series: list[Series]) -> None:
    """Long-format CSV, one row per plotted point: panel, series, x, y, sd (empty if none)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for s in series:
            sd = np.full(len(s.x), np.nan) if s.sd is None else s.sd
            for x, y, e in zip(s.x, s.y, sd):
                w.writerow(
                    [
                        s.panel,
                        s.name,
                        repr(float(x)),
                        repr(float(y)),
                        "" if np.isnan(e) else repr(float(e)),
                    ]
                )


def read_series_csv(path: Path) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Inverse of :func:`write_series_csv`: ``{(panel, series): {"x", "y", "sd"}}``."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            d = out.setdefault((row["panel"], row["series"]), {"x": [], "y": [], "sd": []})
            d["x"].append(float(row["x"]))
            d["y"].append(float(row["y"]))
            d["sd"].append(float(row["sd"]) if row["sd"] else np.nan)
    return {k: {n: np.asarray(v) for n, v in d.items()} for k, d in out.items()}


def plot_series(ax: plt.Axes, s: Series, *, color: str | None = None, **kw) -> None:
    """Draw ``s`` on ``ax`` as a labelled line (gid ``panel/name``), its ± s.d. band if any."""
    (line,) = ax.plot(s.x, s.y, label=kw.pop("label", s.name), color=color, **kw)
    line.set_gid(f"{s.panel}/{s.name}")
    if s.sd is not None and np.any(s.sd > 0):
        ax.fill_between(s.x, s.y - s.sd, s.y + s.sd, color=line.get_color(), alpha=0.2, lw=0)


def plot_points(ax: plt.Axes, s: Series, *, color: str | None = None, **kw) -> None:
    """Draw ``s`` as markers with ± s.d. error bars (gid ``panel/name``)."""
    cont = ax.errorbar(
        s.x, s.y, yerr=s.sd, label=kw.pop("label", s.name), color=color, capsize=3, **kw
    )
    cont.lines[0].set_gid(f"{s.panel}/{s.name}")


def plot_sweep(
    axes: np.ndarray,
    raw: dict[str, dict[str, np.ndarray]],
    panels: dict[str, str],
    x: tuple[int, ...],
    xlabel: str,
) -> list[Series]:
    """One panel per metric of a sweep (``raw[method][metric]`` is (seeds, len(x))): mean ± s.d.
    per method on a log₂ x axis. Returns the plotted series (what the CSV must hold)."""
    series = []
    xs = np.array(x, dtype=np.float64)
    for ax, (key, title) in zip(axes, panels.items()):
        for m, metrics in raw.items():
            mean, sd = mean_sd(metrics[key])
            s = Series(key, METHOD_LABELS[m], xs, mean, sd)
            plot_points(ax, s, color=METHOD_COLORS[m], fmt="-o", ms=5)
            series.append(s)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return series


def figure_series(fig: plt.Figure) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """The data of every line drawn by :func:`plot_series`/:func:`plot_points`, read back from the
    figure's artists: ``{(panel, series): {"x", "y"}}`` (for the tests' CSV-vs-figure check)."""
    out = {}
    for ax in fig.axes:
        for line in ax.lines:
            gid = line.get_gid()
            if gid and "/" in gid:
                panel, name = gid.split("/", 1)
                xy = np.asarray(line.get_xydata(), dtype=np.float64)
                out[(panel, name)] = {"x": xy[:, 0], "y": xy[:, 1]}
    return out


def save_figure(fig: plt.Figure, path: Path) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Save ``fig`` as a 256-colour PNG (dpi 100, keeps committed files small), close it, and
    return :func:`figure_series` of it."""
    from PIL import Image

    data = figure_series(fig)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=256).save(path, optimize=True)
    return data


@dataclass
class ItemResult:
    """What an item's ``run`` returns: written files, the plotted data, a one-line summary."""

    png: Path
    csv: Path
    plotted: dict[tuple[str, str], dict[str, np.ndarray]]
    summary: str
    extra_csv: tuple[Path, ...] = ()
