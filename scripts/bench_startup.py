"""Start-up cost of the CLI: wall time of `onnxcompress --help` and other light commands.

Each command runs as a child process ``--repeats`` times, the commands interleaved (A B C A B C)
so that the machine's drift hits them alike; the table gives the median and the fastest run, and
the bare interpreter and ``import onnx`` / ``import onnx_ir`` beside them to show what is ours.
Goal (issue "A newcomer's first hour"): ``onnxcompress --help`` under 1 s.

    python scripts/bench_startup.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 1.0


def cli() -> list[str]:
    exe = shutil.which("onnxcompress")
    return [exe] if exe else [sys.executable, "-m", "onnxcompress.cli"]


def cases() -> list[tuple[str, list[str]]]:
    model = ROOT / "models" / "digits_cnn.onnx"
    c = cli()
    return [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("python -c 'import onnx'", [sys.executable, "-c", "import onnx"]),
        ("python -c 'import onnx_ir'", [sys.executable, "-c", "import onnx_ir"]),
        ("onnxcompress --help", [*c, "--help"]),
        ("onnxcompress --version", [*c, "--version"]),
        ("onnxcompress bench --help", [*c, "bench", "--help"]),
        ("onnxcompress optimize --help", [*c, "optimize", "--help"]),
        (f"onnxcompress inspect {model.relative_to(ROOT)}", [*c, "inspect", str(model)]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs: dict[str, list[float]] = {name: [] for name, _ in cases()}
    for _ in range(args.repeats):
        for name, cmd in cases():
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, cwd=ROOT)
            runs[name].append(time.perf_counter() - t0)
            if r.returncode != 0:
                print(f"{name}: exit {r.returncode}\n{r.stderr.decode(errors='replace')[-400:]}", file=sys.stderr)
                return 1
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"{cpu}; python {platform.python_version()}; {args.repeats} runs each, interleaved\n")
    print("| command | median s | fastest s |\n|---|---|---|")
    rows = []
    for name, t in runs.items():
        rows.append({"command": name, "median_s": statistics.median(t), "min_s": min(t), "runs_s": t})
        print(f"| `{name}` | {statistics.median(t):.2f} | {min(t):.2f} |")
    help_s = statistics.median(runs["onnxcompress --help"])
    ok = help_s < GOAL_S
    print(f"\n`onnxcompress --help`: median {help_s:.2f} s, goal < {GOAL_S:.0f} s: {'met' if ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "rows": rows, "goal_met": ok}, indent=1))
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
