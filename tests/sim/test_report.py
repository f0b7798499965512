"""The summary, the per-job CSV and the HTML report (coordinator/sim/report.py,
report_html.py) on results worked out by hand."""

from __future__ import annotations

import csv
import re
import xml.etree.ElementTree as ET
from fractions import Fraction
from pathlib import Path

import pytest

from coordinator.sim.engine import JobRecord, SimJob, SimResult
from coordinator.sim.report import (
    SUMMARY_KEYS,
    percentile,
    summarize,
    tenant_shares,
    weighted_jain,
    write_jobs_csv,
)
from coordinator.sim.report_html import render_html, resample
from tests.cdp import CHROMIUM, Browser


def rec(job_id: str, tenant: str, submit: float, start: float, end: float, gpus: int = 1,
        node: str = "n0") -> JobRecord:
    return JobRecord(SimJob(job_id, submit, end - start, gpus, tenant), start, end, node)


# One GPU, two tenants. Worked out in test_summary_figures_worked_by_hand.
HAND = [
    rec("a1", "A", 0, 0, 10),
    rec("b1", "B", 0, 10, 20),
    rec("a2", "A", 5, 20, 25),
    rec("b2", "B", 30, 30, 45),
]


def result(records: list[JobRecord], policy: str = "fifo", total_gpus: int = 1) -> SimResult:
    timeline = [(0.0, 1, 1), (10.0, 1, 1), (20.0, 0, 1), (25.0, 0, 0), (30.0, 0, 1),
                (45.0, 0, 0)]
    return SimResult(policy=policy, records=records, timeline=timeline, total_gpus=total_gpus,
                     wall_s=0.5, peak_rss_mb=12.0)


def test_summary_figures_worked_by_hand() -> None:
    s = summarize(result(HAND))
    assert list(s)[: len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)
    # JCT (end - submit): a1 10, b1 20, a2 20, b2 15 -> sorted 10, 15, 20, 20.
    # Queueing (start - submit): 0, 10, 15, 0 -> sorted 0, 0, 10, 15.
    # p50 of 4 values: rank 1.5 -> halfway between the 2nd and 3rd; p99: rank 2.97.
    assert s["jobs"] == 4
    assert s["mean_jct_s"] == 16.25
    assert s["p50_jct_s"] == 17.5
    assert s["p99_jct_s"] == 20.0
    assert s["mean_queue_s"] == 6.25
    assert s["p50_queue_s"] == 5.0
    assert s["p99_queue_s"] == 14.85  # 10 + 0.97 * (15 - 10)
    assert s["makespan_s"] == 45.0
    assert s["utilization"] == round(40 / 45, 6)  # 10 + 10 + 5 + 15 GPU-seconds on 1 GPU
    # Spans (d_A, d_B | b_A, b_B): [0,5) 1,1|1,0  [5,10) 2,1|1,0  [10,20) 1,1|0,1
    # [20,25) 1,0|1,0  [25,30) nothing  [30,45) 0,1|0,1.
    d_a = Fraction(5, 2) + Fraction(10, 3) + 5 + 5  # 95/6
    d_b = Fraction(5, 2) + Fraction(5, 3) + 5 + 15  # 145/6
    s_a, s_b = Fraction(15), Fraction(25)
    x_a, x_b = s_a / d_a, s_b / d_b
    w_a, w_b = d_a / (d_a + d_b), d_b / (d_a + d_b)
    jain = (w_a * x_a + w_b * x_b) ** 2 / (w_a * x_a**2 + w_b * x_b**2)
    assert s["jain"] == round(float(jain), 6)
    assert s["tenants"]["A"] == {"jobs": 2, "gpu_s": 15.0, "demand_share": round(95 / 240, 6),
                                 "gpu_share": 0.375, "ratio": round(90 / 95, 6),
                                 "mean_jct_s": 15.0}
    assert s["tenants"]["B"]["gpu_share"] == 0.625
    assert s["total_gpus"] == 1 and s["skipped"] == 0


def test_tenant_shares_sweep_integrals() -> None:
    shares = tenant_shares(HAND)
    assert shares["A"].demand == pytest.approx(95 / 6)
    assert shares["B"].demand == pytest.approx(145 / 6)
    assert (shares["A"].held, shares["B"].held) == (15.0, 25.0)


def test_one_gpu_fifo_two_tenants_gives_three_quarters() -> None:
    """A and B each submit a 10 s job at 0 on one GPU; A runs first. Demand: 1/2 each for
    10 s, then B alone for 10 s: D_A 5, D_B 15. Held: A 10, B 10. x = 2 and 2/3, weights
    1/4 and 3/4: (1/2 + 1/2)^2 / (1/4 * 4 + 3/4 * 4/9) = 3/4."""
    records = [rec("a", "A", 0, 0, 10), rec("b", "B", 0, 10, 20)]
    assert summarize(result(records))["jain"] == 0.75


@pytest.mark.parametrize(("weights", "values", "expected"), [
    ([1, 1], [1, 1], 1.0),
    ([1, 1], [1, 0], 0.5),
    ([1, 1, 1, 1], [1, 0, 0, 0], 0.25),
    ([1, 1, 1, 1], [3, 3, 3, 3], 1.0),
    ([0.25, 0.75], [2, 2 / 3], 0.75),
    ([1], [0.3], 1.0),
    ([], [], 1.0),
])
def test_weighted_jain_known_values(weights: list[float], values: list[float],
                                   expected: float) -> None:
    assert weighted_jain(weights, values) == pytest.approx(expected)


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 100.0], 99) == 99.0


def test_an_empty_result_summarises_to_zeros() -> None:
    s = summarize(SimResult("fifo", [], [], 8, 0.0, 0.0))
    assert (s["jobs"], s["mean_jct_s"], s["utilization"], s["jain"]) == (0, 0.0, 0.0, 1.0)


def test_jobs_csv_one_row_per_job_per_policy(tmp_path: Path) -> None:
    out = tmp_path / "jobs.csv"
    other = [rec("a1", "A", 0, 0, 10.25, gpus=2, node="n1,n2")]
    assert write_jobs_csv([result(HAND), result(other, policy="sjf")], out) == 5
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["policy", "id", "tenant", "gpus", "nodes", "submit_s", "start_s",
                             "end_s", "queue_s", "jct_s", "node"]
    assert rows[1] == {"policy": "fifo", "id": "b1", "tenant": "B", "gpus": "1", "nodes": "1",
                       "submit_s": "0", "start_s": "10", "end_s": "20", "queue_s": "10",
                       "jct_s": "20", "node": "n0"}
    assert rows[4]["policy"] == "sjf" and rows[4]["end_s"] == "10.250"
    assert rows[4]["node"] == "n1,n2"


def test_resample_is_a_time_weighted_mean() -> None:
    # busy 4 for 0-5, 0 for 5-10; 2 buckets of 5 s, then 4 buckets of 2.5 s.
    assert resample([(0.0, 3, 4), (5.0, 1, 0)], 10.0, 2) == [(0.0, 3.0, 4.0), (5.0, 1.0, 0.0)]
    assert resample([(0.0, 0, 4), (6.0, 0, 0)], 10.0, 2) == [(0.0, 0.0, 4.0), (5.0, 0.0, 0.8)]


def hostile_results() -> tuple[list[SimResult], list[dict[str, object]]]:
    tricky = [*HAND, rec("x", "<script>alert(1)</script>", 1, 40, 41)]
    results = [result(tricky, "fifo"), result(list(reversed(tricky)), "backfill")]
    return results, [summarize(r) for r in results]


def test_the_report_is_self_contained_and_holds_the_plots() -> None:
    results, summaries = hostile_results()
    page = render_html(results, summaries, {"trace": "t.csv", "cluster": "1x1 (1 GPUs)"})
    # Nothing to fetch: no src/href/url() at all, no script, no external stylesheet.
    assert not re.search(r"\b(src|href)\s*=|url\(|@import|<script|<link|<img|<iframe", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    titles = [ET.fromstring(s).findtext("title") for s in svgs]  # each one well-formed XML
    assert titles == ["Jobs waiting over time", "GPU utilisation over time",
                      "Job completion time, cumulative",
                      "GPU share against demand share, per tenant"]
    for svg in svgs[:3]:  # one line per policy in each plot over time and in the CDF
        assert svg.count('class="series"') == 2
    for key in ("mean JCT", "p99 queueing", "GPU utilisation", "weighted Jain"):
        assert f"<th>{key}</th>" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_the_report_renders_in_chromium(tmp_path: Path) -> None:
    results, summaries = hostile_results()
    path = tmp_path / "report.html"
    path.write_text(render_html(results, summaries, {"trace": "t.csv"}))
    async with Browser(tmp_path / "chromium") as page:
        await page.goto(path.as_uri())
        sizes = await page.evaluate(
            "[...document.querySelectorAll('svg.plot')].map(s => {"
            " const r = s.getBoundingClientRect(); return [r.width, r.height,"
            " s.querySelectorAll('polyline, rect').length]; })")
        assert len(sizes) == 4
        assert all(w > 800 and h > 100 and shapes > 2 for w, h, shapes in sizes)
        assert await page.evaluate("document.querySelectorAll('td.best').length") > 0
        assert page.errors == []


def test_the_same_results_give_the_same_page() -> None:
    results, summaries = hostile_results()
    meta = {"trace": "t.csv"}
    assert render_html(results, summaries, meta) == render_html(results, summaries, meta)
