#!/usr/bin/env python3
"""Run every bench/bench_*.py and write docs/BENCHMARKS.md.

    python3 bench/report.py [--out docs/BENCHMARKS.md] [--timeout 1800] [--only sync ...]

Each benchmark runs as a subprocess with ``--json`` (its own output is echoed
as it runs) and a time limit.  A benchmark reports its figures on a last line
``BENCH-JSON {...}``::

    {"bench": "sync",
     "figures": [{"name": ..., "value": ..., "unit": ...,
                  "baseline_name": ..., "baseline": ..., "ratio": ...,
                  "target": ">= 0.7x", "met": true|false, "note": ...}, ...],
     "notes": ["why a target is missed, with the measured numbers", ...]}

``baseline``, ``ratio``, ``target``, ``met`` and ``note`` are optional.  A
benchmark that does not know ``--json`` is run again without it and its
output is kept in the report as it is.  The report holds the machine (CPU,
cores, memory, kernel, file system, Python, QEMU and libnbd versions), the
date, the git commit, one table with every figure, and each benchmark's
notes and full output.  Exit status 1 if any benchmark failed or timed out
(the report is written anyway, saying so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
JSON_PREFIX = "BENCH-JSON "
#: After SIGINT (which lets a benchmark's finally blocks stop what it started)
#: a benchmark gets this long before SIGKILL.
INTERRUPT_GRACE = 30.0


# ---------------------------------------------------------------------------
# Running one benchmark

def run_bench(path: Path, timeout: float, with_json: bool = True) -> dict:
    """Run ``path`` (echoing its output); return its output, status and figures."""
    argv = [sys.executable, str(path)] + (["--json"] if with_json else [])
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if not line.startswith(JSON_PREFIX):
                sys.stdout.write("  " + line)
                sys.stdout.flush()

    thread = threading.Thread(target=reader, name=f"report-read-{path.stem}", daemon=True)
    thread.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(INTERRUPT_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    thread.join(10)
    proc.stdout.close()
    output = "".join(lines)
    if with_json and proc.returncode == 2 and "unrecognized arguments: --json" in output:
        return run_bench(path, timeout, with_json=False)
    result = {"name": path.stem.removeprefix("bench_"), "file": f"bench/{path.name}",
              "command": " ".join(["python3", f"bench/{path.name}"] + argv[2:]),
              "seconds": time.monotonic() - t0, "returncode": proc.returncode,
              "timed_out": timed_out, "figures": [], "notes": [], "json": with_json,
              "output": "".join(l for l in lines if not l.startswith(JSON_PREFIX))}
    for line in lines:
        if line.startswith(JSON_PREFIX):
            try:
                summary = json.loads(line[len(JSON_PREFIX):])
            except ValueError as err:
                result["notes"].append(f"unreadable {JSON_PREFIX.strip()} line: {err}")
                continue
            result["figures"] += summary.get("figures", [])
            result["notes"] += summary.get("notes", [])
    return result


# ---------------------------------------------------------------------------
# The machine

def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable ({err})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else "unavailable"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory() -> str:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def machine() -> list[tuple[str, str]]:
    tmp_fs = first_line(["stat", "-f", "-c", "%T", "/tmp"])
    return [
        ("CPU", cpu_model()),
        ("cores", str(os.cpu_count())),
        ("memory", memory()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("file system of /tmp (benchmark data)", tmp_fs),
        ("Python", platform.python_version()),
        ("QEMU", first_line(["qemu-storage-daemon", "--version"])),
        ("libnbd", first_line(["nbdcopy", "--version"])),
    ]


def git(*args: str) -> str:
    return first_line(["git", "-C", str(ROOT), *args])


def changed_files() -> list[str]:
    """Tracked files that differ from HEAD (the run measured them as they were)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "diff", "--name-only", "HEAD"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [f for f in out.stdout.split() if f != "docs/BENCHMARKS.md"]


# ---------------------------------------------------------------------------
# The report

def fmt_value(value, unit: str | None) -> str:
    if unit == "bytes" and isinstance(value, (int, float)):
        return f"{value / 1024 / 1024:.1f} MiB"
    if unit == "x":
        return f"{value}x"
    return f"{value} {unit}" if unit else str(value)


def figure_row(bench: str, fig: dict) -> str:
    baseline = ""
    if "baseline" in fig:
        baseline = f"{fig.get('baseline_name', '')}: {fmt_value(fig['baseline'], fig.get('unit'))}"
        if fig.get("unit") == "x":  # a ratio of ratios: the baseline is the reference 1.0
            baseline = fig.get("baseline_name", "")
    ratio = f"{fig['ratio']:.2f}x" if isinstance(fig.get("ratio"), (int, float)) else ""
    met = "" if "met" not in fig else ("met" if fig["met"] else "**not met**")
    name = fig["name"] + (f" ({fig['note']})" if fig.get("note") else "")
    cells = [bench, name, fmt_value(fig["value"], fig.get("unit")), baseline, ratio,
             fig.get("target", ""), met]
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def render(results: list[dict], started: datetime.datetime, load_start: str) -> str:
    out = ["# Benchmarks", "",
           "Generated by `make bench` (`python3 bench/report.py`), which runs every "
           "`bench/bench_*.py`.  Each figure is compared with a baseline measured in the "
           "same run on the same machine; the ratio is value / baseline (for latencies "
           "and times per byte, lower is better).  Targets are the issues' targets.", "",
           "## Machine and run", "",
           "| | |", "|---|---|"]
    commit = git("rev-parse", "--short=12", "HEAD")
    dirty = changed_files()
    out += [f"| {k} | {v} |" for k, v in machine()]
    out += [f"| date (UTC) | {started:%Y-%m-%d %H:%M} |",
            f"| git commit | {commit}" + (f" plus uncommitted changes to {', '.join(dirty)}"
                                           if dirty else "") + " |",
            f"| total run time | {sum(r['seconds'] for r in results) / 60:.1f} min |",
            f"| load average at start / end | {load_start} / {load_average()} |", "",
            "A load average well above 0 at the start means other work shared the "
            "machine: a figure and its baseline are measured one after the other, so load "
            "that changes between them moves the ratio; read small differences as noise.", ""]

    out += ["## Figures", "",
            "| bench | figure | value | baseline (same run) | ratio | target | met? |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        for fig in r["figures"]:
            out.append(figure_row(r["name"], fig))
        if not r["figures"]:
            out.append(f"| {r['name']} | no machine-readable figures (see its output below) "
                       "| | | | | |")
    out.append("")

    missed = [(r, f) for r in results for f in r["figures"] if f.get("met") is False]
    failed = [r for r in results if r["returncode"] != 0 or r["timed_out"]]
    out += ["## Targets", ""]
    met = sum(1 for r in results for f in r["figures"] if f.get("met") is True)
    out.append(f"{met} of {met + len(missed)} targets met.")
    if missed:
        out += ["", "Not met:", ""]
        out += [f"- {r['name']}: {f['name']} at {f['ratio']:.2f}x, target {f['target']}"
                for r, f in missed]
    if failed:
        out += ["", "Benchmarks that did not finish:", ""]
        out += [f"- {r['file']}: " + ("timed out" if r["timed_out"] else
                                      f"exit status {r['returncode']}") for r in failed]
    out.append("")

    for r in results:
        status = "timed out" if r["timed_out"] else (
            "ok" if r["returncode"] == 0 else f"exit status {r['returncode']}")
        out += [f"## {r['file']}", "",
                f"`{r['command']}`: {r['seconds']:.0f} s, {status}"
                + ("" if r["json"] else " (no --json option: output kept as is)") + ".", ""]
        if r["notes"]:
            out += ["Notes (from the benchmark, with this run's numbers):", ""]
            out += [f"- {n}" for n in r["notes"]]
            out.append("")
        out += ["```", r["output"].rstrip(), "```", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds one benchmark may run before it is stopped")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only these benchmarks (e.g. sync codec)")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    benches = sorted(BENCH_DIR.glob("bench_*.py"))
    if args.only:
        benches = [b for b in benches if b.stem.removeprefix("bench_") in args.only]
    results = []
    for path in benches:
        print(f"== bench/{path.name} (limit {args.timeout:.0f} s)", flush=True)
        results.append(run_bench(path, args.timeout))
        r = results[-1]
        print(f"== bench/{path.name}: {r['seconds']:.0f} s, "
              f"{'timed out' if r['timed_out'] else 'exit status %d' % r['returncode']}, "
              f"{len(r['figures'])} figures", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(render(results, started, load_start), encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0 if all(r["returncode"] == 0 and not r["timed_out"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
