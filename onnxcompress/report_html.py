"""One self-contained HTML report (tables + matplotlib plots as base64 PNG) from a report dict.

The page is rendered from the Jinja2 template ``templates/report.html.j2``; plots are drawn
with matplotlib's object API (no pyplot global state, no display needed) and embedded as
``<img src="data:image/png;base64,...">``, so the file opens anywhere, offline.

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


def _bench_plots(rep: dict) -> list[dict]:
    import numpy as np
    from matplotlib.figure import Figure

    plots = []
    for g in rep["groups"]:
        title = f"{_short(g['provider'])}, batch {g['batch']}"
        fig = Figure(figsize=(7.5, 3.4))
        ax = fig.add_subplot(1, 1, 1)
        all_ms = np.concatenate([np.asarray(m["latencies_ms"], float) for m in g["models"]])
        lo, hi = np.percentile(all_ms, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 60)
        for i, m in enumerate(g["models"]):
            ms = np.clip(np.asarray(m["latencies_ms"], float), bins[0], bins[-1])
            line = ax.hist(ms, bins=bins, histtype="step", linewidth=1.6, label=m["label"])[2][0]
            ax.axvline(m["latency"]["p50_ms"], color=line.get_edgecolor(), linestyle="--", linewidth=1)
        ax.set_xlabel("latency (ms); dashed: p50")
        ax.set_ylabel("runs")
        ax.set_title(f"Latency distribution ({title})")
        ax.legend(fontsize=8)
        plots.append({"title": f"Latency distribution, {title}", "png": _png(fig)})

        fig = Figure(figsize=(7.5, 2.8))
        ax = fig.add_subplot(1, 1, 1)
        for m in g["models"]:
            ax.plot(np.asarray(m["latencies_ms"], float), linewidth=0.8, label=m["label"])
        ax.set_xlabel("timed run (models interleaved in blocks of runs)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"Latency over time ({title}): drift hits all models alike")
        ax.legend(fontsize=8)
        plots.append({"title": f"Latency over time, {title}", "png": _png(fig)})

    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for g in rep["groups"]:
        xs = [m["file_bytes"] / 1e6 for m in g["models"]]
        ys = [m["latency"]["p50_ms"] for m in g["models"]]
        ax.scatter(xs, ys, label=f"{_short(g['provider'])}, batch {g['batch']}")
        for m, x, y in zip(g["models"], xs, ys):
            ax.annotate(m["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    sizes = [m["file_bytes"] for g in rep["groups"] for m in g["models"]]
    if min(sizes) > 0 and max(sizes) / min(sizes) > 20:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0, right=max(sizes) / 1e6 * 1.15 or None)
    ax.set_ylim(bottom=0, top=max(m["latency"]["p50_ms"] for g in rep["groups"] for m in g["models"]) * 1.15 or None)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title("Size vs latency")
    ax.legend(fontsize=8)
    plots.append({"title": "Size vs latency", "png": _png(fig)})
    return plots


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
    return [{"title": "Output fidelity (SQNR per output)", "png": _png(fig)}]


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


def render_html(report: dict) -> str:
    """The HTML text of ``report`` (a ``to_dict()`` of a bench or validate result).

    Raises:
        OnnxCompressError: matplotlib or jinja2 is missing (with the install hint).
    """
    _require()
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined)
    env.filters["bytes"] = _fmt_bytes
    env.filters["num"] = _fmt
    env.filters["short"] = _short
    plots = _bench_plots(report) if report.get("kind") == "bench" else _validate_plots(report)
    return env.get_template("report.html.j2").render(rep=report, plots=plots)


def _optimize_plots(rep: dict) -> list[dict]:
    """Size (MB) vs median latency (ms), before and after, per provider."""
    from matplotlib.figure import Figure

    plots = []
    b = rep["before"].get("file_bytes") or rep["before"]["size_bytes"]
    a = rep["after"].get("file_bytes") or rep["after"]["size_bytes"]
    for v in rep.get("validation", []):
        if not v.get("latency_ms_reference") or not v.get("latency_ms_candidate"):
            continue
        fig = Figure(figsize=(5.5, 3.6), dpi=100)
        ax = fig.add_subplot()
        for label, size, ms, colour in (("before", b, v["latency_ms_reference"], "#888"),
                                        ("after", a, v["latency_ms_candidate"], "#1f77b4")):
            ax.scatter([size / 1e6], [ms], s=60, color=colour, label=label)
            ax.annotate(label, (size / 1e6, ms), textcoords="offset points", xytext=(6, 4))
        ax.set_xlabel("size (MB)")
        ax.set_ylabel("median latency (ms)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=.3)
        fig.tight_layout()
        plots.append({"title": f"size vs latency on {_short(v['provider'])}", "png": _png(fig)})
    return plots


def render_optimize_html(report: dict) -> str:
    """The HTML text of an ``optimize`` report (:func:`onnxcompress.optimize`'s ``report``).

    Raises:
        OnnxCompressError: matplotlib or jinja2 is missing (with the install hint).
    """
    _require()
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    env.filters["bytes"] = _fmt_bytes
    env.filters["num"] = _fmt
    env.filters["short"] = _short
    return env.get_template("optimize.html.j2").render(rep=report, plots=_optimize_plots(report))


def write_html(report: dict, path: str | os.PathLike) -> None:
    """Write the self-contained HTML report (bench, validate or optimize) atomically.

    Raises:
        OnnxCompressError: matplotlib/jinja2 missing, or the file cannot be written.
    """
    text = render_html(report) if report.get("kind") in ("bench", "validate") else render_optimize_html(report)
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise OnnxCompressError(f"{path}: cannot write HTML report ({exc.strerror or exc})") from None
