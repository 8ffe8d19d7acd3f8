"""The consolidated zoo report: JSON, a markdown table, and HTML with a Pareto chart per model.

The HTML comes from the template ``report.html`` next to this file (``string.Template``);
charts are drawn with matplotlib (Agg) and embedded as base64 PNG. Without matplotlib the
HTML is still written, with a note instead of the charts.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
import string
import threading
from pathlib import Path
from typing import Any

from .worker import write_json_atomic

TEMPLATE = Path(__file__).with_name("report.html")

#: Columns that do not depend on timing: the same inputs give the same values on any executor.
STABLE_COLUMNS = ("model", "recipe", "status", "kind", "bytes_before", "bytes_after", "nodes_before", "nodes_after",
                  "nodes_quantized", "nodes_skipped", "output_sha256")


def _f(x, fmt="{:.3g}", none="-"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _mb(b):
    return _f(b / 1e6 if b else None, "{:.2f}")


def _cells(r: dict) -> list[str]:
    acc = "-"
    if r.get("accuracy_candidate") is not None and r.get("accuracy_reference") is not None:
        acc = f"{r['accuracy_reference']:.1f}→{r['accuracy_candidate']:.1f}"
    return [
        f"{_mb(r.get('bytes_before'))}→{_mb(r.get('bytes_after'))}", _f(r.get("size_ratio"), "{:.2f}"),
        f"{_f(r.get('latency_ms_before'), '{:.2f}')}→{_f(r.get('latency_ms_after'), '{:.2f}')}",
        _f(r.get("speedup"), "{:.2f}"), _f(r.get("min_cosine"), "{:.5f}"), _f(r.get("max_rel_err")),
        _f(r.get("top1_agreement"), "{:.1f}"), acc, str(r.get("nodes_quantized", "-")),
    ]


HEAD = ["model", "recipe", "status", "MB before→after", "× smaller", "ms before→after", "× faster", "min cos",
        "max rel err", "top-1 %", "accuracy %", "int8 nodes", "wall s"]


def _status(r: dict) -> str:
    """``ok (budget met: ...)`` for a tune task that met its budget, ``ok (gates held)`` when the
    recipe's gates judged the model, ``ok (floor held)`` when only
    the default floor of int8 models did, ``written (DEGRADED ...)`` when the floor failed and
    ``accept_degraded`` wrote it, ``written (no gate)`` when nothing did (written and valid,
    but nobody said it is good enough), or the failure."""
    if r["status"] == "ok":
        what = {"floor": "ok (floor held)", "degraded": "written (DEGRADED: below the floor, accepted)",
                None: "written (no gate)", False: "written (no gate)"}.get(r.get("gated"), "ok (gates held)")
        t = r.get("tune") or {}
        if r.get("gated") == "budget":  # a tune task: the search met the manifest's budget
            drop = t.get("drop")
            what = f"ok (budget met: {t.get('metric')} drop {drop:.3g}, {t.get('trials')} trials)" \
                if isinstance(drop, (int, float)) else "ok (budget met)"
        return what if r.get("ran") else f"{what} (cached)"
    return f"FAILED ({r.get('kind') or 'error'})" + ("" if r.get("ran") else " (cached)")


def markdown(rep: dict) -> str:
    """The results table as markdown (failed rows carry their message)."""
    rows = rep["rows"]
    c = rep["counts"]
    lines = [f"# onnxcompress zoo: {Path(rep['manifest']).name}", "",
             f"{c['tasks']} tasks: {c['ok']} ok, {c['failed']} failed; {c['ran']} ran, {c['cached']} cached; "
             f"executor {rep['executor']}, jobs {rep['jobs']}, wall {rep['wall_s']} s.", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in rows:
        cells = [r["model"], r["recipe"], _status(r)]
        if r["status"] == "ok" or r.get("bytes_before"):
            cells += _cells(r)
        else:
            cells += ["-"] * 9
        cells.append(_f(r.get("wall_s"), "{:.1f}"))
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- **{r['model']} / {r['recipe']}** ({r.get('kind')}): {r.get('error', '')}".replace("\n", " ")
                  for r in failed]
    for n in rep.get("notes", []):
        lines.append(f"\n> note: {n}")
    return "\n".join(lines) + "\n"


def stable_table(rows: list[dict]) -> list[tuple]:
    """The timing-independent part of the results (to compare two runs or executors)."""
    def norm(r, k):
        v = r.get(k)
        return round(v, 4) if isinstance(v, float) else v
    return [tuple(norm(r, k) for k in STABLE_COLUMNS) + (_f(r.get("min_cosine"), "{:.4f}"),) for r in rows]


_mpl_lock = threading.Lock()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size and latency (smaller is better)."""
    front = []
    for i, (s, l) in enumerate(points):
        if not any((s2 <= s and l2 <= l) and (s2 < s or l2 < l) for j, (s2, l2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


#: the fidelity colour scale shared by every chart and the table: (lowest min cosine, label, colour),
#: fixed bins, so the same value has the same colour on every chart of every report
FIDELITY_BINS = ((0.9999, "≥ 0.9999", "#1a9850"), (0.999, "0.999 – 0.9999", "#91cf60"),
                 (0.99, "0.99 – 0.999", "#fee08b"), (0.95, "0.95 – 0.99", "#fc8d59"),
                 (-math.inf, "< 0.95", "#d73027"))
UNKNOWN_COLOUR = "#cccccc"
#: bumped when the charts change, so cached PNGs of an older look are redrawn
CHART_VERSION = "2"


def fidelity_colour(cos: float | None) -> str:
    """The colour of a min cosine on the shared scale (:data:`FIDELITY_BINS`); grey when unknown."""
    if cos is None or (isinstance(cos, float) and not math.isfinite(cos)):
        return UNKNOWN_COLOUR
    return next(c for lo, _, c in FIDELITY_BINS if cos >= lo)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(fig, ax, points: list[tuple[float, float]], texts: list[str], fontsize: float = 8) -> list:
    """Annotate each data point with its text where the text box overlaps no other label, no
    marker and stays inside the axes (greedy over 16 candidate offsets, the least overlap when
    none is free); far offsets get a thin leader line. Returns the annotations."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    px = [ax.transData.transform(p) for p in points]
    r = 7 * fig.dpi / 72  # marker radius, px
    markers = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in px]
    inside = ax.get_window_extent(renderer)
    near = [(7, -3, "left", "top"), (7, 3, "left", "bottom"), (-7, 3, "right", "bottom"), (-7, -3, "right", "top"),
            (0, 9, "center", "bottom"), (0, -9, "center", "top"), (9, 0, "left", "center"), (-9, 0, "right", "center")]
    cands = near + [(dx * 3, dy * 3, ha, va) for dx, dy, ha, va in near]
    placed, out = [], []
    order = sorted(range(len(points)), key=lambda i: (px[i][0], px[i][1]))
    for i in order:
        best = None
        for dx, dy, ha, va in cands:
            far = abs(dx) > 10 or abs(dy) > 10
            ann = ax.annotate(texts[i], points[i], textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                              fontsize=fontsize, zorder=5,
                              arrowprops={"arrowstyle": "-", "color": "#888", "lw": 0.6} if far else None)
            bb = ann.get_window_extent(renderer).expanded(1.04, 1.08)
            cost = sum(_overlap(bb, o) for o in placed) + sum(_overlap(bb, m) for j, m in enumerate(markers) if j != i)
            clipped = bb.width * bb.height - _overlap(bb, inside)
            cost += 2 * clipped + (0.5 if far else 0)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, bb)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])
        out.append(best[1])
    return out


def chart_png(model: str, rows: list[dict]) -> bytes | None:
    """Size (MB) vs latency (ms) of each recipe of one model, colour = min cosine on the shared
    fidelity scale (:data:`FIDELITY_BINS`, legend on every chart), with the original model and
    the Pareto front, labels placed so they do not collide; ``None`` when nothing to plot or no
    matplotlib."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("bytes_after") and r.get("latency_ms_after")]
    if not ok:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return None
    with _mpl_lock:
        fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=90)
        ref_lat = sorted(r["latency_ms_before"] for r in ok if r.get("latency_ms_before"))
        ref = None
        if ref_lat and ok[0].get("bytes_before"):
            ref = (ok[0]["bytes_before"] / 1e6, ref_lat[len(ref_lat) // 2])
            ax.scatter([ref[0]], [ref[1]], marker="s", s=70, c="#999999", edgecolors="k", zorder=3)
        pts = [(r["bytes_after"] / 1e6, r["latency_ms_after"]) for r in ok]
        cos = [r.get("min_cosine") for r in ok]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[fidelity_colour(c) for c in cos], s=80,
                   edgecolors="k", zorder=4)
        allp = pts + ([ref] if ref else [])
        front = pareto_front(allp)
        handles = [Line2D([], [], marker="o", linestyle="", markersize=8, markerfacecolor=colour,
                          markeredgecolor="k", label=label) for _, label, colour in FIDELITY_BINS]
        handles.append(Line2D([], [], marker="s", linestyle="", markersize=7, markerfacecolor="#999999",
                              markeredgecolor="k", label="original"))
        if len(front) > 1:
            xs, ys = [], []
            for i in front:
                if xs:
                    xs.append(allp[i][0])
                    ys.append(ys[-1])
                xs.append(allp[i][0])
                ys.append(allp[i][1])
            ax.plot(xs, ys, "--", color="#1f77b4", lw=1, zorder=2)
            handles.append(Line2D([], [], linestyle="--", color="#1f77b4", label="Pareto front"))
        ax.legend(handles=handles, title="min cosine", fontsize=8, title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_xlabel("model size (MB)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        xs_all, ys_all = [p[0] for p in allp], [p[1] for p in allp]
        xspan = (max(xs_all) - min(xs_all)) or max(xs_all) or 1
        yspan = (max(ys_all) - min(ys_all)) or max(ys_all) or 1
        ax.set_xlim(max(0.0, min(xs_all) - 0.25 * xspan), max(xs_all) + 0.45 * xspan)
        ax.set_ylim(max(0.0, min(ys_all) - 0.3 * yspan), max(ys_all) + 0.3 * yspan)
        fig.tight_layout()
        texts = [f"{r['recipe']}\ncos {_f(c, '{:.4f}')}" for r, c in zip(ok, cos)]
        place_labels(fig, ax, allp, texts + (["original"] if ref else []))
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
    return buf.getvalue()


def _chart_cached(model: str, rows: list[dict], cache: Path | None) -> bytes | None:
    """:func:`chart_png`, memoized on disk by the plotted values (a rerun that changed nothing
    does not even import matplotlib)."""
    import hashlib
    import json

    sig = CHART_VERSION + json.dumps([[r.get(k) for k in ("recipe", "status", "bytes_before", "bytes_after", "latency_ms_before",
                                          "latency_ms_after", "min_cosine")] for r in rows], default=str)
    path = None
    if cache is not None:
        path = cache / f"{model}-{hashlib.sha256((model + sig).encode()).hexdigest()[:16]}.png"
        if path.is_file():
            return path.read_bytes()
    png = chart_png(model, rows)
    if png and path is not None:
        with contextlib.suppress(OSError):
            cache.mkdir(exist_ok=True)
            for old in cache.glob(f"{model}-*.png"):
                old.unlink()
            _write_bytes(path, png)
    return png


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def html_report(rep: dict, chart_cache: Path | None = None) -> str:
    """The HTML report (from ``report.html``)."""
    rows = rep["rows"]
    c = rep["counts"]
    e = html.escape
    head = "".join(f'<th class="{"l" if i < 3 else ""}">{e(h)}</th>' for i, h in enumerate(HEAD))
    body = []
    for r in rows:
        cls = "failed" if r["status"] != "ok" else ("cached" if not r.get("ran") else "")
        cells = [f'<td class="l">{e(r["model"])}</td>', f'<td class="l">{e(r["recipe"])}</td>',
                 f'<td class="l status">{e(_status(r))}</td>']
        if r["status"] == "ok" or r.get("bytes_before"):
            vals = _cells(r)
            cells += [f"<td>{e(x)}</td>" for x in vals[:4]]
            sw = f'<span class="sw" style="background:{fidelity_colour(r.get("min_cosine"))}"></span>' \
                if r.get("min_cosine") is not None else ""
            cells.append(f'<td class="cos">{sw}{e(vals[4])}</td>')
            cells += [f"<td>{e(x)}</td>" for x in vals[5:]]
        else:
            cells.append(f'<td class="err" colspan="9">{e(str(r.get("error", "")))}</td>')
        cells.append(f"<td>{e(_f(r.get('wall_s'), '{:.1f}'))}</td>")
        body.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    charts = []
    import importlib.util

    have_mpl = importlib.util.find_spec("matplotlib") is not None
    for model in dict.fromkeys(r["model"] for r in rows):
        png = _chart_cached(model, [r for r in rows if r["model"] == model], chart_cache) if have_mpl else None
        if png:
            charts.append(f'<div class="chart"><img alt="{e(model)}: size vs latency" '
                          f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></div>')
        else:
            why = "matplotlib is not installed" if not have_mpl else "no successful task with size and latency"
            charts.append(f'<div class="chart"><b>{e(model)}</b>: no chart ({why})</div>')
    failed = [r for r in rows if r["status"] != "ok"]
    failures = ""
    if failed:
        failures = "<h2>Failures</h2><ul>" + "".join(
            f"<li><b>{e(r['model'])} / {e(r['recipe'])}</b> ({e(str(r.get('kind')))}): "
            f"<span class=\"err\">{e(str(r.get('error', '')))}</span>"
            + (f" &mdash; log: <code>{e(str(r['log']))}</code>" if r.get("log") else "") + "</li>"
            for r in failed) + "</ul>"
    notes = "".join(f'<p class="note">note: {e(n)}</p>' for n in rep.get("notes", []))
    meta = (f"onnxcompress {e(rep['tool']['version'])} &middot; manifest <code>{e(rep['manifest'])}</code> &middot; "
            f"executor {e(rep['executor'])}, jobs {e(str(rep['jobs']))}, {e(str(rep['threads_per_task']))} "
            f"ORT thread(s)/task &middot; started {e(rep['started'])}")
    summary = (f"<b>{c['tasks']}</b> tasks: <b>{c['ok']}</b> ok, <b>{c['failed']}</b> failed; "
               f"{c['ran']} ran this time, {c['cached']} cached; wall {rep['wall_s']} s.")
    legend = ('<p class="legend">min cosine (one scale for the table and every chart): ' + " ".join(
        f'<span class="sw" style="background:{c}"></span>{e(label)}' for _, label, c in FIDELITY_BINS)
        + f' <span class="sw" style="background:{UNKNOWN_COLOUR}"></span>unknown</p>')
    tpl = string.Template(TEMPLATE.read_text(encoding="utf-8"))
    return tpl.safe_substitute(title=e(f"onnxcompress zoo: {Path(rep['manifest']).name}"), meta=meta,
                               summary=summary, notes=notes, table=table, charts="\n".join(charts),
                               failures=failures, legend=legend)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(rep: dict, out: Path, manifest: Any = None) -> dict[str, Path]:
    """Write ``zoo_report.json``, ``zoo_report.md`` and ``zoo_report.html`` into ``out`` (atomically)."""
    paths = {"json": out / "zoo_report.json", "md": out / "zoo_report.md", "html": out / "zoo_report.html"}
    write_json_atomic(paths["json"], rep)
    _write_text(paths["md"], markdown(rep))
    _write_text(paths["html"], html_report(rep, chart_cache=out / "charts"))
    return paths
