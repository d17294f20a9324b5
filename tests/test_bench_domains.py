"""experiments/bench_domains.py: the rows it prints read back, and drawn (no compression)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench_domains.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_domains", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LOG = """\
| method | calibrated on | tokens | news | encyclopedia | literature | conversation | docs | code | mean | compress s |
|---|---|---|---|---|---|---|---|---|---|---|
self-generated calibration: 100%|##########| 4/4 [02:44<00:00, 41.12s/batch]
| default | mixture + 16 own | 16,384 | 4.10x | 5.00x | 2.30x | 2.20x | 3.30x | 6.30x | **3.87x** | 300 (gradient_stats 50, allocation 60, factorize 190) |
| default | mixture + 64 own | 65,536 | 3.60x | 4.00x | 2.10x | 2.00x | 3.00x | 4.00x | **3.12x** | 1200 (gradient_stats 60, allocation 400, factorize 740) |
| default | all but code + 16 own | 16,384 | 4.08x | 4.18x | 2.26x | 2.17x | 3.54x | 6.78x | **3.83x** | 600 (gradient_stats 1, allocation 2, factorize 3) |
| whiten | news | 16,384 | 12.19x | 46.55x | 163.76x | 97.44x | 264.10x | 1063.41x | **274.57x** | 90 (factorize 90) |
| method | domain | calibrated on it | calibrated on the others | out / in | target <= 1.5 |
| default | code | – | 6.78x | – | – |
"""


def test_parse_rows_reads_what_the_bench_prints(bench):
    rows = bench.parse_rows(LOG)
    assert [(r["method"], r["kind"], r["tokens"]) for r in rows] == [
        ("default", "mixture", 16384), ("default", "mixture", 65536), ("default", "lodo", 16384),
        ("whiten", "single", 16384)]
    assert rows[1]["ppl_ratio"]["code"] == 4.0 and rows[1]["mean"] == 3.12
    assert rows[1]["stages"] == {"gradient_stats": 60.0, "allocation": 400.0, "factorize": 740.0}
    assert rows[3]["stages"] == {"factorize": 90.0} and rows[3]["ppl_ratio"]["code"] == 1063.41


def test_plot_draws_the_matrix_and_the_size_curve(bench, tmp_path):
    written = bench.plot(bench.parse_rows(LOG), tmp_path / "fig")
    assert [p.name for p in written] == ["matrix.png", "sizes.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
    # one calibration size only: no curve to draw
    assert [p.name for p in bench.plot(bench.parse_rows(LOG)[2:], tmp_path / "one")] == ["matrix.png"]


def test_replot_needs_rows(bench, tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("nothing printed by the bench\n")
    with pytest.raises(SystemExit):
        bench.main(["--replot", str(empty), "--plot", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.main(["--replot", str(empty)])
    with pytest.raises(SystemExit):  # nothing new to write
        bench.main(["--replot", str(empty), "--plot", str(tmp_path), "--json", str(tmp_path / "x.json")])
