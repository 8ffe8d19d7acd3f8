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
    """``ok (gates held)`` when the recipe's gates judged the model, ``ok (floor held)`` when only
    the default floor of int8 models did, ``written (DEGRADED ...)`` when the floor failed and
    ``accept_degraded`` wrote it, ``written (no gate)`` when nothing did (written and valid,
    but nobody said it is good enough), or the failure."""
    if r["status"] == "ok":
        what = {"floor": "ok (floor held)", "degraded": "written (DEGRADED: below the floor, accepted)",
                None: "written (no gate)", False: "written (no gate)"}.get(r.get("gated"), "ok (gates held)")
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


def chart_png(model: str, rows: list[dict]) -> bytes | None:
    """Size (MB) vs latency (ms) of each recipe of one model, colour = min cosine, with the
    original model and the Pareto front; ``None`` when nothing to plot or no matplotlib."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("bytes_after") and r.get("latency_ms_after")]
    if not ok:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with _mpl_lock:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
        ref_lat = sorted(r["latency_ms_before"] for r in ok if r.get("latency_ms_before"))
        ref = None
        if ref_lat and ok[0].get("bytes_before"):
            ref = (ok[0]["bytes_before"] / 1e6, ref_lat[len(ref_lat) // 2])
            ax.scatter([ref[0]], [ref[1]], marker="s", s=70, c="#999999", edgecolors="k", zorder=3)
            ax.annotate("original", ref, textcoords="offset points", xytext=(-10, 10), fontsize=8, color="#555")
        pts = [(r["bytes_after"] / 1e6, r["latency_ms_after"]) for r in ok]
        cos = [r.get("min_cosine") for r in ok]
        known = [c for c in cos if c is not None]
        vmin = min(min(known) if known else 0.99, 0.99)
        cmap = plt.get_cmap("RdYlGn")
        colours = [cmap((c - vmin) / max(1 - vmin, 1e-9)) if c is not None else "#cccccc" for c in cos]
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=colours, s=80, edgecolors="k", zorder=4)
        for r, p, c in zip(ok, pts, cos):
            ax.annotate(f"{r['recipe']}\ncos {_f(c, '{:.4f}')}", p, textcoords="offset points", xytext=(6, -4),
                        fontsize=8)
        allp = pts + ([ref] if ref else [])
        front = pareto_front(allp)
        if len(front) > 1:
            xs, ys = [], []
            for i in front:
                if xs:
                    xs.append(allp[i][0])
                    ys.append(ys[-1])
                xs.append(allp[i][0])
                ys.append(allp[i][1])
            ax.plot(xs, ys, "--", color="#1f77b4", lw=1, zorder=2, label="Pareto front")
            ax.legend(loc="upper right", fontsize=8)
        sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(vmin, 1.0))
        fig.colorbar(sm, ax=ax, label="fidelity (min cosine)")
        del sc
        ax.set_xlabel("model size (MB)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.margins(0.2)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
    return buf.getvalue()


def _chart_cached(model: str, rows: list[dict], cache: Path | None) -> bytes | None:
    """:func:`chart_png`, memoized on disk by the plotted values (a rerun that changed nothing
    does not even import matplotlib)."""
    import hashlib
    import json

    sig = json.dumps([[r.get(k) for k in ("recipe", "status", "bytes_before", "bytes_after", "latency_ms_before",
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
            cells += [f"<td>{e(x)}</td>" for x in _cells(r)]
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
    tpl = string.Template(TEMPLATE.read_text(encoding="utf-8"))
    return tpl.safe_substitute(title=e(f"onnxcompress zoo: {Path(rep['manifest']).name}"), meta=meta,
                               summary=summary, notes=notes, table=table, charts="\n".join(charts),
                               failures=failures)


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
