"""One self-contained HTML report (tables + matplotlib plots as base64 PNG) from a report dict.

The page is rendered from the Jinja2 templates in ``templates/`` (``report.html.j2`` for bench
and validate, ``optimize.html.j2`` for optimize); plots are drawn with matplotlib's object API
(no pyplot global state, no display needed) and embedded as ``<img src="data:image/png;base64,...">``,
so the file opens anywhere, offline.

The plots are meant to be read, not decoded: latency histograms span p1-p99 of the runs (the
few outliers beyond are counted in the caption instead of stretching the axis), with a log axis
when p99/p1 > 10; latency over time is a rolling median with its p10-p90 band; the optimize page
shows the same ratio column as the terminal and bar charts of size and latency before/after.

matplotlib and jinja2 are optional (the ``[report]`` extra); without them
:func:`write_html` raises :class:`~onnxcompress.errors.OnnxCompressError` with the install
hint.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from .errors import OnnxCompressError

TEMPLATES = Path(__file__).with_name("templates")
INSTALL_HINT = "install the report extra of onnxcompress, or: pip install matplotlib jinja2"

#: one colour per model, the same on every chart of a page (matplotlib's tab10)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
#: p99/p1 above this: the latency axis is logarithmic
LOG_SPREAD = 10.0


def _require():
    try:
        import jinja2  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise OnnxCompressError(f"--html needs {exc.name}: {INSTALL_HINT}") from None


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _short(p: str) -> str:
    return p.replace("ExecutionProvider", "")


def _colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def ratio_text(before, after, better: str, worse: str) -> str:
    """``"3.63× smaller"`` / ``"1.37× slower"``, as the terminal's ratio column prints it: never a
    ratio below 1 called an improvement; empty when either side is missing or zero."""
    if not before or not after:
        return ""
    r = before / after
    return f"{r:.2f}× {better}" if r >= 1 else f"{1 / r:.2f}× {worse}"


def _ms(v: float) -> str:
    """A latency in ms with 3 significant digits (0.0259, 1.74, 48.2)."""
    return f"{v:.3g}"


def _log_ticks(ax, axis: str = "x") -> None:
    """Plain numbers (0.02, 0.05, 0.1) instead of 10^-2 on a log axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def latency_axis(latencies: list) -> tuple[float, float, bool]:
    """``(lo, hi, log)``: the histogram axis for one group's models: from the smallest p1 to the
    largest p99 of their runs (outliers beyond are counted, not drawn), logarithmic when
    ``hi / lo > LOG_SPREAD``."""
    import numpy as np

    p1 = [float(np.percentile(np.asarray(ms, float), 1)) for ms in latencies if len(ms)]
    p99 = [float(np.percentile(np.asarray(ms, float), 99)) for ms in latencies if len(ms)]
    if not p1:
        return 0.0, 1.0, False
    lo, hi = min(p1), max(p99)
    if hi <= lo:
        hi = lo * 1.01 + 1e-6
    return lo, hi, bool(lo > 0 and hi / lo > LOG_SPREAD)


def rolling_bands(ms, max_points: int = 200) -> dict:
    """Consecutive windows of a model's runs (in time order): ``x`` (window centre, run index),
    ``median``, ``p10``, ``p90`` and ``window`` (runs per window); the median of a window is
    what a reader means by "the latency then", the band how much it wandered."""
    import numpy as np

    ms = np.asarray(ms, float)
    n = len(ms)
    w = max(1, min(max(5, -(-n // max_points)), n))
    k = n // w
    chunks = ms[: k * w].reshape(k, w)
    p10, med, p90 = np.percentile(chunks, [10, 50, 90], axis=1)
    return {"x": (np.arange(k) * w + (w - 1) / 2).tolist(), "median": med.tolist(), "p10": p10.tolist(),
            "p90": p90.tolist(), "window": w}


def _bench_plots(rep: dict) -> list[dict]:
    import numpy as np
    from matplotlib.figure import Figure

    labels = list(rep.get("config", {}).get("labels") or [])
    plots = []
    for g in rep["groups"]:
        title = f"{_short(g['provider'])}, batch {g['batch']}"
        models = [m for m in g["models"] if m.get("latencies_ms")]
        if not models:
            continue
        colour = {m["label"]: _colour(labels.index(m["label"]) if m["label"] in labels else i)
                  for i, m in enumerate(models)}
        runs = [np.asarray(m["latencies_ms"], float) for m in models]
        lo, hi, log = latency_axis(runs)

        # --- histograms, one row per model, one shared axis over p1-p99
        fig = Figure(figsize=(8.5, 0.6 + 1.45 * len(models)))
        axes = fig.subplots(len(models), 1, sharex=True, squeeze=False)[:, 0]
        bins = np.geomspace(lo, hi, 60) if log else np.linspace(lo, hi, 60)
        beyond = []
        for ax, m, ms in zip(axes, models, runs):
            inside = ms[(ms >= lo) & (ms <= hi)]
            c = colour[m["label"]]
            counts = ax.hist(inside, bins=bins, color=c, alpha=0.75, edgecolor=c)[0]
            p10, p50, p90, p99 = np.percentile(ms, [10, 50, 90, 99])
            ax.axvspan(p10, p90, color=c, alpha=0.08, lw=0)
            ax.axvline(p50, color="#222", linestyle="--", linewidth=1)
            ax.text(0.995, 0.92, f"{m['label']}\np50 {_ms(p50)} · p90 {_ms(p90)} · p99 {_ms(p99)} ms",
                    transform=ax.transAxes, ha="right", va="top", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5})
            ax.set_ylabel("runs", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.set_ylim(0, max(float(counts.max()) if len(counts) else 0, 1) * 1.6)  # room for the label
            below, above = int((ms < lo).sum()), int((ms > hi).sum())
            if above or below:
                beyond.append(f"{m['label']}: {above} run(s) ({100 * above / len(ms):.1f} %) above {_ms(hi)} ms, "
                              f"up to {_ms(float(ms.max()))} ms" + (f"; {below} below {_ms(lo)} ms" if below else ""))
        axes[0].set_xlim(lo, hi)
        if log:
            axes[0].set_xscale("log")
            _log_ticks(axes[-1])
        axes[-1].set_xlabel("latency (ms)" + (", log scale" if log else "")
                            + "; dashed: median, shaded: p10-p90")
        fig.suptitle(f"Latency distribution ({title})", fontsize=11)
        fig.tight_layout()
        cap = (f"Latency distribution, {title}: axis {_ms(lo)}-{_ms(hi)} ms, from the lowest p1 to the highest p99 "
               "of the models' runs" + (" (log scale: p99/p1 > 10)" if log else "") + ". ")
        cap += ("Outliers not drawn: " + "; ".join(beyond) + "." if beyond else "No run outside the axis.")
        plots.append({"title": f"Latency distribution, {title}", "png": _png(fig), "caption": cap,
                      "axis_ms": [lo, hi], "log": log})

        # --- latency over time: rolling median with p10-p90 band per model
        fig = Figure(figsize=(8.5, 3.0))
        ax = fig.add_subplot(1, 1, 1)
        tops, bottoms, maxes, window = [], [], [], 1
        for m, ms in zip(models, runs):
            b = rolling_bands(ms)
            window = b["window"]
            c = colour[m["label"]]
            ax.fill_between(b["x"], b["p10"], b["p90"], color=c, alpha=0.2, lw=0)
            ax.plot(b["x"], b["median"], color=c, linewidth=1.4, label=f"{m['label']} (median {_ms(float(np.median(ms)))} ms)")
            tops.append(max(b["p90"]))
            bottoms.append(min(b["p10"]))
            maxes.append(f"{m['label']} {_ms(float(ms.max()))} ms")
        top, bottom = max(tops), min(bottoms)
        if bottom > 0 and top / bottom > LOG_SPREAD:
            ax.set_yscale("log")
            ax.set_ylim(bottom / 1.3, top * 1.3)
            _log_ticks(ax, "y")
        else:
            ax.set_ylim(0, top * 1.15 or 1)
        ax.set_xlim(0, max(len(ms) for ms in runs))
        block = g.get("block") or 1
        ax.set_xlabel(f"timed run of each model (interleaved in blocks of {block}: the same x is about the same moment)",
                      fontsize=8)
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"Latency over time ({title}): median of each {window} runs, band p10-p90", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
        fig.tight_layout()
        plots.append({"title": f"Latency over time, {title}", "png": _png(fig),
                      "caption": (f"Latency over time, {title}: a line is the median of {window} consecutive runs, the band "
                                  "their p10-p90; drift shows as all lines moving together. Single slow runs above the "
                                  "band are not drawn (slowest: " + ", ".join(maxes) + ").")})

    # --- size vs median latency
    pts = [(g, i, m) for g in rep["groups"] for i, m in enumerate(g["models"]) if m.get("latency")]
    if pts:
        fig = Figure(figsize=(6.5, 3.4))
        ax = fig.add_subplot(1, 1, 1)
        markers = "osD^v<>"
        for gi, g in enumerate(rep["groups"]):
            for i, m in enumerate(g["models"]):
                c = _colour(labels.index(m["label"]) if m["label"] in labels else i)
                ax.scatter([m["file_bytes"] / 1e6], [m["latency"]["p50_ms"]], s=60, color=c, edgecolors="k",
                           marker=markers[gi % len(markers)], zorder=3,
                           label=f"{m['label']}" + (f" ({_short(g['provider'])}, batch {g['batch']})"
                                                    if len(rep["groups"]) > 1 else ""))
        sizes = [m["file_bytes"] for _, _, m in pts]
        if min(sizes) > 0 and max(sizes) / min(sizes) > 20:
            ax.set_xscale("log")
            ax.margins(x=0.15)
        else:
            ax.set_xlim(0, max(sizes) / 1e6 * 1.15 or 1)
        ax.set_ylim(0, max(m["latency"]["p50_ms"] for _, _, m in pts) * 1.2 or 1)
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title("Size vs median latency (lower left is better)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
        plots.append({"title": "Size vs latency", "png": _png(fig), "caption": "Size vs median latency of each model."})
    fid = _fidelity_plot(rep)
    if fid:
        plots.append(fid)
    return plots


def _fidelity_plot(rep: dict) -> dict | None:
    """``bench --fidelity``: task metric against latency ratio, marker area by file size — the
    architectures side by side (original, pruned, low-rank, distilled, each with or without int8)."""
    from matplotlib.figure import Figure

    fid = [f for f in rep.get("fidelity") or [] if not f.get("error")]
    g = rep["groups"][0] if rep.get("groups") else None
    if not fid or g is None:
        return None
    by_label = {m["label"]: m for m in g["models"]}
    for key, what in (("accuracy_pct", "accuracy (%)"), ("top1_agreement_pct", f"top-1 agreement with {fid[0]['label']} (%)"),
                      ("mean_cosine", f"mean cosine with {fid[0]['label']}")):
        pts = [(f, by_label.get(f["label"])) for f in fid]
        pts = [(f, m) for f, m in pts if m and f.get(key) is not None and m.get("latency_ratio")]
        if len(pts) == len(fid):
            break
    else:
        return None
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    biggest = max(m["file_bytes"] for _, m in pts) or 1
    labels = list(rep.get("config", {}).get("labels") or [])
    for i, (f, m) in enumerate(pts):
        c = _colour(labels.index(f["label"]) if f["label"] in labels else i)
        ax.scatter([m["latency_ratio"]], [f[key]], s=40 + 460 * m["file_bytes"] / biggest, color=c, edgecolors="k",
                   alpha=0.85, zorder=3, label=f"{f['label']} ({_fmt_bytes(m['file_bytes'])})")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--", zorder=1)
    ax.axhline(pts[0][0][key], color="grey", lw=0.8, ls="--", zorder=1)
    xs = [m["latency_ratio"] for _, m in pts]
    ax.set_xlim(min(xs + [1.0]) * 0.85, max(xs + [1.0]) * 1.15)
    ys = [f[key] for f, _ in pts]
    pad = (max(ys) - min(ys)) * 0.2 or abs(max(ys)) * 0.01 or 0.01
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xlabel(f"latency ratio vs {pts[0][0]['label']} ({_short(g['provider'])}, batch {g['batch']}; lower is faster)")
    ax.set_ylabel(what)
    ax.set_title("Task fidelity vs latency (upper left is better; marker area = file size)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=0.5)
    fig.tight_layout()
    n = max(f["n_samples"] for f, _ in pts)
    return {"title": "Task fidelity vs latency", "png": _png(fig),
            "caption": f"{what} on {n} samples of --data (CPU, as deployed) against the latency ratio; dashed: "
                       f"{pts[0][0]['label']}'s values."}


def _validate_plots(rep: dict) -> list[dict]:
    from matplotlib.figure import Figure

    names, vals = [], []
    for c in rep["checks"]:
        for o in c["outputs"]:
            names.append(f"{o['name']}\n{_short(c['provider'])}" + (" vs CPU" if c["kind"] == "providers" else ""))
            v = o["sqnr_db"]
            v = float(v) if not isinstance(v, str) else (200.0 if v == "inf" else -10.0)
            vals.append(min(v, 200.0))
    if not names:
        return []
    fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 2), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(vals)), vals, color=["#2a7" if v >= 20 else "#c33" for v in vals])
    ax.set_xticks(range(len(vals)), names, fontsize=7)
    ax.set_ylabel("SQNR (dB, 200 = identical)")
    ax.set_title("Output fidelity")
    return [{"title": "Output fidelity (SQNR per output)", "png": _png(fig),
             "caption": "Output fidelity: SQNR per output (green: at least 20 dB)."}]


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def _env(strict: bool = False):
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined if strict else jinja2.Undefined)
    env.filters["bytes"] = _fmt_bytes
    env.filters["num"] = _fmt
    env.filters["short"] = _short
    return env


def render_html(report: dict) -> str:
    """The HTML text of ``report`` (a ``to_dict()`` of a bench or validate result).

    Raises:
        OnnxCompressError: matplotlib or jinja2 is missing (with the install hint).
    """
    _require()
    plots = _bench_plots(report) if report.get("kind") == "bench" else _validate_plots(report)
    return _env(strict=True).get_template("report.html.j2").render(rep=report, plots=plots)


# --------------------------------------------------------------------------- optimize


def optimize_rows(rep: dict) -> list[dict]:
    """The before/after rows with the terminal's ratio column: ``{"label", "before", "after",
    "ratio"}`` (size "3.63× smaller", latency "1.37× slower", accuracy "+0.00 pp")."""
    b, a = rep["before"], rep["after"]
    sb, sa = b.get("file_bytes") or b["size_bytes"], a.get("file_bytes") or a["size_bytes"]
    rows = [{"label": "size", "before": _fmt_bytes(sb), "after": _fmt_bytes(sa),
             "ratio": ratio_text(sb, sa, "smaller", "larger")}]
    if b.get("compressed_bytes") and a.get("compressed_bytes"):
        rows.append({"label": "size (zlib)", "before": _fmt_bytes(b["compressed_bytes"]),
                     "after": _fmt_bytes(a["compressed_bytes"]),
                     "ratio": ratio_text(b["compressed_bytes"], a["compressed_bytes"], "smaller", "larger")})
    rows.append({"label": "nodes", "before": str(b["n_nodes"]), "after": str(a["n_nodes"]), "ratio": ""})
    rows.append({"label": "parameters", "before": str(b.get("parameters", "-")), "after": str(a.get("parameters", "-")),
                 "ratio": ""})
    rounded = bool(a.get("int8_initializers")) and not b.get("int8_initializers")
    rows.append({"label": "zero weights", "before": f"{b.get('sparsity_pct', '-')} %",
                 "after": f"{a.get('sparsity_pct', '-')} %", "ratio": "int8 rounding, not pruning" if rounded else ""})
    for v in rep.get("validation", []):
        prov = _short(v["provider"])
        lr, lc = v.get("latency_ms_reference"), v.get("latency_ms_candidate")
        if lr and lc:
            rows.append({"label": f"latency {prov} (median, ms)", "before": f"{lr:.3f}", "after": f"{lc:.3f}",
                         "ratio": ratio_text(lr, lc, "faster", "slower")})
        if v.get("accuracy_reference") is not None and v.get("accuracy_candidate") is not None:
            rows.append({"label": f"accuracy {prov}", "before": f"{v['accuracy_reference']:.2f} %",
                         "after": f"{v['accuracy_candidate']:.2f} %",
                         "ratio": f"{v['accuracy_candidate'] - v['accuracy_reference']:+.2f} pp"})
    cost = rep.get("cost")
    if cost and cost.get("stages"):
        slow = max(cost["stages"], key=lambda st: st["seconds"])
        rows.append({"label": "tool's own cost", "before": "",
                     "after": f"{sum(st['seconds'] for st in cost['stages']):.1f} s, peak {cost['peak_rss_mb'] / 1024:.2f} GB RSS",
                     "ratio": f"slowest: {slow['stage']} ({slow['seconds']:.1f} s)"})
    return rows


def kept_in_float(rep: dict) -> list[dict]:
    """Nodes left in float and why: ``{"node", "by", "reason"}`` from the passes' skips and the
    fallback's rounds."""
    fb = rep.get("fallback") or {}
    sq = fb.get("node_sqnr_db") or {}
    by_fallback = set(fb.get("kept_in_float", []))
    rows, seen = [], set()
    for p in rep.get("passes", []):
        if p["name"].startswith("quantize"):
            for s in p.get("skipped", []):
                if s["node"] not in by_fallback and (s["node"], s["reason"]) not in seen:
                    seen.add((s["node"], s["reason"]))
                    rows.append({"node": s["node"], "by": p["name"], "reason": s["reason"]})
    for n in fb.get("kept_in_float", []):
        why = "fallback: the gates failed with it in int8"
        if n in sq:
            why += f" (one-node SQNR {sq[n]:.1f} dB, among the lowest)"
        rows.append({"node": n, "by": "fallback", "reason": why})
    return rows


def _node_sqnr(rep: dict) -> dict[str, float]:
    sq: dict[str, float] = {}
    for p in rep.get("passes", []):
        s = (p.get("counts") or {}).get("node_sqnr_db")
        if isinstance(s, dict):
            sq.update({k: float(v) for k, v in s.items() if isinstance(v, (int, float))})
    sq.update({k: float(v) for k, v in ((rep.get("fallback") or {}).get("node_sqnr_db") or {}).items()})
    return sq


def _bar_labels(ax, bars, texts) -> None:
    for b, t in zip(bars, texts):
        ax.annotate(t, (b.get_x() + b.get_width() / 2, b.get_height()), textcoords="offset points", xytext=(0, 3),
                    ha="center", va="bottom", fontsize=8)


def _optimize_plots(rep: dict) -> list[dict]:
    """Bars of size and median latency before/after (ratio in each title), and the one-node SQNR
    of each int8 node (worst first) with the ones kept in float marked."""
    from matplotlib.figure import Figure

    plots = []
    b, a = rep["before"], rep["after"]
    sb, sa = b.get("file_bytes") or b["size_bytes"], a.get("file_bytes") or a["size_bytes"]
    lat = [v for v in rep.get("validation", []) if v.get("latency_ms_reference") and v.get("latency_ms_candidate")]
    fig = Figure(figsize=(3.0 * (1 + len(lat)) + 0.6, 3.0))
    axes = fig.subplots(1, 1 + len(lat), squeeze=False)[0]
    before_c, after_c = "#9e9e9e", "#1f77b4"

    def bars(ax, vals, unit, fmt, title):
        bs = ax.bar(["before", "after"], vals, color=[before_c, after_c], width=0.6)
        _bar_labels(ax, bs, [fmt(x) for x in vals])
        ax.set_ylim(0, max(vals) * 1.25 or 1)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)

    mb = sa < 1e6 and sb < 1e6
    scale, unit = (1024, "KiB") if mb else (1024 * 1024, "MiB")
    bars(axes[0], [sb / scale, sa / scale], f"file size ({unit})", lambda x: f"{x:.1f}",
         f"size: {ratio_text(sb, sa, 'smaller', 'larger')}")
    for ax, v in zip(axes[1:], lat):
        lr, lc = v["latency_ms_reference"], v["latency_ms_candidate"]
        bars(ax, [lr, lc], "median latency (ms)", lambda x: f"{x:.3g}",
             f"latency {_short(v['provider'])}: {ratio_text(lr, lc, 'faster', 'slower')}")
    fig.tight_layout()
    plots.append({"title": "size and latency before / after", "png": _png(fig),
                  "caption": "File size and median latency (quick in-process timing; use onnxcompress bench for "
                             "interleaved runs) before and after; lower is better."})

    sq_all = _node_sqnr(rep)
    sq = {n: v for n, v in sq_all.items() if _finite(v)}
    if sq:
        kept = {r["node"]: r["by"] for r in kept_in_float(rep)}
        limit = None
        for st in (rep.get("recipe") or {}).get("stages", []):
            if st.get("min_sqnr_db") is not None:
                limit = float(st["min_sqnr_db"])
        order = sorted(sq, key=lambda n: sq[n])
        shown = order[:30]
        fig = Figure(figsize=(8.5, 0.9 + 0.24 * len(shown)))
        ax = fig.add_subplot(1, 1, 1)
        ys = range(len(shown))[::-1]
        colours = ["#d62728" if kept.get(n) == "fallback" else "#ff7f0e" if n in kept else after_c for n in shown]
        ax.barh(list(ys), [sq[n] for n in shown], color=colours, height=0.7)
        ax.set_yticks(list(ys), [_label(n) for n in shown], fontsize=7)
        for y, n in zip(ys, shown):
            ax.annotate(f"{sq[n]:.1f}", (sq[n], y), textcoords="offset points", xytext=(3, 0), va="center", fontsize=7)
        if limit is not None:
            ax.axvline(limit, color="#d62728", linestyle="--", linewidth=1)
        ax.set_xlim(min(0, min(sq.values())), max(sq[n] for n in shown) * 1.12)
        ax.set_ylim(-0.7, len(shown) - 0.3)
        ax.set_xlabel("one-node output SQNR in int8 (dB, higher is closer to float)"
                      + (f"; dashed: {limit:g} dB, below stays float" if limit is not None else ""))
        ax.grid(axis="x", alpha=0.3)
        from matplotlib.patches import Patch

        handles = [Patch(color=after_c, label="int8")]
        if any(kept.get(n) == "fallback" for n in shown):
            handles.append(Patch(color="#d62728", label="kept in float by the fallback"))
        if any(n in kept and kept[n] != "fallback" for n in shown):
            handles.append(Patch(color="#ff7f0e", label="kept in float by its pass"))
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title("Per-node int8 error (worst first)", fontsize=10)
        fig.tight_layout()
        more = f"; {len(order) - len(shown)} more node(s) not shown, all above {sq[shown[-1]]:.1f} dB" \
            if len(order) > len(shown) else ""
        if len(sq_all) > len(sq):
            more += f"; {len(sq_all) - len(sq)} node(s) with an infinite SQNR (int8 exact, or a zero float output) not drawn"
        plots.append({"title": "per-node SQNR", "png": _png(fig),
                      "caption": "Each quantized node's output SQNR with only that node in int8, on calibration "
                                 f"data: the lowest are where int8 error comes from{more}."})
    return plots


def render_optimize_html(report: dict) -> str:
    """The HTML text of an ``optimize`` report (:func:`onnxcompress.optimize`'s ``report``).

    Raises:
        OnnxCompressError: matplotlib or jinja2 is missing (with the install hint).
    """
    _require()
    return _env().get_template("optimize.html.j2").render(rep=report, plots=_optimize_plots(report),
                                                          rows=optimize_rows(report), kept=kept_in_float(report))


def _tune_plots(rep: dict) -> list[dict]:
    """The trials as speed-up vs metric drop (marker area: size; the budget's bounds dashed; the
    Pareto set outlined, the chosen trial starred), and the per-node sensitivity (keep_float's order)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    plots = []
    b = rep["budget"]
    trials = [t for t in rep["trials"] if not t.get("error") and _finite(t.get("speedup")) and _finite(t.get("drop"))]
    if trials:
        pareto, chosen = set(rep.get("pareto") or []), rep.get("chosen")
        sizes = [t["size_bytes"] or 0 for t in trials]
        big = max(sizes) or 1
        fig = Figure(figsize=(8.0, 4.6))
        ax = fig.add_subplot(1, 1, 1)
        ok = "#2ca02c"
        for t in trials:
            feas = t.get("violation", 1) <= 0
            ax.scatter(t["speedup"], t["drop"], s=40 + 360 * (t["size_bytes"] or 0) / big,
                       color=ok if feas else "#9e9e9e", alpha=0.55 if feas else 0.4,
                       edgecolors="#222" if t["number"] in pareto else "none", linewidths=1.2, zorder=3)
            ax.annotate(str(t["number"]), (t["speedup"], t["drop"]), fontsize=7, ha="center", va="center", zorder=4)
        c = next((t for t in trials if t["number"] == chosen), None)
        if c is not None:
            ax.scatter(c["speedup"], c["drop"], marker="*", s=380, color="#d62728", edgecolors="#222", zorder=5)
        ax.axhline(b["max_drop"], color="#d62728", linestyle="--", linewidth=1)
        if b.get("min_speedup") is not None:
            ax.axvline(b["min_speedup"], color="#d62728", linestyle="--", linewidth=1)
        ax.axvline(1.0, color="#888", linewidth=0.8)
        lo = min(min(t["drop"] for t in trials), 0.0)
        hi = max(max(t["drop"] for t in trials), b["max_drop"])
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("speed-up over fp32 (fp32 latency / model latency; right is faster)")
        ax.set_ylabel(f"{b['metric']} drop vs fp32 (lower is better)")
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        handles = [Line2D([], [], marker="o", linestyle="", color=ok, alpha=0.6, label="meets the budget"),
                   Line2D([], [], marker="o", linestyle="", color="#9e9e9e", alpha=0.5, label="over budget"),
                   Line2D([], [], marker="o", linestyle="", color="white", markeredgecolor="#222", label="Pareto set"),
                   Line2D([], [], marker="*", linestyle="", color="#d62728", markersize=12, label="chosen"),
                   Line2D([], [], linestyle="--", color="#d62728", label="budget bounds")]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title("Trials: speed-up vs metric drop (marker area: file size; number: trial)", fontsize=10)
        fig.tight_layout()
        failed = len(rep["trials"]) - len(trials)
        plots.append({"title": "trials", "png": _png(fig),
                      "caption": "Each trial on the search half of the validation data. The chosen one is re-checked "
                                 "on the held-out half (the verdict above)." + (f" {failed} trial(s) produced no model and "
                                                                          "are not drawn." if failed else "")})
    allsens = rep.get("sensitivity") or []
    sens = [x for x in allsens if _finite(x.get("int8_sqnr_db"))]
    if sens:
        shown = sens[:30]
        vals = [x["int8_sqnr_db"] for x in shown]
        notes = [f"{v:.1f}" + (f"  (metric {x['metric_gain_in_float']:+.3g} in float)"
                               if x.get("metric_gain_in_float") is not None else "") for v, x in zip(vals, shown)]
        png = _ranked_bars([x["node"] for x in shown], vals, notes, vals, "#1f77b4",
                           (min(0, min(vals)), max(vals) * 1.35 or 1),
                           "one-node output SQNR in int8 (dB); top: the first kept in float by 'keep_float'",
                           "Per-node int8 sensitivity (keep_float's order)")
        plots.append({"title": "sensitivity", "png": png,
                      "caption": "Each node's output SQNR with only that node in int8, on calibration data, and "
                                 "for the lowest ones the budget's metric gained when only that node stays in "
                                 "float (search half). Nodes whose float version raises the metric come first, "
                                 "then the rest by SQNR; a trial with keep_float = k keeps the first k of this "
                                 "order in float"
                                 + (f" ({len(sens) - len(shown)} more not shown)." if len(sens) > len(shown) else ".")
                                 + (f" {len(allsens) - len(sens)} node(s) with an infinite SQNR (int8 exact, or a "
                                    "zero float output) are not drawn." if len(allsens) > len(sens) else "")})
    groups = [g for g in rep.get("prune_sensitivity") or [] if _finite(g.get("drop"))]
    if groups:
        shown = groups[:30]
        probe = rep.get("prune_probe_ratio", 0.5)
        vals = [g["drop"] for g in shown]
        notes = [f"{v:+.3g}  ({g['macs_share']:.0%} of the MACs, {g['channels']} channels"
                 + (f", cosine {g['cosine']:.4f}" if _finite(g.get("cosine")) else "") + ")" for v, g in zip(vals, shown)]
        png = _ranked_bars([g["group"] for g in shown], vals, notes, [max(v, 0) for v in vals], "#ff7f0e",
                           (min(0.0, min(vals)), (max(max(vals), 0.0) or 1.0) * 2.2),
                           f"{rep['budget']['metric']} drop with only this group pruned at {probe:.0%}; top: the first "
                           "left whole by prune_groups = spare-K",
                           "Per-group channel-pruning sensitivity (prune_groups' order)", zero_line=True)
        plots.append({"title": "prune_sensitivity", "png": png,
                      "caption": f"The dependency groups with the most MACs, each pruned alone at {probe:.0%} of its "
                                 "channels (least-squares repair included) and scored on the search half. Most "
                                 "sensitive first (equal drops: the lower output cosine first); a trial with "
                                 "prune_groups = spare-K leaves the first K whole and prunes the rest at its "
                                 "ratio; least-K prunes only the last K measured"
                                 + (f" ({len(groups) - len(shown)} more not shown)." if len(groups) > len(shown)
                                    else ".")})
    return plots


def _ranked_bars(names: list[str], vals: list[float], notes: list[str], at: list[float], color: str,
                 xlim: tuple[float, float], xlabel: str, title: str, zero_line: bool = False) -> str:
    """One horizontal bar per name, the first on top, each annotated with its note at ``at``
    (x, data units); the chart as a base64 PNG (the tune page's per-node and per-group charts)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 0.9 + 0.24 * len(vals)))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(vals)))[::-1]
    ax.barh(ys, vals, color=color, height=0.7)
    ax.set_yticks(ys, [_label(n) for n in names], fontsize=7)
    for y, x, note in zip(ys, at, notes):
        ax.annotate(note, (x, y), textcoords="offset points", xytext=(3, 0), va="center", fontsize=7)
    ax.set_xlim(*xlim)
    if zero_line:
        ax.axvline(0.0, color="#888", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _label(name: str) -> str:
    """A node name as a plot label: at most 42 characters, ``$`` escaped (matplotlib would read
    ``$...$`` as math and fail on what it cannot parse)."""
    name = name if len(name) <= 42 else "…" + name[-41:]
    return name.replace("$", r"\$")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v == v and v not in (float("inf"), float("-inf"))


def render_tune_html(report: dict) -> str:
    """The HTML text of a ``tune`` report (:func:`onnxcompress.tune.tune`'s ``report``).

    Raises:
        OnnxCompressError: matplotlib or jinja2 is missing (with the install hint).
    """
    from .tune import _describe

    _require()
    rows = []
    for t in sorted(report["trials"], key=lambda t: t["number"]):
        rows.append({**t, "recipe": _describe(t.get("options") or {}),
                     "feasible": not t.get("error") and (t.get("violation", 1) <= 0),
                     "pareto": t["number"] in (report.get("pareto") or []),
                     "chosen": t["number"] == report.get("chosen")})
    return _env().get_template("tune.html.j2").render(rep=report, plots=_tune_plots(report), rows=rows)


def write_html(report: dict, path: str | os.PathLike) -> None:
    """Write the self-contained HTML report (bench, validate, optimize or tune) atomically.

    Raises:
        OnnxCompressError: matplotlib/jinja2 missing, or the file cannot be written.
    """
    kind = report.get("kind")
    try:
        text = (render_html(report) if kind in ("bench", "validate") else render_tune_html(report) if kind == "tune"
                else render_optimize_html(report))
    except OnnxCompressError:
        raise
    except Exception as exc:  # a value matplotlib cannot draw: the page is lost, not the run
        from .errors import InternalError

        raise InternalError(f"{path}: cannot draw the HTML report ({type(exc).__name__}: {exc}); the JSON report "
                            "has the same content (report this)") from None
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise OnnxCompressError(f"{path}: cannot write HTML report ({exc.strerror or exc})") from None
