"""``python -m paper_figs all --quick``: every item writes a PNG and a CSV of exactly what it plots.

The run happens once per module (fixture). Checks: files exist and are valid PNGs; every CSV is
finite; every labelled curve drawn in the figure (read back from the matplotlib artists before the
figure was closed) equals the CSV's series for the same panel, and vice versa.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest

from paper_figs.__main__ import ITEMS, main, run_all
from paper_figs.output import (
    read_series_csv,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# Series are rounded to 7 significant digits before plotting and written with the same format,
# so the CSV and the figure hold bit-identical numbers.
CSV_RTOL = 0.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ``paper_figs all --quick`` takes 60-75 s on the shared, loaded 2-core machine (51 s of CPU):
# every test that uses it is marked slow (the committed-results tests below run by default).
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_figs")
    return out, run_all(out, quick=True)


@pytest.mark.slow
@pytest.mark.parametrize("item", ITEMS)
def test_files_exist(quick_run, item):
    out, results = quick_run
    res = results[item]
    assert res.png == out / f"{item}.png" and res.csv == out / f"{item}.csv"
    assert res.png.read_bytes()[:8] == PNG_MAGIC
    assert res.summary.startswith(item)


@pytest.mark.slow
@pytest.mark.parametrize("item", ITEMS)
def test_csvs_finite(quick_run, item):
    res = quick_run[1][item]
    for path in (res.csv, *res.extra_csv):
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        assert len(rows) > 1, f"{path.name} has no data rows"
        header = rows[0]
        for row in rows[1:]:
            for name, cell in zip(header, row):
                try:
                    value = float(cell)
                except ValueError:
                    continue  # text columns (panel, series, method, ...) and empty sd cells
                assert math.isfinite(value), f"{path.name}: {name} = {cell} in {row}"


@pytest.mark.slow
@pytest.mark.parametrize("item", ITEMS)
def test_csv_matches_figure(quick_run, item):
    res = quick_run[1][item]
    table = read_series_csv(res.csv)
    assert res.plotted, f"{item}: no labelled series were read back from the figure"
    assert set(res.plotted) == set(table), (
        f"{item}: figure-only {sorted(set(res.plotted) - set(table))}, "
        f"csv-only {sorted(set(table) - set(res.plotted))}"
    )
    for key, drawn in res.plotted.items():
        for axis in ("x", "y"):
            np.testing.assert_allclose(
                table[key][axis], drawn[axis], rtol=CSV_RTOL, err_msg=f"{item} {key} {axis}"
            )


@pytest.mark.slow
def test_consistency_check_can_fail(quick_run, tmp_path):
    """A CSV whose y values are perturbed no longer matches the figure."""
    res = quick_run[1]["table7"]
    bad = tmp_path / "bad.csv"
    with res.csv.open(newline="") as src, bad.open("w", newline="") as dst:
        reader, writer = csv.reader(src), csv.writer(dst)
        writer.writerow(next(reader))
        for row in reader:
            row[3] = repr(float(row[3]) * (1 + 1e-5))
            writer.writerow(row)
    table = read_series_csv(bad)
    key = next(iter(res.plotted))
    assert not np.allclose(table[key]["y"], res.plotted[key]["y"], rtol=CSV_RTOL, atol=0)


def test_cli_rejects_unknown_item(tmp_path):
    with pytest.raises(SystemExit):
        main(["fig99", "--out", str(tmp_path)])


# The committed full-run figures embedded in the README (fig3, fig2, table7) stay small.
RESULTS = Path(__file__).resolve().parents[1] / "paper_figs" / "results"
MAX_PNG_BYTES = 150_000


@pytest.mark.parametrize("item", ["fig3", "fig2", "table7"])
def test_committed_results(item):
    png, table = RESULTS / f"{item}.png", RESULTS / f"{item}.csv"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size < MAX_PNG_BYTES, f"{png.name}: {png.stat().st_size} bytes"
    series = read_series_csv(table)
    assert series and all(np.all(np.isfinite(s["y"])) for s in series.values())


# Where the quick run and the committed full run must agree exactly (same seeds, same code):
# * fig3's top row is the seed-0 trajectory projected on a plane fixed by the task: the quick run's
#   QUICK_STEPS + 1 points are the first points of the full run's (Adam is deterministic);
# * table7's ‖Ŵ − W_tgt‖_F at the constrained MLE (A frozen) does not depend on the Adam budget:
#   the quick run's seeds are the first seeds of the full run. Both are written with 7 / 17
#   significant digits; measured agreement: bit-identical / ≤ 6e-16 relative.
COMMITTED_RTOL = 1e-12


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_quick_fig3_trajectories_are_the_committed_ones(quick_run):
    quick = read_series_csv(quick_run[1]["fig3"].csv)
    committed = read_series_csv(RESULTS / "fig3.csv")
    planes = [key for key in quick if key[0].endswith("-plane")]
    assert len(planes) == 14, sorted(quick)  # 7 runs × 2 tasks
    for key in planes:
        q, c = quick[key], committed[key]
        n = len(q["x"])
        assert len(c["x"]) > n, f"{key}: the committed run is not longer than the quick one"
        for axis in ("x", "y"):
            np.testing.assert_allclose(
                q[axis], c[axis][:n], rtol=COMMITTED_RTOL, atol=0, err_msg=f"fig3 {key} {axis}"
            )


@pytest.mark.slow
def test_quick_table7_constrained_mle_distances_are_the_committed_ones(quick_run):
    res = quick_run[1]["table7"]
    seeds_csv = next(p for p in res.extra_csv if p.name == "table7_seeds.csv")
    metric = "converged_distance"
    quick = {(r["method"], r["seed"]): float(r["value"]) for r in _rows(seeds_csv)
             if r["metric"] == metric}  # fmt: skip
    committed = {(r["method"], r["seed"]): float(r["value"])
                 for r in _rows(RESULTS / "table7_seeds.csv") if r["metric"] == metric}  # fmt: skip
    assert quick and set(quick) <= set(committed), sorted(set(quick) - set(committed))
    for key, value in quick.items():
        assert value == pytest.approx(committed[key], rel=COMMITTED_RTOL, abs=0), key


DOCS_FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures.md"


def test_docs_table7_is_the_committed_csv():
    """The "mean ± s.d." cells of docs/figures.md's Table 7 table are the committed table7.csv's
    converged-distance rows, rounded as printed (pasted numbers must not drift from the data)."""
    text = DOCS_FIGURES.read_text(encoding="utf-8")
    section = text.split("## Table 7", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\|[^|]+\| (\d+\.\d+) ± (\d+\.\d+) \|$", section, flags=re.M)
    assert len(cells) >= 7, cells
    rows = [r for r in _rows(RESULTS / "table7.csv") if r["panel"] == "converged_distance"]
    for mean, sd in cells:
        digits = len(mean.split(".")[1])
        printed = {(f"{float(r['y']):.{digits}f}", f"{float(r['sd']):.{digits}f}") for r in rows}
        assert (mean, sd) in printed, f"docs/figures.md Table 7: {mean} ± {sd} not in table7.csv"
