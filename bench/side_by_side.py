#!/usr/bin/env python3
"""bench/side_by_side.py: supervisor and nginx + gunicorn+UvicornWorker running at once, measured
in alternating short runs, with each run's CPU split by process kind.

The proxy scenario of bench/run measures each system for about a minute before the next: on a
shared machine whose speed drifts over minutes, that can move one system's figures by a third
(in two runs, supervisor measured right after granian cost 150-169 µs per request, measured
first 117-122 µs). Here both systems are up together (pinned like bench/run: servers on CPU 1,
the load generator on CPU 0) and measured in turns of a few seconds each, so both see the same
machine; each line also splits the CPU per request between the front (supervisor's HTTP worker,
nginx's worker) and the app processes behind it.

    bench/.venv/bin/python bench/side_by_side.py [--rate 5000] [--rounds 5] [--secs 5]
        [--apps 3]          app processes in every system
        [--switches]        also each kind's context switches per request (voluntary: it
                            slept; involuntary: it was preempted), from /proc/PID/status
        [--bin PATH]...     one supervisor per binary (default: target/release/supervisor)

Run bench/run once first (it builds supervisor and sets up nginx, oha and bench/.venv). All
traffic stays on 127.0.0.1; every process started is stopped, also on Ctrl-C.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError):
        return 0.0


def kind(pid: int) -> str:
    """What a process of a tree is: "front" (supervisor's HTTP worker, nginx's worker), "app"
    (a Python process with no child: uvicorn behind an app host, a gunicorn worker) or "other"
    (masters, app hosts)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return "other"
    if cmd[0].startswith("nginx: worker"):
        return "front"
    if len(cmd) > 1 and cmd[1] == "worker" and "--app" not in cmd:
        return "front"
    if "python" in Path(cmd[0]).name and len(h.process_tree(pid)) == 1:
        return "app"
    return "other"


def switches(pid: int) -> tuple[int, int]:
    """A process's voluntary and involuntary context switches so far."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return (int(fields["voluntary_ctxt_switches"]),
                int(fields["nonvoluntary_ctxt_switches"]))
    except (OSError, KeyError, ValueError):
        return (0, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=5000, help="req/s of GET / (default 5000)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=int, default=5, help="length of each run (default 5)")
    ap.add_argument("--apps", type=int, default=3, help="app processes per system (default 3)")
    ap.add_argument("--switches", action="store_true",
                    help="also print context switches per request by process kind")
    ap.add_argument("--bin", action="append", default=[], help="a supervisor binary; repeatable")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.secs <= 60 or not 1 <= args.rate <= 100_000:
        sys.exit("side_by_side: --rounds 1..=50, --secs 1..=60, --rate 1..=100000")
    if not 1 <= args.apps <= 16:
        sys.exit("side_by_side: --apps 1..=16")
    pin = h.Pinning.detect()
    app = [str(h.VENV / "bin" / "uvicorn"), "--app-dir", str(h.BENCH), "app:app",
           "--uds", "{socket}", "--log-level", "warning"]
    bins = args.bin or [str(h.supervisor_bin())]
    runs = {}
    try:
        for i, binary in enumerate(bins):
            os.environ["SUPERVISOR_BIN"] = binary
            system = h.System("supervisor", "supervisor", "supervisor",
                              {"limits.max_concurrent_requests": 1024}, app=app)
            runs[f"supervisor{i + 1 if len(bins) > 1 else ''}"] = system.start(args.apps, pin)
        runs["nginx+gunicorn"] = h.System("nginx-gunicorn", "nginx + gunicorn+uvicorn",
                                          "nginx-gunicorn").start(args.apps, pin)
        oha = h.oha_bin()
        results = {name: [] for name in runs}
        for rnd in range(args.rounds):
            for name, run in runs.items():
                pids = [p for root in run.roots for p in h.process_tree(root)]
                url = run.url + "/"
                subprocess.run(pin.load_prefix() + [oha, "-z", "1s", "-q", str(args.rate),
                                                    "--no-tui", url], capture_output=True)
                before = {p: cpu_seconds(p) for p in pids}
                switched = {p: switches(p) for p in pids}
                out = subprocess.run(
                    pin.load_prefix() + [oha, "-z", f"{args.secs}s", "-q", str(args.rate),
                                         "--latency-correction", "-c", "64", "--no-tui", url],
                    capture_output=True, text=True).stdout
                used = {p: cpu_seconds(p) - before[p] for p in pids}
                switched = {p: tuple(n - b for n, b in zip(switches(p), switched[p]))
                            for p in pids}
                served = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)) * args.secs
                p50 = float(re.search(r"50.00% in ([\d.]+) ms", out).group(1))
                p99 = float(re.search(r"99.00% in ([\d.]+) ms", out).group(1))
                split = {}
                for p, s in used.items():
                    split[kind(p)] = split.get(kind(p), 0.0) + s
                us = {k: v / served * 1e6 for k, v in split.items()}
                total = sum(us.values())
                results[name].append((p50, p99, total, us.get("front", 0.0), us.get("app", 0.0)))
                line = (f"round {rnd + 1} {name:16} p50 {p50:6.3f} ms  p99 {p99:7.3f} ms  "
                        f"CPU/req {total:6.1f} µs (front {us.get('front', 0):5.1f}, "
                        f"apps {us.get('app', 0):5.1f})")
                if args.switches:
                    for k in ("front", "app"):
                        vol = sum(switched[p][0] for p in pids if kind(p) == k) / served
                        inv = sum(switched[p][1] for p in pids if kind(p) == k) / served
                        line += f"  {k} switches/req {vol:4.2f} slept {inv:4.2f} preempted"
                print(line, flush=True)
        print("medians:")
        for name, rows in results.items():
            med = [statistics.median(r[i] for r in rows) for i in range(5)]
            print(f"  {name:16} p50 {med[0]:6.3f} ms  p99 {med[1]:7.3f} ms  CPU/req "
                  f"{med[2]:6.1f} µs (front {med[3]:5.1f}, apps {med[4]:5.1f})")
    finally:
        for run in runs.values():
            run.stop()


if __name__ == "__main__":
    main()
