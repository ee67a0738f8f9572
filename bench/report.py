#!/usr/bin/env python3
"""Run every bench/bench_*.py and write docs/BENCHMARKS.md.

    python3 bench/report.py [--out docs/BENCHMARKS.md] [--timeout 1800] [--only sync ...]
                            [--replace]

Each benchmark runs as a subprocess with ``--json`` (its own output is echoed
as it runs) and a time limit.  A benchmark reports its figures on a last line
``BENCH-JSON {...}``::

    {"bench": "sync",
     "figures": [{"name": ..., "value": ..., "unit": ...,
                  "baseline_name": ..., "baseline": ..., "ratio": ...,
                  "target": ">= 0.7x", "met": true|false, "note": ...}, ...],
     "notes": ["why a target is missed, with the measured numbers", ...]}

``baseline``, ``ratio``, ``target``, ``met`` and ``note`` are optional; so is
``"section": {"title": ..., "lines": [...]}``, a section of its own in the
report (bench_profile's "Where the time goes").  A
benchmark that does not know ``--json`` is run again without it and its
output is kept in the report as it is.  The report holds the machine (CPU,
cores, memory, kernel, file system, Python, QEMU and libnbd versions), the
date, the git commit, one table with every figure, and each benchmark's
notes and full output.  Exit status 1 if any benchmark failed or timed out
(the report is written anyway, saying so).  With ``--only`` the report
keeps the figures, targets and sections of the benchmarks not run from the
report it replaces, as they were (``--replace``: only the ones run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
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
              "timed_out": timed_out, "figures": [], "notes": [], "sections": [],
              "json": with_json,
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
            if summary.get("section"):
                result["sections"].append(summary["section"])
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


def section_lines(r: dict) -> list[str]:
    """The sections a benchmark asked for (``"section": {"title", "lines"}``)."""
    out = []
    for sec in r["sections"]:
        out += [f"## {sec['title']}", "", f"<!-- from {r['file']} -->",
                f"From `{r['file']}` in this run (its output below has every figure):", ""]
        out += [f"- {line}" for line in sec.get("lines", [])]
        out.append("")
    return out


def bench_section(r: dict) -> list[str]:
    status = "timed out" if r["timed_out"] else (
        "ok" if r["returncode"] == 0 else f"exit status {r['returncode']}")
    out = [f"## {r['file']}", "",
           f"`{r['command']}`: {r['seconds']:.0f} s, {status}"
           + ("" if r["json"] else " (no --json option: output kept as is)") + ".", ""]
    if r["notes"]:
        out += ["Notes (from the benchmark, with this run's numbers):", ""]
        out += [f"- {n}" for n in r["notes"]]
        out.append("")
    out += ["```", r["output"].rstrip(), "```", ""]
    return out


def parse_report(text: str) -> dict:
    """An earlier report, cut into what ``render`` can keep of benchmarks not run now:
    the machine table, figure rows, target bullets and sections, by benchmark name."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            blocks.append((line[3:].strip(), []))
        elif blocks:
            blocks[-1][1].append(line)
    kept = {"machine": [], "rows": [], "missed": [], "failed": [], "sections": []}
    for title, lines in blocks:
        if title == "Machine and run":
            kept["machine"] = lines
        elif title == "Figures":
            for line in lines:
                if line.startswith("| ") and not line.startswith(("| bench |", "|---")):
                    kept["rows"].append((line[2:].split(" | ", 1)[0], line))
        elif title == "Targets":
            for line in lines:
                m = re.match(r"- (bench/bench_)?([\w-]+)(\.py)?: ", line)
                if m:
                    kept["failed" if m.group(1) else "missed"].append((m.group(2), line))
        else:
            m = re.match(r"bench/bench_([\w-]+)\.py$", title)
            owner = m.group(1) if m else next(
                (re.match(r"<!-- from bench/bench_([\w-]+)\.py -->", l).group(1)
                 for l in lines if re.match(r"<!-- from bench/bench_([\w-]+)\.py -->", l)),
                None)
            kept["sections"].append((owner, title, lines, m is not None))
    return kept


def updated_names(line: str) -> list[str]:
    """The benchmarks an "Updated by `report.py --only A B` ..." line names."""
    m = re.match(r"Updated by `report\.py --only ([\w\- ]+)`", line)
    return m.group(1).split() if m else []


def render(results: list[dict], started: datetime.datetime, load_start: str,
           kept: dict | None = None) -> str:
    """The report of ``results``; with ``kept`` (``parse_report`` of the earlier one)
    also what it held of every benchmark not in ``results``, as it was."""
    out = ["# Benchmarks", "",
           "Generated by `make bench` (`python3 bench/report.py`), which runs every "
           "`bench/bench_*.py`.  Each figure is compared with a baseline measured in the "
           "same run on the same machine; the ratio is value / baseline (for latencies "
           "and times per byte, lower is better).  Targets are the issues' targets.", "",
           "## Machine and run", ""]
    ran = {r["name"] for r in results}
    commit = git("rev-parse", "--short=12", "HEAD")
    dirty = changed_files()
    commit_cell = commit + (f" plus uncommitted changes to {', '.join(dirty)}" if dirty else "")
    if kept and kept["machine"]:
        old = [l for l in kept["machine"] if l.strip()
               and not l.startswith(("A load average", "Updated by", "*Updated by"))]
        # An earlier "Updated by" line stays while it speaks for a benchmark not run now.
        for line in kept["machine"]:
            if line.startswith("Updated by") and not set(updated_names(line)) <= ran:
                old += ["", line]
        names = ", ".join(sorted(ran))
        out += old + ["", f"Updated by `report.py --only {' '.join(sorted(ran))}` at "
                      f"{started:%Y-%m-%d %H:%M} UTC on git commit {commit_cell}, load average "
                      f"at start / end {load_start} / {load_average()}: the figures and "
                      f"sections of {names} are from that run, the others from the run in "
                      "the table above.", ""]
    else:
        out += ["| | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in machine()]
        out += [f"| date (UTC) | {started:%Y-%m-%d %H:%M} |",
                f"| git commit | {commit_cell} |",
                f"| total run time | {sum(r['seconds'] for r in results) / 60:.1f} min |",
                f"| load average at start / end | {load_start} / {load_average()} |", ""]
    out += ["A load average well above 0 at the start means other work shared the "
            "machine: a figure and its baseline are measured one after the other, so load "
            "that changes between them moves the ratio; read small differences as noise.", ""]

    rows = [(r["name"], figure_row(r["name"], f)) for r in results for f in r["figures"]]
    rows += [(r["name"], f"| {r['name']} | no machine-readable figures (see its output below) "
              "| | | | | |") for r in results if not r["figures"]]
    if kept:
        rows += [(b, line) for b, line in kept["rows"] if b not in ran]
    out += ["## Figures", "",
            "| bench | figure | value | baseline (same run) | ratio | target | met? |",
            "|---|---|---|---|---|---|---|"]
    out += [line for _, line in sorted(rows, key=lambda x: x[0])]
    out.append("")

    missed = [(r["name"], f"- {r['name']}: {f['name']} at {f['ratio']:.2f}x, target "
               f"{f['target']}") for r in results for f in r["figures"] if f.get("met") is False]
    failed = [(r["name"], f"- {r['file']}: " + ("timed out" if r["timed_out"] else
                                               f"exit status {r['returncode']}"))
              for r in results if r["returncode"] != 0 or r["timed_out"]]
    met = sum(1 for r in results for f in r["figures"] if f.get("met") is True)
    if kept:
        old_rows = [line for b, line in kept["rows"] if b not in ran]
        met += sum(1 for line in old_rows if line.rstrip().endswith("| met |"))
        missed += [(b, line) for b, line in kept["missed"] if b not in ran]
        failed += [(b, line) for b, line in kept["failed"] if b not in ran]
    missed.sort(key=lambda x: x[0])
    failed.sort(key=lambda x: x[0])
    out += ["## Targets", "", f"{met} of {met + len(missed)} targets met."]
    if missed:
        out += ["", "Not met:", ""] + [line for _, line in missed]
    if failed:
        out += ["", "Benchmarks that did not finish:", ""] + [line for _, line in failed]
    out.append("")

    extra = [(r["name"], section_lines(r)) for r in results if r["sections"]]
    benches = [(r["name"], bench_section(r)) for r in results]
    if kept:
        for owner, title, lines, is_bench in kept["sections"]:
            if owner in ran:
                continue
            (benches if is_bench else extra).append((owner or "", [f"## {title}"] + lines))
    for _, lines in sorted(extra, key=lambda x: x[0]) + sorted(benches, key=lambda x: x[0]):
        out += lines
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds one benchmark may run before it is stopped")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only these benchmarks (e.g. sync codec); the report keeps "
                         "what it held of the others (figures, targets, sections) as it was")
    ap.add_argument("--replace", action="store_true",
                    help="with --only: write a report of these benchmarks alone")
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
    kept = None
    if args.only and not args.replace and out.exists():
        kept = parse_report(out.read_text(encoding="utf-8"))
    tmp.write_text(render(results, started, load_start, kept), encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0 if all(r["returncode"] == 0 and not r["timed_out"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
