"""bench/: side-by-side benchmarks of supervisor against nginx, granian and gunicorn+uvicorn.

Run through `bench/run` (which installs everything first):

    bench/run                 every scenario, full length (~30 minutes on 2 cores)
    bench/run --quick         every scenario, one short round each (smoke check, < 3 minutes),
                              results in bench/.build/results-quick
    bench/run hello balance   only these scenarios

Each scenario runs its systems interleaved (A B C, A B C, ...), keeps every raw measurement in
results/<scenario>.json and writes results/<scenario>.md (tables, medians, supervisor/peer
ratios) and results/<scenario>.png. All traffic goes to 127.0.0.1; every load run is bounded in
time; every process started is stopped by pid, also on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import lifecycle  # noqa: E402
import report  # noqa: E402

SCENARIOS = ["hello", "latency", "overload", "balance", "footprint", "lifecycle", "proxy",
             "redis"]

# A load generator that used this much of its CPU(s) may have been the bottleneck.
LOADGEN_BUSY_WARN = 0.90
# A measurement during which other processes used this much CPU is repeated (see interleave).
DISTURBED = 0.10


class Ctx:
    def __init__(self, args):
        self.quick = args.quick
        self.pin = h.Pinning.detect()
        self.out = Path(args.out)
        self.rounds = args.rounds or (1 if self.quick else 3)
        self.scale = args.scale or (0.1 if self.quick else 1.0)
        self.meta = machine_info(self.pin)
        self.hello_nginx_rps: float | None = None
        self.retries = 0 if self.quick else 2
        self.only = set(args.only.split(",")) if args.only else None
        self.quiet_wait = 0.0 if self.quick else 30.0

    def secs(self, full: float, minimum: float = 1.0) -> float:
        return max(minimum, round(full * self.scale, 1))

    @property
    def C(self) -> int:  # CPUs the servers may use
        return self.pin.server_cpu_count

    @property
    def default_workers(self) -> int:  # supervisor's default: 2 x CPU + 1
        return 2 * self.C + 1


# ---------------------------------------------------------------------------------------------
# Machine and versions


def _cmd_version(cmd: list[str], pattern: str = r"(\S*\d+\.\d+[\w.\-+]*)") -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (out.stdout + out.stderr).strip()
    m = re.search(pattern, text)
    return m.group(1) if m else text.splitlines()[0] if text else "?"


def machine_info(pin: h.Pinning) -> dict:
    from importlib import metadata

    cpu_model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    git = lambda *a: subprocess.run(["git", "-C", str(h.REPO), *a], capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "src", "worker", "Cargo.toml", "Cargo.lock"))
    sup_version = _cmd_version([str(h.supervisor_bin()), "--version"], r"(\d+\.\d+\.\d+\S*)")
    dirty_note = ""
    if os.environ.get("SUPERVISOR_REV"):  # bench/run --rev: built from that commit alone
        commit, dirty_note = os.environ["SUPERVISOR_REV"], ", built from that commit"
    elif os.environ.get("SUPERVISOR_BIN"):
        dirty_note = f", binary {os.environ['SUPERVISOR_BIN']}"
    elif dirty:
        dirty_note = ", with uncommitted changes in src/ or worker/"
    pkgs = {}
    for name in ["gunicorn", "uvicorn", "uvicorn-worker", "granian", "uvloop", "httptools",
                 "matplotlib"]:
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = "missing"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model,
        "cpus": h.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": f"Debian {debian}",
        "pinning": {"servers": pin.server_cpus, "load_generator": pin.load_cpus,
                    "note": pin.note},
        "versions": {
            "supervisor": f"{sup_version} ({commit}{dirty_note})",
            "nginx": _cmd_version([h.nginx_bin(), "-v"], r"nginx/(\S+)"),
            "wrk": _cmd_version([h.wrk_bin(), "-v"], r"wrk (\S+)"),
            "oha": _cmd_version([h.oha_bin(), "--version"], r"oha (\S+)"),
            "python": platform.python_version(),
            **pkgs,
        },
    }


# ---------------------------------------------------------------------------------------------
# Helpers shared by scenarios


def run_one(ctx: Ctx, label: str, fn):
    """Runs one measurement; a failure is recorded, logged and does not stop the scenario."""
    try:
        return fn()
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
        h.log(f"  !! {label}: {e}")
        return {"error": str(e)[:2000]}


def loadgen_check(res: h.LoadResult, pin: h.Pinning) -> dict:
    """How busy the load generator was: its own CPU time over wall time, per CPU it may use."""
    own = res.cpu_s / res.wall_s / pin.load_cpu_count if res.wall_s else 0.0
    return {
        "loadgen_cpu_util": round(own, 3),
        "loadgen_bound": own >= LOADGEN_BUSY_WARN,
        "server_cpus_busy": None if res.server_cpus_busy is None else round(res.server_cpus_busy, 3),
        "server_tree_cpu_s": round(res.server_cpu_s, 3),
        "other_processes_cpu": res.others,
        "tcp_retransmits": res.retransmits,
        **({} if res.companion_cpu_s is None
           else {"companion_cpu_s": round(res.companion_cpu_s, 3)}),
    }


def wrk_metrics(res: h.LoadResult, pin: h.Pinning) -> dict:
    d = res.data
    secs = d["duration_us"] / 1e6
    lat = {k: v / 1000.0 for k, v in d["latency_us"].items()}  # -> ms
    non2xx = d["errors"]["status"]
    out = {
        "requests": d["requests"], "duration_s": round(secs, 3),
        "rps": round(d["requests"] / secs, 1),
        "ok_rps": round((d["requests"] - non2xx) / secs, 1),
        "p50_ms": lat["p50"], "p90_ms": lat["p90"], "p99_ms": lat["p99"],
        "p99.9_ms": lat["p99.9"], "max_ms": lat["max"], "mean_ms": round(lat["mean"], 3),
        "non_2xx": non2xx,
        "socket_errors": {k: v for k, v in d["errors"].items() if k != "status"},
        **loadgen_check(res, pin),
    }
    if out["server_tree_cpu_s"] and d["requests"]:
        out["server_cpu_us_per_req"] = round(out["server_tree_cpu_s"] / d["requests"] * 1e6, 2)
    return out


def ms_pct(values: list[float], p: float):
    v = h.percentile(values, p)
    return None if v is None else round(v * 1000.0, 3)


def oha_metrics(res: h.LoadResult, pin: h.Pinning, duration: float,
                rate: float | None = None) -> dict:
    """Figures from oha's per-request records, split by status and by path."""
    recs = res.data["records"]
    summary = res.data["summary"]
    lat_all = [r[2] for r in recs]
    ok = [r[2] for r in recs if 200 <= r[1] < 300]
    rej = [r[2] for r in recs if r[1] == 503]
    other = [r for r in recs if not (200 <= r[1] < 300 or r[1] == 503)]
    # Throughput counts what finished inside the window: with -w, oha also waits for requests
    # still in flight at the deadline, and those are in the latency figures but not in req/s.
    in_window = [r for r in recs if r[3] <= duration]
    ok_in_window = sum(1 for r in in_window if 200 <= r[1] < 300)
    errors = summary.get("errorDistribution", {}) or {}
    n_err = sum(errors.values())
    n = len(recs)
    out = {
        "offered_rps": rate,
        "responses": n, "ok": len(ok), "rejected_503": len(rej), "other_status": len(other),
        "errors": n_err, "error_kinds": errors,
        "rps": round(len(in_window) / duration, 1), "ok_rps": round(ok_in_window / duration, 1),
        "share_503": round(len(rej) / n, 4) if n else None,
        "p50_ms": ms_pct(lat_all, 50), "p99_ms": ms_pct(lat_all, 99),
        "p99.9_ms": ms_pct(lat_all, 99.9),
        "max_ms": round(max(lat_all) * 1000, 3) if lat_all else None,
        "ok_p50_ms": ms_pct(ok, 50), "ok_p99_ms": ms_pct(ok, 99), "ok_p99.9_ms": ms_pct(ok, 99.9),
        "ok_max_ms": round(max(ok) * 1000, 3) if ok else None,
        "rej_p50_ms": ms_pct(rej, 50), "rej_p99_ms": ms_pct(rej, 99),
        "rej_max_ms": round(max(rej) * 1000, 3) if rej else None,
        **loadgen_check(res, pin),
    }
    if rate:
        out["achieved_fraction"] = round(len(in_window) / duration / rate, 3)
    by_path: dict[str, list[float]] = {}
    for path, _, lat, _ in recs:
        by_path.setdefault(path, []).append(lat)
    out["by_path"] = {
        p: {"n": len(v), "p50_ms": ms_pct(v, 50), "p99_ms": ms_pct(v, 99),
            "max_ms": round(max(v) * 1000, 3)} for p, v in by_path.items()
    }
    return out


def med(runs: list[dict], key: str):
    vals = [r[key] for r in runs if isinstance(r, dict) and r.get(key) is not None]
    m = h.median(vals)
    return None if m is None else round(m, 3)


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)


def header(ctx: Ctx, name: str, extra: dict) -> dict:
    rev = os.environ.get("SUPERVISOR_REV")
    command = "bench/run" + (f" --rev {rev}" if rev else "") + "".join(f" {a}" for a in sys.argv[1:])
    return {"scenario": name, "quick": ctx.quick, "rounds": ctx.rounds, "meta": ctx.meta,
            "command": command, "config": extra, "warnings": []}


def collect_warnings(result: dict, runs: list[dict], what: str) -> None:
    for r in runs:
        m = r.get("metrics") or {}
        tag = f"{what}: {r.get('system')} round {r.get('round')}"
        if r.get("error"):
            result["warnings"].append(f"{tag}: failed: {r['error'].splitlines()[0]}")
        for phase, mm in ([("", m)] if "loadgen_cpu_util" in m else m.items()):
            if not isinstance(mm, dict) or "loadgen_cpu_util" not in mm:
                continue
            others = [o for o in mm.get("other_processes_cpu") or [] if o["cpu"] >= 0.10]
            if others:
                result["warnings"].append(
                    f"{tag}{' ' + phase if phase else ''}: other processes used CPU meanwhile: "
                    + ", ".join(f"{o['comm']} (pid {o['pid']}) {o['cpu']:.0%}" for o in others))
            if mm.get("tcp_retransmits"):
                result["warnings"].append(
                    f"{tag}{' ' + phase if phase else ''}: the kernel retransmitted "
                    f"{mm['tcp_retransmits']} TCP segments meanwhile (a lost loopback segment "
                    f"waits >= 200 ms: tail spikes then are the kernel's, not the server's)")
            if mm.get("loadgen_bound"):
                result["warnings"].append(
                    f"{tag}{' ' + phase if phase else ''}: load generator used "
                    f"{mm['loadgen_cpu_util']:.0%} of its CPU: it may have been the bottleneck "
                    f"(the server's figure is then a lower bound)")


# ---------------------------------------------------------------------------------------------
# Systems


def sup(key: str, label: str, **settings) -> h.System:
    return h.System(key, label, "supervisor", settings)


NGINX = h.System("nginx", "nginx", "nginx")
GRANIAN = h.System("granian", "granian", "granian")
GUNICORN = h.System("gunicorn", "gunicorn+uvicorn", "gunicorn")
# The deployment supervisor replaces: nginx (one worker process, keep-alive upstream) in front of
# gunicorn+UvicornWorker on a Unix socket, all on the servers' CPUs.
NGINX_GUNICORN = h.System("nginx-gunicorn", "nginx + gunicorn+uvicorn", "nginx-gunicorn")


def disturbance(m) -> float:
    """The most CPU that other processes used during any load run of a measurement."""
    worst = 0.0
    if isinstance(m, dict):
        if "other_processes_cpu" in m:
            worst = sum(o["cpu"] for o in m["other_processes_cpu"] or [])
        for v in m.values():
            if isinstance(v, dict):
                worst = max(worst, disturbance(v))
    return worst


# Scenarios whose --quick smoke check leaves granian out (the other peer still runs).
QUICK_WITHOUT_GRANIAN = {"lifecycle", "overload"}


def interleave(ctx: Ctx, entries: list[tuple], measure, what: str) -> list[dict]:
    """Runs `measure(key, system, workers, round)` for every entry, round after round: A B C,
    A B C. The order inside a round rotates so no system always runs first. The machine may be
    shared: each measurement starts when other processes are quiet (waiting a bounded time), and
    one disturbed by them (>= DISTURBED of a CPU) is repeated, at most RETRIES times; every
    attempt is kept in the results, the least disturbed one counts."""
    if ctx.only:
        entries = [e for e in entries if e[0] in ctx.only]
    if ctx.quick and what in QUICK_WITHOUT_GRANIAN:
        # A smoke check of the longest scenarios needs one peer, not two (keeps --quick < 2 min).
        entries = [e for e in entries if not e[0].startswith("granian")]
    runs = []
    for rnd in range(1, ctx.rounds + 1):
        order = entries[(rnd - 1) % len(entries):] + entries[:(rnd - 1) % len(entries)]
        for key, system, workers in order:
            attempts = []
            for attempt in range(1 + ctx.retries):
                quiet = h.wait_for_quiet(ctx.quiet_wait) if ctx.quiet_wait else 0.0
                h.log(f"[{what}] round {rnd}/{ctx.rounds}: {key} (workers={workers})"
                      + (f", attempt {attempt + 1}" if attempt else "")
                      + (f" [others use {quiet:.0%} CPU]" if quiet >= 0.15 else ""))
                m = run_one(ctx, key, lambda: measure(key, system, workers, rnd))
                attempts.append(m)
                if "error" in m or disturbance(m) < DISTURBED:
                    break
            best = min(attempts, key=lambda m: (1 if "error" in m else 0, disturbance(m)))
            entry = {"system": key, "label": system.label, "workers": workers, "round": rnd,
                     "attempts": len(attempts)}
            if "error" in best:
                entry["error"] = best["error"]
            else:
                entry["metrics"] = best
                entry["disturbance"] = round(disturbance(best), 3)
            if len(attempts) > 1:
                entry["discarded_attempts"] = [a for a in attempts if a is not best]
            runs.append(entry)
    return runs


def by_system(runs: list[dict], key: str) -> list[dict]:
    return [r["metrics"] for r in runs if r["system"] == key and "metrics" in r]


# ---------------------------------------------------------------------------------------------
# Scenario 1: hello


def scenario_hello(ctx: Ctx) -> dict:
    C, D = ctx.C, ctx.default_workers
    conns = 64
    duration, warmup = ctx.secs(10, 1), ctx.secs(2, 0.5)
    # The host-wide cap (default 50) is lifted above the client's 64 connections: this scenario
    # measures serving, not admission (overload does that); every answer must be a 200.
    cap = {"limits.max_concurrent_requests": 1024}
    entries = [
        (f"supervisor-w{C}", sup("supervisor", f"supervisor (workers={C})", **cap), C),
        (f"supervisor-w{D}", sup("supervisor", f"supervisor (workers={D}, default)", **cap), D),
        (f"nginx-w{C}", NGINX, C),
        (f"granian-w{C}", GRANIAN, C),
        (f"gunicorn-w{C}", GUNICORN, C),
    ]
    # On a small machine wrk needs about as much CPU per request as nginx or supervisor, so with
    # one CPU each it is co-bottleneck (flagged). The "-quota" runs cap the servers at half their
    # CPUs (cgroup CPU quota) so that the server is the bottleneck and req/s compares the servers.
    quota = round(0.5 * C, 2)
    why_not = h.cpu_quota_supported()
    if why_not is None and not ctx.quick:
        entries += [
            (f"supervisor-w{C}-quota", sup("supervisor", f"supervisor (workers={C}), {quota} CPU",
                                           **cap), C),
            (f"supervisor-w{D}-quota", sup("supervisor",
                                           f"supervisor (workers={D}, default), {quota} CPU",
                                           **cap), D),
            (f"nginx-w{C}-quota", h.System("nginx", f"nginx, {quota} CPU", "nginx"), C),
        ]
    result = header(ctx, "hello", {
        "connections": conns, "duration_s": duration, "warmup_s": warmup, "path": "/",
        "load_generator": "wrk -t1 (closed loop)", "supervisor_settings": cap,
        "server_cpus": C,
        "quota_runs": (f"servers limited to {quota} CPU by a cgroup CPU quota (period "
                       f"{h.CFS_PERIOD_US} us) so that they, not wrk, are the bottleneck"
                       if why_not is None else f"not run: {why_not}")})

    def measure(key, system, workers, rnd):
        run = system.start(workers, ctx.pin, cpu_quota=quota if key.endswith("-quota") else None)
        try:
            h.wrk(run, "/", conns, warmup, ctx.pin)
            res = h.wrk(run, "/", conns, duration, ctx.pin)
            m = wrk_metrics(res, ctx.pin)
            m["cpu_quota"] = quota if run.cgroup else None
            return m
        finally:
            run.stop()

    runs = interleave(ctx, entries, measure, "hello")
    result["runs"] = runs
    rows = []
    for key, system, workers in entries:
        ms = by_system(runs, key)
        rows.append({
            "system": key, "label": system.label, "workers": workers, "n": len(ms),
            "rps": med(ms, "rps"), "rps_min": min((m["rps"] for m in ms), default=None),
            "rps_max": max((m["rps"] for m in ms), default=None),
            "p50_ms": med(ms, "p50_ms"), "p99_ms": med(ms, "p99_ms"),
            "p99.9_ms": med(ms, "p99.9_ms"), "max_ms": med(ms, "max_ms"),
            "non_2xx": sum(m["non_2xx"] for m in ms),
            "loadgen_cpu_util": med(ms, "loadgen_cpu_util"),
            "server_cpus_busy": med(ms, "server_cpus_busy"),
            "server_cpu_us_per_req": med(ms, "server_cpu_us_per_req"),
        })
    metrics = [("rps", "req/s"), ("p99_ms", "p99"), ("server_cpu_us_per_req", "CPU µs/req")]
    result["summary"] = {"rows": rows, "ratios": ratios_table(
        rows, [f"supervisor-w{C}", f"supervisor-w{D}"],
        [f"nginx-w{C}", f"granian-w{C}", f"gunicorn-w{C}"], metrics, runs) + ratios_table(
        rows, [f"supervisor-w{C}-quota", f"supervisor-w{D}-quota"], [f"nginx-w{C}-quota"],
        metrics, runs)}
    nginx = next(r for r in rows if r["system"] == f"nginx-w{C}")
    ctx.hello_nginx_rps = nginx["rps"]
    collect_warnings(result, runs, "hello")
    for r in rows:
        if r["non_2xx"]:
            result["warnings"].append(f"hello: {r['system']} answered {r['non_2xx']} non-2xx")
    return result


def ratios_table(rows, ours, peers, metrics, runs=None):
    """supervisor / peer for each metric: the ratio of the medians, and with `runs` also the
    median of the ratios within each round ("paired"): the machine's speed drifts between
    rounds, and systems measured back to back in one round share that drift."""
    by = {r["system"]: r for r in rows}
    out = []
    for o in ours:
        for p in peers:
            if o in by and p in by:
                row = {"supervisor": o, "peer": p, **{
                    label: ratio(by[o].get(k), by[p].get(k)) for k, label in metrics}}
                if runs:
                    for k, label in metrics:
                        per_round = []
                        for rnd in sorted({r["round"] for r in runs}):
                            a = [r["metrics"].get(k) for r in runs if r["system"] == o
                                 and r["round"] == rnd and "metrics" in r]
                            b = [r["metrics"].get(k) for r in runs if r["system"] == p
                                 and r["round"] == rnd and "metrics" in r]
                            if a and b and ratio(a[0], b[0]) is not None:
                                per_round.append(ratio(a[0], b[0]))
                        row[f"{label} paired"] = h.median(per_round)
                out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Scenario 2: latency at a fixed rate


def scenario_latency(ctx: Ctx) -> dict:
    C, D = ctx.C, ctx.default_workers
    duration, warmup = ctx.secs(10, 1), ctx.secs(2, 0.5)
    cap = {"limits.max_concurrent_requests": 1024}
    nginx_max = ctx.hello_nginx_rps
    source = "hello scenario of this run (median)"
    if not nginx_max:
        h.log("[latency] measuring nginx's max req/s (wrk, c=64)")
        run = NGINX.start(C, ctx.pin)
        try:
            h.wrk(run, "/", 64, warmup, ctx.pin)
            nginx_max = wrk_metrics(h.wrk(run, "/", 64, ctx.secs(6, 2), ctx.pin), ctx.pin)["rps"]
        finally:
            run.stop()
        source = "measured at the start of this scenario (wrk, c=64)"
    rate = round(nginx_max * 0.5)
    conns = 64
    entries = [
        (f"supervisor-w{C}", sup("supervisor", f"supervisor (workers={C})", **cap), C),
        (f"supervisor-w{D}", sup("supervisor", f"supervisor (workers={D}, default)", **cap), D),
        (f"nginx-w{C}", NGINX, C),
        (f"granian-w{C}", GRANIAN, C),
        (f"gunicorn-w{C}", GUNICORN, C),
    ]
    result = header(ctx, "latency", {
        "rate_rps": rate, "nginx_max_rps": nginx_max, "nginx_max_source": source,
        "connections": conns, "duration_s": duration, "warmup_s": warmup,
        "load_generator": "oha -q RATE --latency-correction (open loop)",
        "supervisor_settings": cap, "server_cpus": C})

    def measure(key, system, workers, rnd):
        run = system.start(workers, ctx.pin)
        try:
            h.wrk(run, "/", conns, warmup, ctx.pin)
            res = h.oha(run, "/", duration, ctx.pin, rate=rate, connections=conns, timeout_s=10)
            m = oha_metrics(res, ctx.pin, duration, rate)
            m.pop("by_path", None)
            return m
        finally:
            run.stop()

    runs = interleave(ctx, entries, measure, "latency")
    result["runs"] = runs
    rows = []
    for key, system, workers in entries:
        ms = by_system(runs, key)
        rows.append({
            "system": key, "label": system.label, "workers": workers, "n": len(ms),
            "offered_rps": rate, "achieved_rps": med(ms, "rps"),
            "achieved_fraction": med(ms, "achieved_fraction"),
            "p50_ms": med(ms, "p50_ms"), "p99_ms": med(ms, "p99_ms"),
            "p99.9_ms": med(ms, "p99.9_ms"), "max_ms": med(ms, "max_ms"),
            "errors": sum(m["errors"] for m in ms),
            "non_2xx": sum(m["responses"] - m["ok"] for m in ms),
            "loadgen_cpu_util": med(ms, "loadgen_cpu_util"),
            "server_cpus_busy": med(ms, "server_cpus_busy"),
        })
    result["summary"] = {"rows": rows, "ratios": ratios_table(
        rows, [f"supervisor-w{C}", f"supervisor-w{D}"],
        [f"nginx-w{C}", f"granian-w{C}", f"gunicorn-w{C}"],
        [("p50_ms", "p50"), ("p99_ms", "p99"), ("p99.9_ms", "p99.9")])}
    collect_warnings(result, runs, "latency")
    for r in rows:
        if r["achieved_fraction"] is not None and r["achieved_fraction"] < 0.95:
            result["warnings"].append(
                f"latency: {r['system']} served {r['achieved_fraction']:.0%} of the offered "
                f"{rate} req/s: the rate is above its capacity, so its latency is queueing time")
    return result


# ---------------------------------------------------------------------------------------------
# Scenario 3: overload


def scenario_overload(ctx: Ctx) -> dict:
    C, W = ctx.C, ctx.default_workers
    work_ms = 10
    path = f"/work?ms={work_ms}"
    d_unloaded, d_capacity, d_over = ctx.secs(5, 1), ctx.secs(6, 1), ctx.secs(10, 2)
    conns_capacity, conns_over = 8 * W, 256
    uncapped = {"limits.max_concurrent_requests": 1024, "worker.max_concurrent": 1024}
    entries = [
        ("supervisor", sup("supervisor", f"supervisor (workers={W}, cap)"), W),
        ("gunicorn", GUNICORN, W),
        ("granian", GRANIAN, W),
    ]
    result = header(ctx, "overload", {
        "path": path, "workers": W, "server_cpus": C,
        "unloaded": f"wrk c=1 closed loop, {d_unloaded}s",
        "capacity": f"wrk c={conns_capacity} closed loop, {d_capacity}s "
                    f"(supervisor with the cap lifted: {uncapped})",
        "overload": f"oha -q 3 x capacity --latency-correction -c {conns_over}, {d_over}s, "
                    f"in-flight requests waited for at the end (-w), 20 s timeout",
        "cap_rule": "limits.max_concurrent_requests = floor(capacity [req/s] x unloaded p50 "
                    "[s]), at least 1 (Little's law: the number of requests in flight when the "
                    "machine serves at capacity without queueing), from round 1",
    })
    caps: dict[str, int] = {}

    def measure(key, system, workers, rnd):
        out = {}
        # Phase 1: unloaded latency and capacity (supervisor with the cap lifted).
        first = (sup("supervisor", system.label, **uncapped) if system.kind == "supervisor"
                 else system)
        run = first.start(workers, ctx.pin)
        try:
            h.wrk(run, path, 1, 1, ctx.pin)
            out["unloaded"] = wrk_metrics(h.wrk(run, path, 1, d_unloaded, ctx.pin), ctx.pin)
            out["capacity"] = wrk_metrics(h.wrk(run, path, conns_capacity, d_capacity, ctx.pin),
                                          ctx.pin)
        finally:
            run.stop()
        capacity = out["capacity"]["ok_rps"]
        if system.kind == "supervisor":
            if "cap" not in caps:
                caps["cap"] = max(1, math.floor(capacity * out["unloaded"]["p50_ms"] / 1000.0))
            out["cap"] = caps["cap"]
            system = sup("supervisor", system.label,
                         **{"limits.max_concurrent_requests": caps["cap"]})
        # Phase 2: open loop at 3x capacity, on a fresh instance.
        rate = round(3 * capacity)
        run = system.start(workers, ctx.pin)
        try:
            res = h.oha(run, path, d_over, ctx.pin, rate=rate, connections=conns_over,
                        timeout_s=20, wait_ongoing=True)
            m = oha_metrics(res, ctx.pin, d_over, rate)
            m.pop("by_path", None)
            out["overload"] = m
        finally:
            run.stop()
        u = out["unloaded"]["p99_ms"]
        out["ok_p99_over_unloaded_p99"] = ratio(out["overload"]["ok_p99_ms"], u)
        return out

    runs = interleave(ctx, entries, measure, "overload")
    result["runs"] = runs
    result["config"]["cap"] = caps.get("cap")
    rows = []
    for key, system, workers in entries:
        ms = by_system(runs, key)
        un = [m["unloaded"] for m in ms]
        ca = [m["capacity"] for m in ms]
        ov = [m["overload"] for m in ms]
        rows.append({
            "system": key, "label": system.label, "workers": workers, "n": len(ms),
            "cap": caps.get("cap") if key == "supervisor" else None,
            "unloaded_p50_ms": med(un, "p50_ms"), "unloaded_p99_ms": med(un, "p99_ms"),
            "capacity_rps": med(ca, "ok_rps"), "offered_rps": med(ov, "offered_rps"),
            "goodput_rps": med(ov, "ok_rps"),
            "goodput_vs_capacity": ratio(med(ov, "ok_rps"), med(ca, "ok_rps")),
            "share_503": med(ov, "share_503"),
            "rej_p50_ms": med(ov, "rej_p50_ms"), "rej_p99_ms": med(ov, "rej_p99_ms"),
            "ok_p50_ms": med(ov, "ok_p50_ms"), "ok_p99_ms": med(ov, "ok_p99_ms"),
            "ok_max_ms": med(ov, "ok_max_ms"),
            "ok_p99_over_unloaded_p99": med(ms, "ok_p99_over_unloaded_p99"),
            "errors": sum(m["errors"] for m in ov),
            "loadgen_cpu_util": med(ov, "loadgen_cpu_util"),
        })
    result["summary"] = {"rows": rows, "ratios": ratios_table(
        rows, ["supervisor"], ["gunicorn", "granian"],
        [("goodput_rps", "goodput"), ("ok_p99_ms", "admitted p99"),
         ("ok_p99_over_unloaded_p99", "p99 growth")])}
    collect_warnings(result, runs, "overload")
    return result


# ---------------------------------------------------------------------------------------------
# Scenario 4: balance (accept modes)


def write_mix(path: Path, base: str, slow_ms: int) -> None:
    # oha picks a line at random for every request: 19 fast + 1 slow = 5% slow. The slow one
    # runs on the worker's event loop (`inline=1`), as a synchronous app holds its worker: the
    # case where the accept mode decides which requests wait behind it.
    lines = [f"{base}/"] * 19 + [f"{base}/work?ms={slow_ms}&inline=1"]
    path.write_text("\n".join(lines) + "\n")


def scenario_balance(ctx: Ctx) -> dict:
    workers, slow_ms = 5, 20
    d_closed, d_open, warmup = ctx.secs(6, 1), ctx.secs(6, 1), ctx.secs(1, 0.5)
    conns = 64
    base = {"limits.max_concurrent_requests": 1024}
    variants = [(f"{mode}-{conn}", mode, conn) for conn in ("keepalive", "close")
                for mode in ("reuseport", "shared")]
    entries = [(key, sup("supervisor", f"{mode}, {conn}", **base, **{"server.accept": mode}),
                workers) for key, mode, conn in variants]
    conn_of = {key: conn for key, _, conn in variants}
    result = header(ctx, "balance", {
        "workers": workers, "mix": f"95% GET /, 5% GET /work?ms={slow_ms}&inline=1 (random per request)",
        "closed": f"oha c={conns} closed loop, {d_closed}s",
        "open": f"oha -q RATE --latency-correction c={conns}, {d_open}s; RATE = 50% of the "
                f"closed-loop req/s of the first variant measured with the same connection "
                f"handling (keep-alive or close), so both accept modes get the same rate",
        "supervisor_settings": base, "server_cpus": ctx.C,
        "spread": "requests per worker from `supervisor status --json` before/after each run"})
    rates: dict[str, float] = {}

    def spread(before, after):
        b = {w["worker_id"]: w["requests"] for w in before["workers"]}
        per = sorted(((w["worker_id"], w["requests"] - b.get(w["worker_id"], 0))
                      for w in after["workers"]))
        counts = [c for _, c in per]
        mean = statistics.mean(counts) if counts else 0
        return {"per_worker": counts,
                "max_over_min": round(max(counts) / min(counts), 3) if counts and min(counts) else None,
                "cv": round(statistics.pstdev(counts) / mean, 3) if mean else None}

    def measure(key, system, w, rnd):
        close = conn_of[key] == "close"
        hdr = {"Connection": "close"} if close else None
        run = system.start(w, ctx.pin)
        mix = h.BUILD / f"mix-{run.port}.txt"
        write_mix(mix, run.url, slow_ms)
        out = {}
        try:
            h.oha(run, "/", warmup, ctx.pin, connections=conns, urls_file=mix, headers=hdr,
                  disable_keepalive=close, timeout_s=10)
            for phase in ("closed", "open"):
                if phase == "open":
                    rate = rates.setdefault(conn_of[key], round(out["closed"]["rps"] * 0.5))
                else:
                    rate = None
                before = h.supervisor_status(run)
                res = h.oha(run, "/", d_closed if phase == "closed" else d_open, ctx.pin,
                            rate=rate, connections=conns, urls_file=mix, headers=hdr,
                            disable_keepalive=close, timeout_s=10)
                after = h.supervisor_status(run)
                m = oha_metrics(res, ctx.pin, d_closed if phase == "closed" else d_open, rate)
                fast = m["by_path"].get("/", {})
                slow = m["by_path"].get("/work", {})
                m["fast_p99_ms"], m["fast_max_ms"] = fast.get("p99_ms"), fast.get("max_ms")
                m["slow_p99_ms"] = slow.get("p99_ms")
                m["spread"] = spread(before, after)
                out[phase] = m
        finally:
            run.stop()
            mix.unlink(missing_ok=True)
        return out

    runs = interleave(ctx, entries, measure, "balance")
    result["runs"] = runs
    result["config"]["open_rates_rps"] = rates
    rows = []
    for key, system, w in entries:
        ms = by_system(runs, key)
        for phase in ("closed", "open"):
            ph = [m[phase] for m in ms if phase in m]
            rows.append({
                "system": key, "label": system.label, "load": phase, "n": len(ph),
                "rps": med(ph, "rps"),
                "offered_rps": rates.get(conn_of[key]) if phase == "open" else None,
                "p50_ms": med(ph, "p50_ms"), "p99_ms": med(ph, "p99_ms"),
                "max_ms": med(ph, "max_ms"),
                "fast_p99_ms": med(ph, "fast_p99_ms"), "fast_max_ms": med(ph, "fast_max_ms"),
                "slow_p99_ms": med(ph, "slow_p99_ms"),
                "spread_max_over_min": h.median([m["spread"]["max_over_min"] for m in ph
                                                 if m["spread"]["max_over_min"]]),
                "spread_cv": h.median([m["spread"]["cv"] for m in ph if m["spread"]["cv"] is not None]),
                "per_worker_example": ph[len(ph) // 2]["spread"]["per_worker"] if ph else None,
                "errors": sum(m["errors"] for m in ph),
                "non_2xx": sum(m["responses"] - m["ok"] for m in ph),
            })
    result["summary"] = {"rows": rows, "decision": balance_decision(rows)}
    collect_warnings(result, runs, "balance")
    return result


def balance_decision(rows: list[dict]) -> dict:
    """reuseport / shared ratios per connection mode and load; the mode with the lower tail
    (p99 of all requests and of the fast ones, and max) in most comparisons wins."""
    by = {(r["system"], r["load"]): r for r in rows}
    comparisons, votes = [], {"reuseport": 0, "shared": 0}
    for conn in ("keepalive", "close"):
        for load in ("closed", "open"):
            a, b = by.get((f"reuseport-{conn}", load)), by.get((f"shared-{conn}", load))
            if not a or not b:
                continue
            c = {"connections": conn, "load": load}
            for k in ("p99_ms", "fast_p99_ms", "max_ms", "spread_cv"):
                c[f"{k} reuseport/shared"] = ratio(a.get(k), b.get(k))
                r = c[f"{k} reuseport/shared"]
                if r is not None and k != "spread_cv" and abs(r - 1) > 0.05:
                    votes["reuseport" if r < 1 else "shared"] += 1
            comparisons.append(c)
    winner = ("reuseport" if votes["reuseport"] > votes["shared"] else
              "shared" if votes["shared"] > votes["reuseport"] else "tie")
    return {"comparisons": comparisons, "votes": votes, "lower_tail": winner}


# ---------------------------------------------------------------------------------------------
# Scenario 5: footprint


def scenario_footprint(ctx: Ctx) -> dict:
    ns = [1, ctx.default_workers] if ctx.quick else [1, ctx.default_workers, 5 if ctx.default_workers != 5 else 7]
    ns = sorted(set(ns))
    systems = [("supervisor", sup("supervisor", "supervisor")), ("gunicorn", GUNICORN),
               ("granian", GRANIAN), ("nginx", NGINX)]
    entries = [(f"{k}-w{n}", s, n) for n in ns for k, s in systems]
    result = header(ctx, "footprint", {
        "workers": ns, "start": "spawn to the first 200 of GET / (polled every 2 ms)",
        "memory": "after every worker is up and 20 requests were served, 1 s idle: sum of Pss "
                  "over the whole process tree from /proc/PID/smaps_rollup",
        "per_worker": "least-squares slope of tree PSS over the worker counts"})

    def measure(key, system, workers, rnd):
        run = system.start(workers, ctx.pin)
        try:
            for _ in range(20):
                h.http_get(run.port, "/")
            time.sleep(1.0)
            mem = h.tree_memory(run.pid)
            return {"first_200_ms": round((run.first_200 - run.started) * 1000, 1),
                    "all_workers_ms": round((run.all_ready - run.started) * 1000, 1), **mem}
        finally:
            run.stop()

    runs = interleave(ctx, entries, measure, "footprint")
    result["runs"] = runs
    rows = []
    for key, system in systems:
        per_n = {}
        for n in ns:
            ms = by_system(runs, f"{key}-w{n}")
            per_n[n] = {"pss_kib": med(ms, "pss_kib"), "rss_kib": med(ms, "rss_kib"),
                        "uss_kib": med(ms, "uss_kib"), "processes": med(ms, "processes"),
                        "first_200_ms": med(ms, "first_200_ms"),
                        "all_workers_ms": med(ms, "all_workers_ms")}
        pts = [(n, v["pss_kib"]) for n, v in per_n.items() if v["pss_kib"] is not None]
        slope = intercept = None
        if len(pts) >= 2:
            mx = statistics.mean(n for n, _ in pts)
            my = statistics.mean(p for _, p in pts)
            den = sum((n - mx) ** 2 for n, _ in pts)
            slope = sum((n - mx) * (p - my) for n, p in pts) / den if den else None
            intercept = my - slope * mx if slope is not None else None
        rows.append({"system": key, "label": system.label, "by_workers": per_n,
                     "pss_per_worker_kib": None if slope is None else round(slope, 1),
                     "pss_base_kib": None if intercept is None else round(intercept, 1)})
    by = {r["system"]: r for r in rows}
    ratios = []
    for peer in ("gunicorn", "granian", "nginx"):
        if peer not in by:
            continue
        row = {"peer": peer,
               "pss_per_worker": ratio(by["supervisor"]["pss_per_worker_kib"],
                                       by[peer]["pss_per_worker_kib"])}
        for n in ns:
            row[f"pss_total_w{n}"] = ratio(by["supervisor"]["by_workers"][n]["pss_kib"],
                                           by[peer]["by_workers"][n]["pss_kib"])
            row[f"first_200_w{n}"] = ratio(by["supervisor"]["by_workers"][n]["first_200_ms"],
                                           by[peer]["by_workers"][n]["first_200_ms"])
        ratios.append(row)
    result["summary"] = {"rows": rows, "ratios": ratios, "workers": ns}
    collect_warnings(result, runs, "footprint")
    return result


# ---------------------------------------------------------------------------------------------
# Scenario 7: proxy (the user's app behind supervisor)

# Every load of this scenario runs at a fixed rate (open loop, latency from when each request was
# due), the same for every system, except /sleep's throughput (closed loop, c=PROXY_CONNS).
PROXY_CONNS = 64
HELLO_PATH, SLEEP_PATH = "/", "/sleep?ms=5"
# GET /: half of what the slowest system served closed loop on one CPU of this machine
# (supervisor with one app per worker, ~10,000 req/s; nginx + gunicorn ~15,000), so that the
# latency is the path's, not a queue's. The 10,000 req/s saturated some of them here.
HELLO_RATE = 5_000
# /sleep?ms=5: about half of what every system serves closed loop on one CPU (7,000-10,000).
SLEEP_RATE = 4_000
# The mix: 95% GET /, 5% GET /block?ms=100 (time.sleep in the async route: the app process's
# event loop stops for 100 ms). At MIX_RATE the blocking requests keep 5% x 100 x 0.1 s = 0.5
# app-seconds per second busy, a sixth of the 3 app processes: each app process is blocked a
# sixth of the time, all three at once (Poisson arrivals) under 1.5% of the time. A fast request
# that waits ~100 ms thus mostly waited behind a blocked process it was tied to (by its worker or
# its connection) while another process was free: the topology's doing, not the load's.
MIX_RATE = 100
MIX_BLOCK_MS = 100
MIX_SLOW_PATH = "/block"
# The memory while recycling: GET / at MEM_RATE with max_requests set so that each app process
# is recycled about MEM_RECYCLES_PER_APP times during the run (10% jitter).
MEM_RATE = 1_000
MEM_RECYCLES_PER_APP = 3
MEM_SAMPLE_S = 0.2
# The bars (supervisor / peer).
HELLO_LATENCY_TARGET = 1.0  # GET / p50 and p99 at the rate vs nginx + gunicorn+uvicorn
HELLO_CPU_TARGET = 1.1  # GET / server CPU per request at the rate vs nginx + gunicorn+uvicorn
SLEEP_RPS_TARGET = 1.0  # /sleep?ms=5 closed-loop req/s vs gunicorn+uvicorn
MIX_FAST_P99_TARGET = 0.5  # the mix's fast requests' p99 vs gunicorn+uvicorn


def write_proxy_mix(path: Path, base: str) -> None:
    # oha picks a line at random for every request: 19 fast + 1 blocking = 5% blocking.
    lines = [f"{base}/"] * 19 + [f"{base}{MIX_SLOW_PATH}?ms={MIX_BLOCK_MS}"]
    path.write_text("\n".join(lines) + "\n")


def open_metrics(res: h.LoadResult, pin: h.Pinning, duration: float, rate: float) -> dict:
    """oha_metrics of a fixed-rate run, with the server's CPU per request (its whole process
    tree's CPU during the run over the requests answered)."""
    m = oha_metrics(res, pin, duration, rate)
    if m["server_tree_cpu_s"] and m["responses"]:
        m["server_cpu_us_per_req"] = round(m["server_tree_cpu_s"] / m["responses"] * 1e6, 2)
    return m


def memory_summary(sampler: h.MemorySampler, start_pids: set[int]) -> dict:
    """Peak and median of the tree's PSS and RSS over the samples, and how many processes the
    tree gained meanwhile (replacements started by recycling)."""
    s = sampler.samples
    mib = lambda kib: None if kib is None else round(kib / 1024, 1)  # noqa: E731
    out = {"samples": len(s), "interval_s": sampler.interval,
           "processes_max": max((x["processes"] for x in s), default=None),
           "processes_min": min((x["processes"] for x in s), default=None),
           "new_processes": len(sampler.pids - start_pids),
           "series": [[x["t"], mib(x["pss_kib"]), mib(x["rss_kib"]), x["processes"]] for x in s]}
    for k in ("pss", "rss"):
        vals = [x[f"{k}_kib"] for x in s]
        out[f"{k}_peak_mib"] = mib(max(vals, default=None))
        out[f"{k}_median_mib"] = mib(h.median(vals))
    return out


def scenario_proxy(ctx: Ctx) -> dict:
    """The app (bench/app.py under uvicorn) behind supervisor, against what supervisor replaces,
    nginx (1 worker process, keep-alive upstream) in front of gunicorn+UvicornWorker on a Unix
    socket, and against gunicorn+UvicornWorker and granian alone, with the same W app processes
    in every system: GET / at a fixed rate (p50, p99, CPU per request); /sleep?ms=5 closed loop
    (req/s) and at a fixed rate (p99); a mix of 95% GET / and 5% requests that block their app
    process for 100 ms, at a fixed rate (p50/p99 of the fast ones and of the blocking ones);
    then, started again with recycling by request count, the process tree's memory during a
    fixed-rate run (peak and median)."""
    W = ctx.default_workers
    conns = PROXY_CONNS
    d_open, d_closed, warmup = ctx.secs(8, 1), ctx.secs(6, 1), ctx.secs(1, 0.5)
    # The mix runs longest: its fast p99 rests on the few fast requests that met a blocked app.
    d_mix, d_mem = ctx.secs(25, 3), ctx.secs(12, 3)
    max_requests = max(10, round(MEM_RATE / W * d_mem / MEM_RECYCLES_PER_APP))
    jitter = max(1, max_requests // 10)
    cap = {"limits.max_concurrent_requests": 1024}
    app = h.uvicorn_app_command()
    # With app.command, -w (server.workers) is the number of app processes and
    # server.http_workers (left at "auto") the HTTP workers in front of them: the servers' CPUs.
    sup_label = f"supervisor + uvicorn ({W} app processes)"
    sup_app = h.System("supervisor", sup_label, "supervisor", cap, app=app)
    # granian's "auto" loop is uvloop when rloop is not installed; named, so that it stays so.
    granian = h.System("granian", "granian", "granian", args=["--loop", "uvloop"])
    entries = [
        (f"supervisor-w{W}", sup_app, W),
        (f"nginx-gunicorn-w{W}", NGINX_GUNICORN, W),
        (f"gunicorn-w{W}", GUNICORN, W),
        (f"granian-w{W}", granian, W),
    ]
    gunicorn_recycle = ["--max-requests", str(max_requests), "--max-requests-jitter", str(jitter)]
    # The same systems started again for the memory run, recycling app processes by request
    # count. granian has no such setting (only --workers-lifetime, at least 60 s, and
    # --workers-max-rss): it is left out of that run.
    recycling = {
        f"supervisor-w{W}": h.System(
            "supervisor", sup_label, "supervisor",
            {**cap, "worker.max_requests": max_requests, "worker.max_requests_jitter": jitter},
            app=app),
        f"nginx-gunicorn-w{W}": h.System("nginx-gunicorn", NGINX_GUNICORN.label,
                                         "nginx-gunicorn", args=gunicorn_recycle),
        f"gunicorn-w{W}": h.System("gunicorn", GUNICORN.label, "gunicorn", args=gunicorn_recycle),
    }
    left_before = len(h.LEFT_BEHIND)
    slow = f"{MIX_SLOW_PATH}?ms={MIX_BLOCK_MS}"
    lat = f"oha -q RATE --latency-correction -c{conns} (latency from when each request was due)"
    result = header(ctx, "proxy", {
        "workers": W, "server_cpus": ctx.C,
        "app": "bench/app.py (plain ASGI) under uvicorn with uvloop and httptools in every "
               "system: supervisor runs `" + " ".join(["uvicorn"] + app[1:]).replace(
                   str(h.BENCH), "bench") + f"` as its app processes (`-w {W}`: {W} app "
               "processes; `server.http_workers` left at \"auto\", the HTTP workers being as "
               "many as the CPUs it may use); gunicorn runs UvicornWorker, alone on TCP or "
               "behind nginx on a Unix socket; granian its own ASGI server (`--loop uvloop`)",
        "nginx_gunicorn": f"nginx with 1 worker process in front of gunicorn "
                          f"with {W} UvicornWorkers on a Unix socket, both on the servers' CPU(s): "
                          f"upstream with `keepalive {h.NGINX_UPSTREAM_KEEPALIVE}` and "
                          f"`keepalive_requests 1000000`, `proxy_http_version 1.1`, "
                          f"`proxy_set_header Connection \"\"`, Host, X-Forwarded-For and "
                          f"-Proto passed on (gunicorn's documented nginx setup); gunicorn "
                          f"`--keep-alive 75` (over nginx's 60 s upstream keepalive_timeout)",
        "hello": f"GET {HELLO_PATH} at {HELLO_RATE:,} req/s, {d_open}s after {warmup}s at the "
                 f"same rate, {lat}; CPU per request = the CPU time of the server's whole "
                 f"process tree(s) during the run (/proc: utime+stime, reaped children included) "
                 f"over the requests answered",
        "sleep": f"GET {SLEEP_PATH}: req/s with wrk -t1 -c{conns} closed loop, {d_closed}s after "
                 f"{warmup}s; p99 at {SLEEP_RATE:,} req/s, {d_open}s, {lat}",
        "mix": f"95% GET {HELLO_PATH}, 5% GET {slow} (time.sleep in the async route: it blocks "
               f"its app process's event loop {MIX_BLOCK_MS} ms), picked at random per request, "
               f"{MIX_RATE:,} req/s in all for {d_mix}s, {lat}; percentiles of each path apart",
        "memory": f"each system started again with its app processes recycled after "
                  f"{max_requests} requests (+0..{jitter} jitter: supervisor "
                  f"`worker.max_requests`/`worker.max_requests_jitter`, gunicorn "
                  f"`--max-requests`/`--max-requests-jitter`), GET {HELLO_PATH} at "
                  f"{MEM_RATE:,} req/s for {d_mem}s (each app process recycled about "
                  f"{MEM_RECYCLES_PER_APP} times); PSS and RSS summed over the whole process "
                  f"tree(s) (/proc/PID/smaps_rollup) every {MEM_SAMPLE_S}s; granian has no "
                  f"recycling by request count (only --workers-lifetime, at least 60 s, and "
                  f"--workers-max-rss), so it is not in this run",
        "rates_rps": {"hello": HELLO_RATE, "sleep": SLEEP_RATE, "mix": MIX_RATE,
                      "memory": MEM_RATE},
        "max_requests": max_requests, "max_requests_jitter": jitter,
        "supervisor_settings": cap})

    def fixed(run, path, duration, rate, **kw):
        res = h.oha(run, path, duration, ctx.pin, rate=rate, connections=conns, timeout_s=10,
                    **kw)
        return open_metrics(res, ctx.pin, duration, rate)

    def measure_memory(key):
        run = recycling[key].start(W, ctx.pin, name=f"{key}-recycling")
        try:
            start_pids = {pid for pid, _ in run.tree}
            with h.MemorySampler(run, ctx.pin, MEM_SAMPLE_S) as sampler:
                m = fixed(run, HELLO_PATH, d_mem, MEM_RATE)
        finally:
            run.stop()
        m.pop("by_path", None)
        m["memory"] = memory_summary(sampler, start_pids)
        return m

    def measure(key, system, workers, rnd):
        run = system.start(workers, ctx.pin)
        mix = h.BUILD / f"proxy-mix-{run.port}.txt"
        # The system's processes once ready (masters, workers, app processes): its topology.
        out = {"processes": len(run.tree)}
        try:
            fixed(run, HELLO_PATH, warmup, HELLO_RATE)
            out["hello"] = fixed(run, HELLO_PATH, d_open, HELLO_RATE)
            h.wrk(run, SLEEP_PATH, conns, warmup, ctx.pin)
            out["sleep_closed"] = wrk_metrics(h.wrk(run, SLEEP_PATH, conns, d_closed, ctx.pin),
                                              ctx.pin)
            out["sleep"] = fixed(run, SLEEP_PATH, d_open, SLEEP_RATE)
            write_proxy_mix(mix, run.url)
            out["mix"] = fixed(run, HELLO_PATH, d_mix, MIX_RATE, urls_file=mix)
        finally:
            run.stop()
            mix.unlink(missing_ok=True)
        for name in ("hello", "sleep"):
            out[name].pop("by_path", None)
        if key in recycling:
            out["memory"] = run_one(ctx, f"{key} recycling", lambda: measure_memory(key))
        # Flat copies, for the medians and the per-round (paired) ratios.
        hello, sleep, mix_m = out["hello"], out["sleep"], out["mix"]
        fast = mix_m["by_path"].get(HELLO_PATH, {})
        blocking = mix_m["by_path"].get(MIX_SLOW_PATH, {})
        mem = (out.get("memory") or {}).get("memory") or {}
        out.update({
            "hello_p50_ms": hello["p50_ms"], "hello_p99_ms": hello["p99_ms"],
            "hello_cpu_us_per_req": hello.get("server_cpu_us_per_req"),
            "sleep_rps": out["sleep_closed"]["rps"], "sleep_p99_ms": sleep["p99_ms"],
            "sleep_cpu_us_per_req": out["sleep_closed"].get("server_cpu_us_per_req"),
            "mix_fast_p50_ms": fast.get("p50_ms"), "mix_fast_p99_ms": fast.get("p99_ms"),
            "mix_fast_max_ms": fast.get("max_ms"), "mix_fast_n": fast.get("n"),
            "mix_slow_p50_ms": blocking.get("p50_ms"), "mix_slow_p99_ms": blocking.get("p99_ms"),
            "mix_slow_n": blocking.get("n"),
            "mem_pss_peak_mib": mem.get("pss_peak_mib"),
            "mem_pss_median_mib": mem.get("pss_median_mib"),
            "mem_rss_peak_mib": mem.get("rss_peak_mib"),
            "mem_rss_median_mib": mem.get("rss_median_mib"),
        })
        return out

    runs = interleave(ctx, entries, measure, "proxy")
    result["runs"] = runs

    flat = ["hello_p50_ms", "hello_p99_ms", "hello_cpu_us_per_req", "sleep_rps", "sleep_p99_ms",
            "sleep_cpu_us_per_req", "mix_fast_p50_ms", "mix_fast_p99_ms", "mix_fast_max_ms",
            "mix_slow_p50_ms", "mix_slow_p99_ms", "mem_pss_peak_mib", "mem_pss_median_mib",
            "mem_rss_peak_mib", "mem_rss_median_mib"]
    rows = []
    for key, system, workers in entries:
        ms = by_system(runs, key)
        row = {"system": key, "label": system.label, "workers": workers, "n": len(ms),
               "recycling": key in recycling, "processes": med(ms, "processes"),
               **{k: med(ms, k) for k in flat}}
        # Each load's details: medians over rounds.
        for load in ("hello", "sleep", "mix", "memory"):
            ls = [m[load] for m in ms if isinstance(m.get(load), dict) and "error" not in m[load]]
            row[load] = {
                "n": len(ls), "offered_rps": med(ls, "offered_rps"), "achieved_rps": med(ls, "rps"),
                "achieved_fraction": med(ls, "achieved_fraction"),
                "p50_ms": med(ls, "p50_ms"), "p99_ms": med(ls, "p99_ms"),
                "p99.9_ms": med(ls, "p99.9_ms"), "max_ms": med(ls, "max_ms"),
                "server_cpu_us_per_req": med(ls, "server_cpu_us_per_req"),
                "loadgen_cpu_util": med(ls, "loadgen_cpu_util"),
                "failed": sum(x["responses"] - x["ok"] + x["errors"] for x in ls),
            }
        c = [m["sleep_closed"] for m in ms]
        row["sleep_closed"] = {
            "n": len(c), "rps": med(c, "rps"), "rps_min": min((x["rps"] for x in c), default=None),
            "rps_max": max((x["rps"] for x in c), default=None), "p50_ms": med(c, "p50_ms"),
            "p99_ms": med(c, "p99_ms"), "server_cpu_us_per_req": med(c, "server_cpu_us_per_req"),
            "loadgen_cpu_util": med(c, "loadgen_cpu_util"),
            "failed": sum(x["non_2xx"] + sum(x["socket_errors"].values()) for x in c)}
        mems = [m["memory"]["memory"] for m in ms
                if isinstance(m.get("memory"), dict) and "memory" in m["memory"]]
        row["memory"].update({
            "processes_max": med(mems, "processes_max"), "processes_min": med(mems, "processes_min"),
            "new_processes": med(mems, "new_processes")})
        row["mix"]["slow_n"] = sum(m["mix_slow_n"] or 0 for m in ms)
        row["mix"]["fast_n"] = sum(m["mix_fast_n"] or 0 for m in ms)
        rows.append(row)
    metrics = [("hello_p50_ms", "GET / p50"), ("hello_p99_ms", "GET / p99"),
               ("hello_cpu_us_per_req", "GET / CPU µs/req"), ("sleep_rps", "/sleep req/s"),
               ("sleep_p99_ms", "/sleep p99"), ("mix_fast_p50_ms", "mix fast p50"),
               ("mix_fast_p99_ms", "mix fast p99"), ("mix_slow_p99_ms", "mix blocking p99"),
               ("mem_pss_peak_mib", "PSS peak"), ("mem_pss_median_mib", "PSS median")]
    ratios = ratios_table(rows, [f"supervisor-w{W}"],
                          [f"nginx-gunicorn-w{W}", f"gunicorn-w{W}", f"granian-w{W}"], metrics,
                          runs)
    result["summary"] = {"rows": rows, "ratios": ratios, "targets": proxy_targets(ratios, W)}

    collect_warnings(result, runs, "proxy")
    for r in runs:  # the memory runs' own load generator, other processes, retransmits
        mem = (r.get("metrics") or {}).get("memory")
        if isinstance(mem, dict):
            if "error" in mem:
                result["warnings"].append(f"proxy: {r['system']} round {r['round']}: the memory "
                                          f"run failed: {mem['error'].splitlines()[0]}")
            elif mem["memory"]["new_processes"] == 0:
                result["warnings"].append(f"proxy: {r['system']} round {r['round']}: no process "
                                          f"was replaced during the memory run (no recycling)")
    loads = {"hello": f"GET {HELLO_PATH} at {HELLO_RATE:,} req/s",
             "sleep": f"GET {SLEEP_PATH} at {SLEEP_RATE:,} req/s",
             "mix": f"the mix at {MIX_RATE:,} req/s",
             "memory": f"the memory run (recycling) at {MEM_RATE:,} req/s",
             "sleep_closed": f"GET {SLEEP_PATH} closed loop"}
    for r in rows:
        for load, what in loads.items():
            x = r[load]
            if x.get("failed"):
                result["warnings"].append(f"proxy: {r['system']}: {what}: {x['failed']} "
                                          f"requests failed (errors or non-2xx)")
            frac = x.get("achieved_fraction")
            if frac is not None and frac < 0.95:
                result["warnings"].append(
                    f"proxy: {r['system']} served {frac:.0%} of {what}: the rate is above its "
                    f"capacity, so its latency there is queueing time")
        closed = r["sleep_closed"]["rps"]
        if closed and SLEEP_RATE >= 0.9 * closed:
            result["warnings"].append(
                f"proxy: {r['system']}: the fixed rate on {SLEEP_PATH} ({SLEEP_RATE:,} req/s) is "
                f"{SLEEP_RATE / closed:.0%} of its own closed-loop req/s ({closed:,.0f}): near its "
                f"capacity, so its latency there is mostly queueing time")
        if r["n"] and not r["mix"]["slow_n"]:
            result["warnings"].append(f"proxy: {r['system']}: the mix sent no blocking request")
    for x in h.LEFT_BEHIND[left_before:]:
        result["warnings"].append(f"proxy: {x['system']}: process {x['comm']} (pid {x['pid']}) "
                                  f"outlived its master and was killed by the harness")
    return result


REDIS_ADDED_P50_US = 150  # target: Redis mode adds at most this much p50 at c=1
REDIS_RPS_TARGET = 0.8  # target: Redis mode keeps this share of local mode's req/s at c=64


def start_redis(ctx: Ctx, tmp: Path) -> tuple:
    """A redis-server of the benchmark's own on a Unix socket in `tmp`, on the servers' CPU(s)
    (it competes with the workers there, as it would on a host that runs both); returns the
    process and the socket path once it answers PING."""
    sock = tmp / "redis.sock"
    proc = h.spawn(ctx.pin.server_prefix() + [
        "redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(tmp)], h.LOGS / "redis-server.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["redis-cli", "-s", str(sock), "PING"], capture_output=True,
                             text=True)
        if out.stdout.strip() == "PONG":
            return proc, sock
        time.sleep(0.05)
    raise RuntimeError("redis-server did not answer PING")


def redis_cli(sock: Path, *args: str) -> str:
    return subprocess.run(["redis-cli", "-s", str(sock), *args], capture_output=True,
                          text=True).stdout.strip()


LEASES_KEY = "supervisor:leases"
# Live leases are those whose expiry (their score, on Redis's clock) is after now: the count the
# acquire script compares with the cap (it drops the others first). ZCARD also counts expired
# leases not dropped yet.
LIVE_LEASES = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return {redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf'), redis.call('ZCARD', KEYS[1])}
"""


def _resp_reply(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b":":
        return int(rest)
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(f"redis: {rest}")
    if kind == b"$":
        return None if int(rest) < 0 else f.read(int(rest) + 2)[:-2].decode()
    if kind == b"*":
        return None if int(rest) < 0 else [_resp_reply(f) for _ in range(int(rest))]
    raise RuntimeError(f"redis: unexpected reply {line[:40]!r}")


def resp_call(conn: socket.socket, f, *args: str):
    """One command on a connection of ours to Redis (RESP), its reply. Cheaper than a redis-cli
    process per sample, which would itself load the machine being measured."""
    parts = [f"*{len(args)}\r\n"] + [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
    conn.sendall("".join(parts).encode())
    return _resp_reply(f)


def lease_counts(sock: Path) -> tuple[int, int]:
    """(live leases, all members) in Redis now."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(2.0)
        conn.connect(str(sock))
        with conn.makefile("rb") as f:
            live, card = resp_call(conn, f, "EVAL", LIVE_LEASES, "1", LEASES_KEY)
    return live, card


def leases_after(sock: Path, max_s: float = 1.0) -> dict:
    """Lease counts once the load is over: a lease is given back after its response (one ZREM
    for all given back meanwhile, off the request's path), so wait up to `max_s` for the set to
    empty."""
    t0 = time.monotonic()
    while True:
        live, card = lease_counts(sock)
        waited = time.monotonic() - t0
        if card == 0 or waited >= max_s:
            return {"live": live, "members": card, "waited_ms": round(waited * 1000)}
        time.sleep(0.02)


class LeaseWatch:
    """Counts the live leases in Redis every `every` s from a background thread, over its own
    connection to the Unix socket, from `with` until its end or `max_s`, whichever is first;
    keeps the peak and how often each count was seen."""

    def __init__(self, sock: Path, every: float, max_s: float):
        self.sock, self.every, self.max_s = sock, every, max_s
        self.peak_live = self.peak_members = self.samples = 0
        self.seen: dict[int, int] = {}
        self.error: str | None = None
        self.timed_out = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-watch", daemon=True)

    def __enter__(self) -> "LeaseWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        try:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(2.0)
                conn.connect(str(self.sock))
                with conn.makefile("rb") as f:
                    while not self._stop.is_set():
                        if time.monotonic() > deadline:
                            self.timed_out = True
                            return
                        live, card = resp_call(conn, f, "EVAL", LIVE_LEASES, "1", LEASES_KEY)
                        self.samples += 1
                        self.seen[live] = self.seen.get(live, 0) + 1
                        self.peak_live = max(self.peak_live, live)
                        self.peak_members = max(self.peak_members, card)
                        self._stop.wait(self.every)
        except (OSError, RuntimeError, ValueError) as e:
            self.error = str(e)

    def to_json(self) -> dict:
        return {"peak_live": self.peak_live, "peak_members": self.peak_members,
                "samples": self.samples, "every_ms": round(self.every * 1000),
                "seen": {str(k): v for k, v in sorted(self.seen.items())},
                "timed_out": self.timed_out, "error": self.error}


def start_pair(system: h.System, workers: int, pin: h.Pinning, key: str) -> list[h.Running]:
    """Two instances of `system`, each with its own port and its own workers, on the servers'
    CPU(s)."""
    pair: list[h.Running] = []
    try:
        for side in ("a", "b"):
            pair.append(system.start(workers, pin, name=f"{key}-{side}"))
    except BaseException:
        for run in pair:
            run.stop()
        raise
    return pair


def admission_counts(run: h.Running) -> dict:
    """What a supervisor instance says it refused, and what it decided without Redis
    (`limits.on_redis_error`: those requests were not counted against the cluster cap)."""
    st = h.supervisor_status(run)
    ws = st["workers"]
    return {"requests": sum(w["requests"] for w in ws),
            "cluster_rejected": sum(w.get("cluster_rejected", 0) for w in ws),
            "redis_degraded": sum(w.get("redis_degraded", 0) for w in ws),
            "host_rejected": st.get("global_rejected"),
            "redis_states": sorted({w.get("redis", "?") for w in ws})}


def pair_metrics(res: list[h.LoadResult], pin: h.Pinning, duration: float, rate: float) -> dict:
    """Figures of one open-loop run against two instances at once: each instance's own
    (oha_metrics), and both together from every request's record."""
    each = []
    for r in res:
        m = oha_metrics(r, pin, duration, rate / len(res))
        m.pop("by_path", None)
        each.append(m)
    recs = [rec for r in res for rec in r.data["records"]]
    ok = [rec[2] for rec in recs if 200 <= rec[1] < 300]
    rej = [rec[2] for rec in recs if rec[1] == 503]
    wall = max(r.wall_s for r in res)
    util = sum(r.cpu_s for r in res) / wall / pin.load_cpu_count if wall else 0.0
    first = res[0]  # what was measured around both loads is in each result alike
    return {
        "instances": each, "offered_rps": rate,
        "goodput_rps": round(sum(m["ok_rps"] for m in each), 1),
        "rps": round(sum(m["rps"] for m in each), 1),
        "responses": len(recs), "ok": len(ok), "rejected_503": len(rej),
        "other_status": sum(m["other_status"] for m in each),
        "errors": sum(m["errors"] for m in each),
        "share_503": round(len(rej) / len(recs), 4) if recs else None,
        "ok_p50_ms": ms_pct(ok, 50), "ok_p99_ms": ms_pct(ok, 99),
        "ok_max_ms": round(max(ok) * 1000, 3) if ok else None,
        "rej_p50_ms": ms_pct(rej, 50), "rej_p99_ms": ms_pct(rej, 99),
        # The load generators together (both on the load CPU(s)), checked once.
        "load": {
            "loadgen_cpu_util": round(util, 3), "loadgen_bound": util >= LOADGEN_BUSY_WARN,
            "server_cpus_busy": None if first.server_cpus_busy is None
            else round(first.server_cpus_busy, 3),
            "server_tree_cpu_s": round(sum(r.server_cpu_s for r in res), 3),
            "redis_cpu_s": None if first.companion_cpu_s is None
            else round(first.companion_cpu_s, 3),
            "other_processes_cpu": first.others, "tcp_retransmits": first.retransmits,
        },
    }


def redis_pair_capacity(ctx: Ctx, W: int, path: str, d_unloaded: float,
                        d_capacity: float) -> dict:
    """Two supervisor instances with the cap lifted: one's unloaded latency and capacity (for
    the cap, as in the overload scenario) and both's capacity under load at once (for the
    rate: they share the servers' CPU(s))."""
    uncapped = sup("supervisor", f"supervisor (workers={W}, cap lifted)",
                   **{"limits.max_concurrent_requests": 1024, "worker.max_concurrent": 1024})
    pair = start_pair(uncapped, W, ctx.pin, "capacity")
    try:
        h.wrk(pair[0], path, 1, 1, ctx.pin)
        unloaded = wrk_metrics(h.wrk(pair[0], path, 1, d_unloaded, ctx.pin), ctx.pin)
        one = wrk_metrics(h.wrk(pair[0], path, 8 * W, d_capacity, ctx.pin), ctx.pin)
        both = [wrk_metrics(r, ctx.pin)
                for r in h.wrk_many(pair, path, 4 * W, d_capacity, ctx.pin)]
    finally:
        for run in pair:
            run.stop()
    return {"unloaded": unloaded, "capacity_one": one, "capacity_a": both[0],
            "capacity_b": both[1]}


def redis_overload(ctx: Ctx, sock: Path, redis_pid: int) -> dict:
    """The cluster-wide cap under overload, across two instances that share one Redis: two
    supervisor instances with `limits.cluster_max_concurrent_requests = CAP` (CAP from Little's
    law, as in the overload scenario: one instance's capacity x its unloaded p50 on
    `/work?ms=10`) against the same two with host-local caps only (CAP / 2 each) and two
    gunicorn+uvicorn instances (no cap), all under one open-loop load at 3x the two instances'
    combined capacity, half to each. A thread counts the live leases in Redis meanwhile."""
    W = ctx.default_workers
    work_ms, conns, timeout_s, every = 10, 128, 20, 0.02
    path = f"/work?ms={work_ms}"
    d_unloaded, d_capacity, d_over = ctx.secs(5, 1), ctx.secs(5, 1), ctx.secs(10, 2)
    out = {"config": {
        "overload": f"two instances of each system ({W} workers each, own ports, on the "
                    f"servers' CPU(s)); `{path}`; oha -q RATE/2 --latency-correction -c {conns} "
                    f"-w against each instance at once (two oha processes on the load "
                    f"generator's CPU), {d_over}s, {timeout_s} s timeout; RATE = 3 x the "
                    f"combined capacity of the two instances",
        "overload_calibration": f"once, before round 1, two supervisor instances with the cap "
                                f"lifted: wrk c=1 {d_unloaded}s on one (unloaded p50/p99), wrk "
                                f"c={8 * W} {d_capacity}s on one (its capacity), wrk c={4 * W} "
                                f"on each at once {d_capacity}s (combined capacity)",
        "overload_cap_rule": "cluster cap CAP = floor(capacity of one instance [req/s] x its "
                             "unloaded p50 [s]), at least 1 (Little's law, as in the overload "
                             "scenario), for both instances together; host-local comparison: "
                             "limits.max_concurrent_requests = max(1, floor(CAP / 2)) on each",
        "overload_leases": f"live leases (expiry after Redis's TIME: ZCOUNT {LEASES_KEY} "
                           f"(now +inf, in one EVAL) every {every * 1000:.0f} ms from a thread "
                           f"of the bench on its own Unix-socket connection, for the run's "
                           f"length; left: the same count after the loads end (waiting up to "
                           f"1 s for the releases), before the instances stop",
    }, "runs": [], "warnings": []}
    if ctx.quiet_wait:
        h.wait_for_quiet(ctx.quiet_wait)
    h.log(f"[redis overload] capacity of two supervisor instances on {path}")
    cal = run_one(ctx, "capacity", lambda: redis_pair_capacity(ctx, W, path, d_unloaded,
                                                              d_capacity))
    collect_warnings(out, [{"system": "supervisor, cap lifted", "round": "0 (capacity)",
                            **({"error": cal["error"]} if "error" in cal else {"metrics": cal})}],
                     "redis overload")
    if "error" in cal:
        out["summary"] = {"calibration": cal, "rows": []}
        return out
    one_rps, p50_ms = cal["capacity_one"]["ok_rps"], cal["unloaded"]["p50_ms"]
    combined = round(cal["capacity_a"]["ok_rps"] + cal["capacity_b"]["ok_rps"], 1)
    cap = max(1, math.floor(one_rps * p50_ms / 1000.0))
    local_each = max(1, cap // 2)
    rate = round(3 * combined)
    h.log(f"[redis overload] cap {cap} (floor({one_rps} req/s x {p50_ms} ms)), host-local "
          f"{local_each} each; {rate} req/s offered (3 x {combined})")
    cluster = sup("supervisor-redis-x2", f"2 x supervisor + Redis, cluster cap {cap}",
                  **{"limits.cluster_max_concurrent_requests": cap,
                     "redis.url": f"unix://{sock}"})
    local = sup("supervisor-local-x2", f"2 x supervisor, host cap {local_each} each",
                **{"limits.max_concurrent_requests": local_each})
    gunicorn = h.System("gunicorn-x2", "2 x gunicorn+uvicorn (no cap)", "gunicorn")
    entries = [("supervisor-redis-x2", cluster, W), ("supervisor-local-x2", local, W),
               ("gunicorn-x2", gunicorn, W)]
    caps = {"supervisor-redis-x2": cap, "supervisor-local-x2": 2 * local_each}

    def measure(key, system, workers, rnd):
        pair = start_pair(system, workers, ctx.pin, key)
        redis_mode = key == "supervisor-redis-x2"
        try:
            before = lease_counts(sock) if redis_mode else None
            # Bounded: oha ends by d_over + its request timeout (-w waits for that at most).
            with (LeaseWatch(sock, every, d_over + timeout_s + 5) if redis_mode
                  else nullcontext()) as watch:
                res = h.oha_many(pair, path, d_over, ctx.pin, rate=rate / 2, connections=conns,
                                 timeout_s=timeout_s, wait_ongoing=True, companions=(redis_pid,))
            m = pair_metrics(res, ctx.pin, d_over, rate)
            if redis_mode:
                m["leases"] = {**watch.to_json(), "before": before[1],
                               "after": leases_after(sock)}
            if system.kind == "supervisor":
                m["admission"] = [admission_counts(run) for run in pair]
        finally:
            for run in pair:
                run.stop()
        m["ok_p99_over_unloaded_p99"] = ratio(m["ok_p99_ms"], cal["unloaded"]["p99_ms"])
        return m

    runs = interleave(ctx, entries, measure, "redis overload")
    out["runs"] = runs
    rows = []
    for key, system, workers in entries:
        ms = by_system(runs, key)
        leases = [m["leases"] for m in ms if "leases" in m]
        adm = [a for m in ms for a in m.get("admission", [])]
        rows.append({
            "system": key, "label": system.label, "instances": 2, "workers": workers,
            "n": len(ms), "cap": caps.get(key),
            "offered_rps": rate, "goodput_rps": med(ms, "goodput_rps"),
            "goodput_vs_capacity": ratio(med(ms, "goodput_rps"), combined),
            "share_503": med(ms, "share_503"),
            "ok_p50_ms": med(ms, "ok_p50_ms"), "ok_p99_ms": med(ms, "ok_p99_ms"),
            "ok_max_ms": med(ms, "ok_max_ms"),
            "ok_p99_over_unloaded_p99": med(ms, "ok_p99_over_unloaded_p99"),
            "rej_p50_ms": med(ms, "rej_p50_ms"), "rej_p99_ms": med(ms, "rej_p99_ms"),
            "errors": sum(m["errors"] for m in ms),
            "other_status": sum(m["other_status"] for m in ms),
            "loadgen_cpu_util": med([m["load"] for m in ms], "loadgen_cpu_util"),
            # The worst run, not the median: the cap has to hold in every one.
            "leases_peak": max((x["peak_live"] for x in leases), default=None),
            "leases_left": max((x["after"]["members"] for x in leases), default=None),
            "lease_samples": sum(x["samples"] for x in leases) if leases else None,
            # How often the samples found the cap full (live leases >= cap).
            "leases_at_cap_share": round(sum(n for x in leases for k, n in x["seen"].items()
                                             if int(k) >= cap)
                                         / max(1, sum(x["samples"] for x in leases)), 3)
            if leases else None,
            "redis_degraded": sum(a["redis_degraded"] for a in adm) if adm else None,
        })
    out["summary"] = {
        "cap": cap, "local_cap_each": local_each, "rate_rps": rate, "path": path,
        "capacity_one_rps": one_rps, "capacity_rps": combined, "unloaded_p50_ms": p50_ms,
        "unloaded_p99_ms": cal["unloaded"]["p99_ms"], "calibration": cal, "rows": rows,
    }
    w = out["warnings"]
    collect_warnings(out, runs, "redis overload")
    for r in runs:
        m, tag = r.get("metrics") or {}, f"redis overload: {r['system']} round {r['round']}"
        if m.get("errors") or m.get("other_status"):
            w.append(f"{tag}: {m['errors']} errors, {m['other_status']} answers neither 200 "
                     f"nor 503")
        x = m.get("leases")
        if x:
            if x["peak_live"] > cap:
                w.append(f"{tag}: the live leases in Redis peaked at {x['peak_live']}, over "
                         f"the cluster cap of {cap}")
            if x["after"]["members"]:
                w.append(f"{tag}: {x['after']['members']} leases left in Redis after the "
                         f"run ({x['after']['waited_ms']} ms after the load ended)")
            if x["before"]:
                w.append(f"{tag}: {x['before']} leases in Redis before the run")
            if x["error"] or not x["samples"]:
                w.append(f"{tag}: the lease count was not sampled: {x['error'] or 'no sample'}")
            elif x["timed_out"]:
                w.append(f"{tag}: the lease count stopped at its time bound before the run "
                         f"ended: the peak covers only the start")
        degraded = sum(a["redis_degraded"] for a in m.get("admission", []))
        if r["system"] == "supervisor-redis-x2" and degraded:
            w.append(f"{tag}: {degraded} requests were decided without Redis "
                     f"(limits.on_redis_error = local): the cluster cap did not count them")
    return out


def scenario_redis(ctx: Ctx) -> dict:
    """The cost of the cluster-wide cap: supervisor with `limits.cluster_max_concurrent_requests`
    through a local redis-server (on a Unix socket, on the servers' CPU) against the same
    supervisor with host-local limits only, on GET /: the latency added at c=1 and the req/s
    kept at c=64. The cap is set far above the load, so every request takes and gives back a
    lease and none is refused. Then, on the same redis-server, the cap under overload across two
    instances (redis_overload)."""
    W = ctx.default_workers
    d, warmup = ctx.secs(10, 1), ctx.secs(2, 0.5)
    tmp = Path(tempfile.mkdtemp(prefix="bench-redis-", dir=h.BUILD))
    proc, sock = start_redis(ctx, tmp)
    big = 1_000_000
    local = sup("supervisor-local", f"supervisor, host limits only (workers={W})",
                **{"limits.max_concurrent_requests": big})
    cluster = sup("supervisor-redis", f"supervisor + Redis cluster cap (workers={W})",
                  **{"limits.max_concurrent_requests": big,
                     "limits.cluster_max_concurrent_requests": big,
                     "redis.url": f"unix://{sock}"})
    entries = [("supervisor-local", local, W), ("supervisor-redis", cluster, W)]
    result = header(ctx, "redis", {
        "redis": "redis-server " + (redis_cli(sock, "INFO", "server").split("redis_version:")
                                    [-1].split()[0] if redis_cli(sock, "INFO", "server") else "?")
                 + ", Unix socket, on the servers' CPU(s), no persistence",
        "c1": f"wrk -t1 -c1 closed loop on GET /, {d}s after {warmup}s warm-up; p50 from wrk, "
              f"mean = 1 / (req/s)",
        "c64": f"wrk -t1 -c64 closed loop on GET /, {d}s after {warmup}s warm-up",
    })

    # redis-server is part of the system under test: its CPU is recorded apart
    # (companion_cpu_s), not taken for another process's (which would repeat every measurement).
    ours = (proc.pid,)

    def measure(key, system, workers, rnd):
        run = system.start(workers, ctx.pin)
        try:
            h.wrk(run, "/", 1, warmup, ctx.pin, companions=ours)
            c1 = wrk_metrics(h.wrk(run, "/", 1, d, ctx.pin, companions=ours), ctx.pin)
            h.wrk(run, "/", 64, warmup, ctx.pin, companions=ours)
            c64 = wrk_metrics(h.wrk(run, "/", 64, d, ctx.pin, companions=ours), ctx.pin)
        finally:
            run.stop()
        redis_cpu = c64.get("companion_cpu_s")
        return {"c1": c1, "c64": c64, "p50_us": round(c1["p50_ms"] * 1000, 1),
                "mean_us": round(1e6 / c1["rps"], 1) if c1["rps"] else None,
                "rps": c64["rps"], "cpu_us_per_req": c64.get("server_cpu_us_per_req"),
                "redis_cpu_us_per_req": round(redis_cpu / c64["requests"] * 1e6, 2)
                if redis_cpu is not None and c64["requests"] else None,
                "non_2xx": c1["non_2xx"] + c64["non_2xx"]}

    try:
        runs = interleave(ctx, entries, measure, "redis")
        leases_left = redis_cli(sock, "ZCARD", LEASES_KEY)
        over = redis_overload(ctx, sock, proc.pid)
    finally:
        h.stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    result["runs"] = runs
    rows = []
    for key, system, workers in entries:
        ms = by_system(runs, key)
        rows.append({"system": key, "label": system.label, "workers": workers, "n": len(ms),
                     "p50_us": med(ms, "p50_us"), "mean_us": med(ms, "mean_us"),
                     "rps": med(ms, "rps"), "cpu_us_per_req": med(ms, "cpu_us_per_req"),
                     "redis_cpu_us_per_req": med(ms, "redis_cpu_us_per_req"),
                     "non_2xx": sum(m["non_2xx"] for m in ms)})
    # Paired: supervisor-redis against supervisor-local of the same round.
    per_round = {}
    for r in runs:
        if "metrics" in r:
            per_round.setdefault(r["round"], {})[r["system"]] = r["metrics"]
    added, kept = [], []
    for rnd, pair in sorted(per_round.items()):
        a, b = pair.get("supervisor-redis"), pair.get("supervisor-local")
        if a and b:
            added.append(round(a["p50_us"] - b["p50_us"], 1))
            if b["rps"]:
                kept.append(round(a["rps"] / b["rps"], 3))
    med_of = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    summary = {"rows": rows, "added_p50_us": added, "kept_rps": kept,
               "added_p50_us_paired": med_of(added), "kept_rps_paired": med_of(kept),
               "leases_left": leases_left}
    summary["targets"] = [
        _target(f"c=1: Redis adds < {REDIS_ADDED_P50_US} µs p50 per request (paired)",
                f"{fmt_us(summary['added_p50_us_paired'])} µs", summary["added_p50_us_paired"],
                REDIS_ADDED_P50_US, False, "µs"),
        _target(f"c=64: req/s >= {REDIS_RPS_TARGET}x host-limits-only (paired)",
                f"{fmt_x(summary['kept_rps_paired'])}", summary["kept_rps_paired"],
                REDIS_RPS_TARGET, True, "x"),
    ]
    result["summary"] = summary
    collect_warnings(result, runs, "redis")
    for r in rows:
        if r["non_2xx"]:
            result["warnings"].append(f"redis: {r['system']} answered {r['non_2xx']} non-2xx")
    if leases_left not in ("0", ""):
        result["warnings"].append(f"redis: {leases_left} leases left in Redis after the runs")
    result["config"].update(over["config"])
    result["overload_runs"] = over["runs"]
    result["summary"]["overload"] = over["summary"]
    result["warnings"] += over["warnings"]
    return result


def _target(name: str, measured: str, value, limit, higher_is_better: bool, unit: str) -> dict:
    if value is None:
        return {"target": name, "measured": measured, "met": None, "by": "not measured"}
    if unit == "x":
        met = value >= limit if higher_is_better else value <= limit
        margin = abs(value / limit - 1)
        by = f"{'above' if value >= limit else 'below'} the bar by {margin:.1%}" if value != limit \
            else "exactly at the bar"
    else:
        met = value >= limit if higher_is_better else value < limit
        by = f"{abs(limit - value):.1f} {unit} {'under' if value < limit else 'over'} the bar"
    return {"target": name, "measured": measured, "met": met, "by": by}


def proxy_targets(ratios, W) -> list[dict]:
    """The issue's bars, supervisor / peer, on the ratio of the medians (the paired ratio,
    the median of the per-round ratios, shown beside it)."""
    def peer(key):
        return next((x for x in ratios if x["peer"] == f"{key}-w{W}"), {})

    out = []
    for key, label, metric, limit, higher, what in [
        ("nginx-gunicorn", "nginx + gunicorn+uvicorn", "GET / p50", HELLO_LATENCY_TARGET, False,
         f"GET / at {HELLO_RATE:,} req/s: p50"),
        ("nginx-gunicorn", "nginx + gunicorn+uvicorn", "GET / p99", HELLO_LATENCY_TARGET, False,
         f"GET / at {HELLO_RATE:,} req/s: p99"),
        ("nginx-gunicorn", "nginx + gunicorn+uvicorn", "GET / CPU µs/req", HELLO_CPU_TARGET,
         False, f"GET / at {HELLO_RATE:,} req/s: server CPU per request"),
        ("gunicorn", "gunicorn+uvicorn", "/sleep req/s", SLEEP_RPS_TARGET, True,
         f"{SLEEP_PATH}: closed-loop req/s"),
        ("gunicorn", "gunicorn+uvicorn", "mix fast p99", MIX_FAST_P99_TARGET, False,
         f"the 5% blocking mix at {MIX_RATE:,} req/s: p99 of the fast requests"),
    ]:
        p = peer(key)
        v, paired = p.get(metric), p.get(f"{metric} paired")
        sign = ">=" if higher else "<="
        out.append(_target(f"{what} {sign} {limit:g}x {label}'s",
                           f"{fmt_x(v)} (paired {fmt_x(paired)})", v, limit, higher, "x"))
    return out


def fmt_x(v):
    return "–" if v is None else f"{v:.3f}x"


def fmt_us(v):
    return "–" if v is None else f"{v:+.1f}"


# ---------------------------------------------------------------------------------------------


FUNCS = {"hello": scenario_hello, "latency": scenario_latency, "overload": scenario_overload,
         "balance": scenario_balance, "footprint": scenario_footprint,
         "lifecycle": lifecycle.scenario_lifecycle, "proxy": scenario_proxy,
         "redis": scenario_redis}


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                    help=f"scenarios to run (default: all): {', '.join(SCENARIOS)}")
    ap.add_argument("--quick", action="store_true",
                    help="one short round per scenario (smoke check, < 3 minutes)")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (default 3, --quick 1)")
    ap.add_argument("--scale", type=float, help="multiply every run's duration")
    ap.add_argument("--only", metavar="KEY[,KEY...]",
                    help="run only these systems of a scenario (keys as in the results, e.g. "
                         "supervisor-w1-quota,nginx-w1-quota)")
    ap.add_argument("--out",
                    help="where results go (default bench/results; with --quick "
                         "bench/.build/results-quick, so that a smoke check never replaces the "
                         "results of full runs)")
    ap.add_argument("--report-only", action="store_true",
                    help="redraw the .md and .png files from the .json results already there")
    args = ap.parse_args()
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    scenarios = args.scenarios or SCENARIOS
    if not args.out:
        args.out = str(h.BUILD / "results-quick" if args.quick else h.BENCH / "results")
    out = Path(args.out)
    if args.report_only:
        for name in scenarios:
            path = out / f"{name}.json"
            if path.exists():
                try:
                    report.write(json.loads(path.read_text()), out)
                except KeyError as e:  # written by an older bench/ whose tables differ
                    h.log(f"{path}: no field {e} (made by an older bench/): run "
                          f"`bench/run {name}` again to redraw it")
        report.write_index(out)
        return 0

    # SIGTERM (and SIGHUP) unwind like Ctrl-C so that `finally` stops every server.
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    ctx = Ctx(args)
    h.LOGS.mkdir(parents=True, exist_ok=True)
    if ctx.pin.note:
        h.log(f"note: {ctx.pin.note}")
    h.log(f"servers on CPU {ctx.pin.server_cpus or 'any'}, load generator on CPU "
          f"{ctx.pin.load_cpus or 'any'}; {ctx.rounds} round(s); results in {out}")
    t0 = time.monotonic()
    failed = []
    try:
        for name in scenarios:
            ts = time.monotonic()
            try:
                result = FUNCS[name](ctx)
            except (RuntimeError, OSError, subprocess.SubprocessError, StopIteration) as e:
                h.log(f"[{name}] failed: {e}")
                failed.append(name)
                continue
            finally:
                h.cleanup()
            result["elapsed_s"] = round(time.monotonic() - ts, 1)
            errors = [r for k in ("runs", "overload_runs") for r in result.get(k, [])
                      if "error" in r]
            if errors:
                h.log(f"[{name}] {len(errors)} measurement(s) failed (see the warnings)")
                failed.append(name)
            out.mkdir(parents=True, exist_ok=True)
            report.write(result, out)
            h.log(report.console_summary(result))
        report.write_index(out)
    except KeyboardInterrupt:
        h.log("interrupted: stopping every process started")
        return 130
    finally:
        h.cleanup()
        h.log(f"total {time.monotonic() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
