"""The simulation report: one self-contained HTML file, its plots inline SVG drawn here.

Nothing is fetched: no script, no stylesheet, no font, no image from anywhere; a browser opened
offline shows it whole. Four plots, each with every policy side by side: the queue (jobs
waiting) over time, GPU utilisation over time, the distribution of job completion times (a
CDF, log time axis), and each tenant's share of GPU time against its share of demand. Above
them, the summary table. Every name from the trace (tenants, policies) is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

from coordinator.sim.engine import SimResult
from coordinator.sim.report import SUMMARY_KEYS

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#17becf")
BUCKETS = 600  # points per time series
CDF_POINTS = 400
MAX_TENANT_ROWS = 16  # the rest are summed as "(others)"
W, H = 860, 300
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 20, 45

LABELS = {
    "jobs": ("jobs", "n"), "mean_jct_s": ("mean JCT", "s"), "p50_jct_s": ("p50 JCT", "s"),
    "p99_jct_s": ("p99 JCT", "s"), "mean_queue_s": ("mean queueing", "s"),
    "p99_queue_s": ("p99 queueing", "s"), "makespan_s": ("makespan", "s"),
    "utilization": ("GPU utilisation", "%"), "jain": ("weighted Jain", "x"),
}
HIGHER_IS_BETTER = {"utilization", "jain"}

Points = list[tuple[float, float]]


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _time_unit(span_s: float) -> tuple[float, str]:
    for size, name in ((86400.0, "days"), (3600.0, "hours"), (60.0, "minutes")):
        if span_s >= 3 * size:
            return size, name
    return 1.0, "seconds"


def _fmt(x: float) -> str:
    if x == int(x) and abs(x) < 1e6:
        return f"{int(x)}"
    return f"{x:.3g}"


class _Plot:
    """An SVG frame with axes, ticks, a title and a legend on the right."""

    def __init__(self, title: str, xlabel: str, ylabel: str, x: tuple[float, float],
                 y: tuple[float, float], *, log_x: bool = False,
                 ylabel_fmt: Callable[[float], str] = _fmt,
                 xlabel_fmt: Callable[[float], str] = _fmt) -> None:
        self.x, self.y, self.log_x = x, y, log_x
        self.parts = [f'<svg class="plot" role="img" width="{W}" height="{H}" '
                      f'viewBox="0 0 {W} {H}"><title>{_esc(title)}</title>',
                      f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" '
                      f'height="{H - TOP - BOTTOM}" fill="#fff" stroke="#999"/>']
        ticks = (_log_ticks(*x) if log_x else _nice_ticks(*x))
        for t in ticks:
            px = self.sx(t)
            self.parts.append(f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{H - BOTTOM}" '
                              f'stroke="#eee"/><text x="{px:.1f}" y="{H - BOTTOM + 15}" '
                              f'text-anchor="middle">{_esc(xlabel_fmt(t))}</text>')
        for t in _nice_ticks(*y):
            py = self.sy(t)
            self.parts.append(f'<line x1="{LEFT}" y1="{py:.1f}" x2="{W - RIGHT}" y2="{py:.1f}" '
                              f'stroke="#eee"/><text x="{LEFT - 6}" y="{py + 4:.1f}" '
                              f'text-anchor="end">{_esc(ylabel_fmt(t))}</text>')
        self.parts.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 8}" '
                          f'text-anchor="middle">{_esc(xlabel)}</text>')
        self.parts.append(f'<text x="14" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
                          f'transform="rotate(-90 14 {(TOP + H - BOTTOM) / 2})">'
                          f'{_esc(ylabel)}</text>')
        self.legend = 0

    def sx(self, v: float) -> float:
        lo, hi = self.x
        if self.log_x:
            lo, hi, v = math.log10(lo), math.log10(hi), math.log10(max(v, self.x[0]))
        return LEFT + (v - lo) / ((hi - lo) or 1.0) * (W - LEFT - RIGHT)

    def sy(self, v: float) -> float:
        lo, hi = self.y
        return H - BOTTOM - (v - lo) / ((hi - lo) or 1.0) * (H - TOP - BOTTOM)

    def line(self, name: str, color: str, points: Points, *, step: bool = False) -> None:
        coords: list[str] = []
        prev_y: float | None = None
        for x, y in points:
            px, py = self.sx(x), self.sy(y)
            if step and prev_y is not None:
                coords.append(f"{px:.1f},{prev_y:.1f}")
            coords.append(f"{px:.1f},{py:.1f}")
            prev_y = py
        self.parts.append(f'<polyline class="series" fill="none" stroke="{color}" '
                          f'stroke-width="1.6" points="{" ".join(coords)}"/>')
        self.key(name, color)

    def key(self, name: str, color: str) -> None:
        y = TOP + 10 + 18 * self.legend
        self.parts.append(f'<rect x="{W - RIGHT + 12}" y="{y - 8}" width="14" height="10" '
                          f'fill="{color}"/><text x="{W - RIGHT + 30}" y="{y + 1}">'
                          f'{_esc(name)}</text>')
        self.legend += 1

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def _log_ticks(low: float, high: float) -> list[float]:
    """Powers of ten in [low, high]; with 2 and 5 times each when there are 4 or fewer."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    steps = (1.0,) if len(decades) > 4 else (1.0, 2.0, 5.0)
    return [m * 10.0 ** e for e in decades for m in steps if low <= m * 10.0 ** e <= high] or [low]


def _duration(seconds: float) -> str:
    """A tick on the log time axis: 10 s, 17 min, 2.8 h, 11.6 d."""
    for size, unit in ((86400.0, "d"), (3600.0, "h"), (60.0, "min")):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


# --- the series ---------------------------------------------------------------------------


def resample(timeline: Sequence[tuple[float, int, int]], end: float,
             buckets: int = BUCKETS) -> list[tuple[float, float, float]]:
    """The step function `timeline` (each (t, queued, busy) holds until the next t) as
    time-weighted means over `buckets` equal spans of [0, end]: (span start, queued, busy)."""
    if end <= 0 or not timeline:
        return [(0.0, float(timeline[0][1]), float(timeline[0][2]))] if timeline else []
    width = end / buckets
    queued = [0.0] * buckets
    busy = [0.0] * buckets
    for i, (t, q, b) in enumerate(timeline):
        t_next = timeline[i + 1][0] if i + 1 < len(timeline) else end
        lo, hi = max(t, 0.0), min(t_next, end)
        k = min(int(lo / width), buckets - 1)
        while lo < hi:
            while k < buckets - 1 and (k + 1) * width <= lo:  # rounding in lo / width
                k += 1
            edge = min(hi, (k + 1) * width) if k < buckets - 1 else hi
            queued[k] += q * (edge - lo)
            busy[k] += b * (edge - lo)
            lo = edge
    return [(k * width, queued[k] / width, busy[k] / width) for k in range(buckets)]


def _cdf(values: list[float], points: int = CDF_POINTS) -> Points:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return []
    picks = sorted({min(n - 1, round(i * (n - 1) / (points - 1))) for i in range(points)})
    return [(max(ordered[k], 1.0), (k + 1) / n) for k in picks]


# --- the plots ----------------------------------------------------------------------------


def _over_time(results: Sequence[SimResult], end: float) -> tuple[str, str]:
    size, unit = _time_unit(end)
    series = [resample(r.timeline, end) for r in results]
    top_q = max((q for s in series for _, q, _ in s), default=0.0)
    queue = _Plot("Jobs waiting over time", f"time ({unit})", "jobs waiting (mean)",
                  (0.0, end / size), (0.0, max(top_q * 1.05, 1.0)))
    util = _Plot("GPU utilisation over time", f"time ({unit})", "GPUs busy",
                 (0.0, end / size), (0.0, 100.0), ylabel_fmt=lambda v: f"{v:.0f}%")
    for i, (r, s) in enumerate(zip(results, series, strict=True)):
        queue.line(r.policy, _color(i), [(t / size, q) for t, q, _ in s], step=True)
        total = r.total_gpus or 1
        util.line(r.policy, _color(i), [(t / size, 100.0 * b / total) for t, _, b in s],
                  step=True)
    return queue.svg(), util.svg()


def _jct_cdf(results: Sequence[SimResult]) -> str:
    curves = [_cdf([r.end_s - r.job.submit_s for r in res.records]) for res in results]
    xs = [x for c in curves for x, _ in c]
    lo, hi = (min(xs), max(xs)) if xs else (1.0, 10.0)
    plot = _Plot("Job completion time, cumulative", "job completion time (log scale)",
                 "share of jobs done", (max(lo, 1.0), max(hi, lo * 10, 10.0)), (0.0, 1.0),
                 log_x=True, ylabel_fmt=lambda v: f"{v:.0%}", xlabel_fmt=_duration)
    for i, (res, c) in enumerate(zip(results, curves, strict=True)):
        plot.line(res.policy, _color(i), c)
    return plot.svg()


def _shares(summaries: Sequence[dict[str, Any]]) -> str:
    """Per tenant: its demand share (grey) and its GPU share under each policy (colours)."""
    tenants: dict[str, dict[str, Any]] = summaries[0]["tenants"] if summaries else {}
    order = sorted(tenants, key=lambda t: (-tenants[t]["demand_share"], t))
    shown = order[:MAX_TENANT_ROWS]
    rest = order[MAX_TENANT_ROWS:]

    def share(s: dict[str, Any], names: list[str], key: str) -> float:
        return float(sum(s["tenants"].get(t, {}).get(key, 0.0) for t in names))

    rows = [(t, [t]) for t in shown] + ([("(others)", rest)] if rest else [])
    bar, gap = 7, 8
    per_row = bar * (len(summaries) + 1) + gap
    height = TOP + BOTTOM + per_row * max(len(rows), 1)
    top = max([share(summaries[0], names, "demand_share") for _, names in rows] +
              [share(s, names, "gpu_share") for s in summaries for _, names in rows] + [0.01])
    width = W - LEFT - RIGHT - 40
    parts = [f'<svg class="plot" role="img" width="{W}" height="{height}" '
             f'viewBox="0 0 {W} {height}"><title>GPU share against demand share, per tenant'
             '</title>']
    for t in _nice_ticks(0.0, top * 100):
        x = LEFT + 40 + t / 100 / top * width
        parts.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{height - BOTTOM}" '
                     f'stroke="#eee"/><text x="{x:.1f}" y="{height - BOTTOM + 15}" '
                     f'text-anchor="middle">{t:.0f}%</text>')
    parts.append(f'<text x="{LEFT + 40 + width / 2}" y="{height - 8}" text-anchor="middle">'
                 'share of GPU time (colours) and of demand (grey), time-averaged</text>')
    for k, (label, names) in enumerate(rows):
        y0 = TOP + k * per_row
        parts.append(f'<text x="{LEFT + 34}" y="{y0 + per_row / 2:.1f}" text-anchor="end">'
                     f'{_esc(label[:24])}</text>')
        values = [("#bbb", share(summaries[0], names, "demand_share"))] + [
            (_color(i), share(s, names, "gpu_share")) for i, s in enumerate(summaries)]
        for b, (color, v) in enumerate(values):
            parts.append(f'<rect x="{LEFT + 40}" y="{y0 + b * bar:.1f}" '
                         f'width="{v / top * width:.1f}" height="{bar - 1}" fill="{color}">'
                         f'<title>{_esc(label)}: {v:.1%}</title></rect>')
    for i, s in enumerate([{"policy": "demand"}, *summaries]):
        y = TOP + 10 + 18 * i
        parts.append(f'<rect x="{W - RIGHT + 12}" y="{y - 8}" width="14" height="10" '
                     f'fill="{"#bbb" if i == 0 else _color(i - 1)}"/>'
                     f'<text x="{W - RIGHT + 30}" y="{y + 1}">{_esc(s["policy"])}</text>')
    return "".join(parts) + "</svg>"


# --- the page -----------------------------------------------------------------------------


def _cell(key: str, value: Any) -> str:
    if key == "utilization":
        return f"{100 * float(value):.1f}%"
    if key == "jain":
        return f"{float(value):.3f}"
    if key == "jobs":
        return f"{int(value):,}"
    return f"{float(value):,.0f} s"


def _table(summaries: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{_esc(s['policy'])}</th>" for s in summaries)
    rows = []
    for key in SUMMARY_KEYS[1:]:
        values = [float(s[key]) for s in summaries]
        best = (max if key in HIGHER_IS_BETTER else min)(values) if key != "jobs" else None
        cells = "".join(
            f"<td{' class=best' if best is not None and v == best and len(values) > 1 else ''}>"
            f"{_esc(_cell(key, s[key]))}</td>" for s, v in zip(summaries, values, strict=True))
        rows.append(f"<tr><th>{_esc(LABELS[key][0])}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:960px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse}
td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}th{text-align:left}
td.best{font-weight:bold}svg.plot{display:block;font-size:11px;margin:8px 0}
.meta{color:#555}"""


def render_html(results: Sequence[SimResult], summaries: Sequence[dict[str, Any]],
                meta: dict[str, str]) -> str:
    """The report for one or more policies run on the same trace and cluster. `meta`: lines
    shown under the title (trace, cluster, estimate, seed...), keys and values escaped."""
    end = max((r.end_s for res in results for r in res.records), default=0.0)
    queue_svg, util_svg = _over_time(results, end)
    facts = "".join(f"<div><b>{_esc(k)}</b>: {_esc(v)}</div>" for k, v in meta.items())
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<title>gpumesh simulate: "
        f"{_esc(', '.join(r.policy for r in results))}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>gpumesh simulate</h1><div class=meta>{facts}</div>"
        f"<h2>Summary</h2>{_table(summaries)}"
        "<p class=meta>JCT: end minus submit. Queueing: start minus submit. Weighted Jain: "
        "1 when each tenant's share of GPU time matches its share of demand.</p>"
        f"<h2>Queue</h2>{queue_svg}"
        f"<h2>GPU utilisation</h2>{util_svg}"
        f"<h2>Job completion time</h2>{_jct_cdf(results)}"
        f"<h2>Tenants' shares</h2>{_shares(summaries)}"
        "</body></html>\n"
    )
