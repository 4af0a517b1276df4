"""bench/ scenario `lifecycle`: failed requests and tail latency while workers are replaced.

A fixed-rate load (oha -q RATE --latency-correction, keep-alive, `GET /sleep?ms=5` so that
every worker always has requests in flight) runs against each system with 3 workers while:

- steady:  nothing happens (the reference p99);
- recycle: workers are recycled after a few thousand requests (supervisor
           `worker.max_requests` + `worker.max_requests_jitter`, gunicorn `--max-requests` +
           `--max-requests-jitter`; granian has no such option: n/a);
- hup:     SIGHUP goes to the master every HUP_EVERY s (supervisor: rolling surge
           replacement of every worker; gunicorn: new workers, then the old ones stopped
           gracefully; granian: respawns its workers one by one, `--respawn-interval` apart);
- kill:    one worker is `kill -9`ed halfway through (granian runs with
           `--respawn-failed-workers` here: by default its master exits when a worker dies);
- upgrade: a binary upgrade halfway through: supervisor gets USR2 (its new master takes the
           sockets over, the old one drains once every new worker is ready, by itself);
           gunicorn gets USR2 (it starts a new master on the same sockets) and, as its docs
           tell an operator, TERM to the old master once the new one has its workers, here
           UPGRADE_SETTLE s after they all exist (gunicorn has no readiness signal); granian
           has no binary upgrade: n/a.

A failed request is a connection error, reset or timeout seen by oha, or any non-2xx answer.
For supervisor the kill reads the killed worker's requests in flight from the scoreboard just
before the signal: the issue's bar is that no more requests fail than those.

Same conventions as bench.py: systems interleaved round after round, medians over rounds,
raw data in results/lifecycle.json, tables in .md, plot in .png, supervisor/peer ratios.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness as h

WORKERS = 3
SLEEP_MS = 5
PATH = f"/sleep?ms={SLEEP_MS}"
# Offered load: the same for every system, well below every system's capacity. The Python peers
# are the slowest here: ~50k req/s of GET / on the one server CPU of the reference machine
# (results/hello.md), so 15k req/s is ~30% of theirs and ~12% of supervisor's.
RATE = 15_000
CONNECTIONS = 256  # ~RATE x 6 ms = 90 in flight when steady: room for the disturbances
MAX_REQUESTS, MAX_REQUESTS_JITTER = 5_000, 1_000  # ~1 recycle per worker per second at RATE/3
HUP_EVERY = 2.0  # s, first at 1 s
UPGRADE_SETTLE = 1.0  # s: gunicorn, from "the new master has all its workers" to TERM the old
CASES = ["steady", "recycle", "hup", "kill", "upgrade"]
CAP = {"limits.max_concurrent_requests": 1024, "worker.max_concurrent": 1024}


@dataclass
class LSystem(h.System):
    """A bench system plus extra command-line options for the Python peers."""

    extra: list = field(default_factory=list)

    def command(self, port, workers, tmp):
        cmd, cwd = super().command(port, workers, tmp)
        if self.extra:
            cmd = cmd[:-1] + list(self.extra) + cmd[-1:]  # options before the app target
        return cmd, cwd


def systems() -> list[tuple[str, str, LSystem | None, str]]:
    """(system, case, System or None when n/a, note) for every combination."""
    out = []
    for case in CASES:
        sup = dict(CAP)
        gun: list[str] = []
        if case == "recycle":
            sup.update({"worker.max_requests": MAX_REQUESTS,
                        "worker.max_requests_jitter": MAX_REQUESTS_JITTER})
            gun = ["--max-requests", str(MAX_REQUESTS),
                   "--max-requests-jitter", str(MAX_REQUESTS_JITTER)]
        out.append(("supervisor", case, LSystem("supervisor", "supervisor", "supervisor", sup), ""))
        out.append(("gunicorn", case, LSystem("gunicorn", "gunicorn+uvicorn", "gunicorn", {}, gun),
                    ""))
        if case == "recycle":
            out.append(("granian", case, None,
                        "n/a: granian has no request-count recycle; its closest, "
                        "--workers-lifetime, has a 60 s minimum, longer than a run"))
        elif case == "upgrade":
            out.append(("granian", case, None,
                        "n/a: granian has no binary upgrade (no re-exec keeping its sockets)"))
        else:
            gra = ["--respawn-failed-workers"] if case == "kill" else []
            out.append(("granian", case, LSystem("granian", "granian", "granian", {}, gra),
                        "--respawn-failed-workers (default: the master exits when a worker dies)"
                        if case == "kill" else ""))
    return out


# ---------------------------------------------------------------------------------------------
# Worker pids and the actor that disturbs a run


def children(pid: int) -> set[int]:
    # The kernel lists each thread's children: no need to scan every process on the host.
    out = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out.update(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError:
            continue
    return out


def generations(run: h.Running) -> dict[int, int]:
    """supervisor: worker number -> highest generation seen (processes that held it before)."""
    out: dict[int, int] = {}
    for w in h.supervisor_status(run)["workers"]:
        out[w["worker_id"]] = max(out.get(w["worker_id"], 0), w["generation"])
    return out


class Actor(threading.Thread):
    """Runs beside the load generator, on the load generator's CPU: sends the case's signals
    at their times and polls the master's children every POLL s to count new worker pids."""

    POLL = 0.1

    def __init__(self, run: h.Running, case: str, duration: float, pin: h.Pinning):
        super().__init__(daemon=True)
        self.run_, self.case, self.duration, self.pin = run, case, duration, pin
        self.done = threading.Event()
        self.events: list[dict] = []
        self.initial = children(run.pid)
        self.seen = set(self.initial)
        self.error: str | None = None
        self.new_master: int | None = None
        self.old_master = run.pid
        if case == "hup":
            n = max(1, int((duration - 1.0) // HUP_EVERY) + 1)
            self.schedule = [(1.0 + i * HUP_EVERY, "hup") for i in range(n)
                             if 1.0 + i * HUP_EVERY < duration - 0.5] or [(duration / 2, "hup")]
        elif case in ("kill", "upgrade"):
            self.schedule = [(duration / 2, case)]
        else:
            self.schedule = []

    def act(self, what: str, t: float) -> None:
        ev = {"t_s": round(t, 3), "action": what}
        if what == "hup":
            os.kill(self.run_.pid, signal.SIGHUP)
        elif what == "kill":
            if self.run_.system.kind == "supervisor":
                st = h.supervisor_status(self.run_)
                serving = sorted((w for w in st["workers"] if w["state"] == "serving"),
                                 key=lambda w: w["worker_id"])
                w = serving[0]
                pid, ev["worker_id"], ev["inflight_at_kill"] = w["pid"], w["worker_id"], w["inflight"]
                ev["connections_at_kill"] = w["connections"]
            else:
                pid = min(children(self.run_.pid))
            os.kill(pid, signal.SIGKILL)
            ev["pid"] = pid
            ev["t_s"] = round(time.monotonic() - self.t0, 3)
        elif what == "upgrade":
            self.upgrade(ev)
        self.events.append(ev)

    def upgrade(self, ev: dict) -> None:
        """USR2 to the master; for gunicorn also TERM to the old master once the new one has
        its workers (supervisor's old master drains by itself once the new one is ready).
        Records when the new master appeared and when the old one exited."""
        old = self.old_master
        before = children(old)
        os.kill(old, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        new = None
        while time.monotonic() < deadline:
            # The new master is a child of the old one that has children of its own (its
            # workers), all of them: the old master's workers have none (no app here).
            for c in children(old) - before:
                if len(children(c)) >= self.run_.workers:
                    new = c
            if new:
                break
            time.sleep(0.01)
        if new is None:
            raise RuntimeError("no new master with all its workers within 30 s of USR2")
        self.new_master = new
        ev["new_master"] = new
        ev["new_workers_t_s"] = round(time.monotonic() - self.t0, 3)
        if self.run_.system.kind == "gunicorn":
            time.sleep(UPGRADE_SETTLE)  # the operator's pause; see UPGRADE_SETTLE
            os.kill(old, signal.SIGTERM)
            ev["term_old_t_s"] = round(time.monotonic() - self.t0, 3)
        while time.monotonic() < deadline and self.run_.proc.poll() is None:
            time.sleep(0.01)
        ev["old_exited_t_s"] = (round(time.monotonic() - self.t0, 3)
                                if self.run_.proc.poll() is not None else None)

    def run(self) -> None:
        try:
            if self.pin.enabled:
                os.sched_setaffinity(0, self.pin.load_cpus)  # this thread only
            self.t0 = time.monotonic()
            todo = list(self.schedule)
            while not self.done.is_set():
                now = time.monotonic() - self.t0
                while todo and todo[0][0] <= now:
                    self.act(todo.pop(0)[1], now)
                self.seen |= children(self.new_master or self.run_.pid)
                self.done.wait(self.POLL)
        except Exception as e:  # noqa: BLE001 - recorded, the run is then an error
            self.error = f"{type(e).__name__}: {e}"

    def finish(self) -> dict:
        self.done.set()
        self.join(10)
        if self.error:
            raise RuntimeError(f"lifecycle actor failed: {self.error}")
        missing = [w for _, w in self.schedule if not any(e["action"] == w for e in self.events)]
        if missing:
            raise RuntimeError(f"lifecycle actor did not get to {missing} (run too short?)")
        return {"events": self.events, "new_worker_pids": len(self.seen - self.initial)}


# ---------------------------------------------------------------------------------------------
# The scenario


def scenario_lifecycle(ctx) -> dict:
    import bench as b  # here, not at the top: bench.py imports this module

    duration, warmup = ctx.secs(8, 2), ctx.secs(1, 0.5)
    combos = systems()
    entries = [(f"{name}-{case}", s, WORKERS) for name, case, s, _ in combos if s is not None]
    meta = {f"{name}-{case}": (name, case) for name, case, _, _ in combos}
    result = b.header(ctx, "lifecycle", {
        "workers": WORKERS, "path": PATH, "rate_rps": RATE, "connections": CONNECTIONS,
        "duration_s": duration, "warmup_s": warmup, "server_cpus": ctx.C,
        "length": (f"{ctx.rounds} round(s) of {duration:g} s (--scale {ctx.scale:g}; the full "
                   f"default is 3 rounds of 8 s)"),
        "rate_rule": "one rate for every system, well below every system's capacity: ~30% of "
                     "the Python peers' GET / capacity on the reference machine (~50k req/s on "
                     "one server CPU, results/hello.md), ~12% of supervisor's",
        "load_generator": "oha -q RATE --latency-correction, keep-alive, 10 s timeout, "
                          "in-flight requests waited for at the end (-w); warm-up at the same "
                          "rate on the same instance first",
        "recycle": f"max_requests={MAX_REQUESTS}, jitter={MAX_REQUESTS_JITTER} (supervisor "
                   f"--set worker.max_requests/max_requests_jitter; gunicorn --max-requests/"
                   f"--max-requests-jitter); granian n/a",
        "hup": f"SIGHUP to the master every {HUP_EVERY:g} s from 1 s on; granian with its "
               f"default --respawn-interval (3.5 s between a new worker and stopping the old)",
        "kill": "SIGKILL to one worker halfway through; granian with --respawn-failed-workers",
        "upgrade": f"USR2 to the master halfway through (the binary on disk is the same build); "
                   f"gunicorn: TERM to the old master {UPGRADE_SETTLE:g} s after its new master "
                   f"has all its workers (gunicorn's documented procedure, without readiness "
                   f"signal); supervisor's old master drains by itself once every new worker is "
                   f"ready; granian n/a",
        "failed": "oha errors (connect, reset, timeout) + non-2xx answers",
        "supervisor_settings": CAP,
        "replacements": "new worker pids seen by polling the master's children every 0.1 s "
                        "(supervisor: also the scoreboard's generation counters, exact)",
        "not_run": {f"{n}-{c}": note for n, c, s, note in combos if s is None},
    })

    def measure(key, system, workers, rnd):
        name, case = meta[key]
        run = system.start(workers, ctx.pin)
        actor = None
        try:
            h.oha(run, PATH, warmup, ctx.pin, rate=RATE, connections=CONNECTIONS, timeout_s=10)
            # (after an upgrade the scoreboard is the new master's: new pids count instead)
            gen_before = (generations(run) if system.kind == "supervisor" and case != "upgrade"
                          else None)
            actor = Actor(run, case, duration, ctx.pin)
            actor.start()
            try:
                res = h.oha(run, PATH, duration, ctx.pin, rate=RATE, connections=CONNECTIONS,
                            timeout_s=10)
            finally:
                acted = actor.finish()
            m = b.oha_metrics(res, ctx.pin, duration, RATE)
            m.pop("by_path", None)
            lat = [r[2] for r in res.data["records"]]
            m["mean_ms"] = round(sum(lat) / len(lat) * 1000, 3) if lat else None
            m["failed"] = m["errors"] + m["responses"] - m["ok"]
            m.update(acted)
            m["replacements"] = acted["new_worker_pids"]
            if gen_before is not None:
                gen_after = generations(run)
                m["replacements"] = sum(gen_after.get(w, g) - g for w, g in gen_before.items())
            kills = [e for e in acted["events"] if e["action"] == "kill"]
            if kills and "inflight_at_kill" in kills[0]:
                m["inflight_at_kill"] = kills[0]["inflight_at_kill"]
            # Little's law, for every system: requests in flight on one worker on average.
            if m["mean_ms"] is not None:
                m["inflight_per_worker_est"] = round(RATE * m["mean_ms"] / 1000 / workers, 1)
            m["hups"] = sum(1 for e in acted["events"] if e["action"] == "hup")
            ups = [e for e in acted["events"] if e["action"] == "upgrade"]
            if ups:
                m["upgrade"] = ups[0]
                if ups[0].get("old_exited_t_s") is None:
                    raise RuntimeError(f"{key}: the old master did not exit after the upgrade")
            return m
        finally:
            if actor is not None and actor.new_master:
                # Not our child: TERM it and wait a bounded time; run.stop() then SIGKILLs what
                # is left of the process group (which the new master shares).
                h.stop_pid(actor.new_master)
            run.stop()

    runs = b.interleave(ctx, entries, measure, "lifecycle")
    result["runs"] = runs
    rows = []
    for name, case, s, note in combos:
        key = f"{name}-{case}"
        ms = b.by_system(runs, key)
        if s is None:
            rows.append({"system": key, "name": name, "case": case, "n": 0, "na": note})
            continue
        kinds: dict[str, int] = {}
        for m in ms:
            for k, v in (m.get("error_kinds") or {}).items():
                kinds[k] = kinds.get(k, 0) + v
        rows.append({
            "system": key, "name": name, "label": s.label, "case": case, "n": len(ms),
            "note": note,
            "failed_per_round": [m["failed"] for m in ms],
            "failed_total": sum(m["failed"] for m in ms),
            "failed_median": b.med(ms, "failed"),
            "error_kinds": kinds,
            "non_2xx": sum(m["responses"] - m["ok"] for m in ms),
            "inflight_at_kill": [m["inflight_at_kill"] for m in ms if "inflight_at_kill" in m]
            or None,
            "inflight_per_worker_est": b.med(ms, "inflight_per_worker_est"),
            "p50_ms": b.med(ms, "p50_ms"), "p99_ms": b.med(ms, "p99_ms"),
            "p99.9_ms": b.med(ms, "p99.9_ms"), "max_ms": b.med(ms, "max_ms"),
            "achieved_rps": b.med(ms, "rps"), "achieved_fraction": b.med(ms, "achieved_fraction"),
            "replacements": b.med(ms, "replacements"),
            "replacements_per_round": [m["replacements"] for m in ms],
            "hups": b.med(ms, "hups"),
            "loadgen_cpu_util": b.med(ms, "loadgen_cpu_util"),
        })
    by = {r["system"]: r for r in rows}
    ratios = []
    for case in CASES:
        for peer in ("gunicorn", "granian"):
            s_, p_ = by.get(f"supervisor-{case}"), by.get(f"{peer}-{case}")
            if not s_ or not p_ or s_.get("na") or p_.get("na"):
                continue
            ratios.append({"case": case, "peer": peer,
                           "p99": b.ratio(s_["p99_ms"], p_["p99_ms"]),
                           "max": b.ratio(s_["max_ms"], p_["max_ms"]),
                           "failed supervisor": s_["failed_total"],
                           "failed peer": p_["failed_total"]})
    result["summary"] = {"rows": rows, "ratios": ratios, "verdict": verdict(by)}
    b.collect_warnings(result, runs, "lifecycle")
    for r in rows:
        if r.get("achieved_fraction") is not None and r["achieved_fraction"] < 0.95:
            result["warnings"].append(
                f"lifecycle: {r['system']} served {r['achieved_fraction']:.0%} of the offered "
                f"{RATE} req/s")
    return result


def verdict(by: dict) -> dict:
    """The issue's bar: supervisor fails 0 requests in recycle and hup, and in kill no more than
    the killed worker had in flight (read from the scoreboard just before the kill)."""
    out = {}
    for case in ("recycle", "hup", "upgrade"):
        r = by.get(f"supervisor-{case}")
        if r and r.get("n"):
            out[case] = {"failed": r["failed_per_round"], "met": r["failed_total"] == 0}
    r = by.get("supervisor-kill")
    if r and r.get("n"):
        pairs = []
        for f, i in zip(r["failed_per_round"], r["inflight_at_kill"] or []):
            pairs.append({"failed": f, "inflight_at_kill": i})
        out["kill"] = {"rounds": pairs,
                       "met": bool(pairs) and all(p["failed"] <= p["inflight_at_kill"]
                                                  for p in pairs)}
    return out


# ---------------------------------------------------------------------------------------------
# Report and plot (registered in report.MD and plots.DRAW)


def md_lifecycle(r: dict) -> str:
    import report as rp

    s, c = r["summary"], r["config"]
    rows = []
    for x in s["rows"]:
        if x.get("na"):
            rows.append([x["name"], x["case"], "n/a"] + ["–"] * 9)
            continue
        kinds = ", ".join(f"{k} ({v})" for k, v in x["error_kinds"].items()) or "–"
        inflight = ("/".join(map(str, x["inflight_at_kill"])) if x["inflight_at_kill"]
                    else "–")
        est = rp.fmt(x["inflight_per_worker_est"]) if x["case"] == "kill" else "–"
        rows.append([x["label"], x["case"], " / ".join(map(str, x["failed_per_round"])),
                     kinds, inflight, est, x["p50_ms"], x["p99_ms"], x["max_ms"],
                     x["achieved_rps"], x["replacements"], rp.pct(x["loadgen_cpu_util"])])
    t = rp.table(["system", "case", "failed requests (per round)", "failure kinds",
                  "in flight on the killed worker (scoreboard)",
                  "in flight per worker (Little, est.)", "p50 ms", "p99 ms", "max ms",
                  "served req/s", "worker replacements (median)", "load gen CPU"], rows)
    rt = rp.table(["case", "peer", "p99 ratio", "max ratio", "failed, supervisor (all rounds)",
                   "failed, peer (all rounds)"],
                  [[x["case"], x["peer"], x["p99"], x["max"], x["failed supervisor"],
                    x["failed peer"]] for x in s["ratios"]])
    v = s["verdict"]
    lines = []
    for case in ("recycle", "hup", "upgrade"):
        if case in v:
            lines.append(f"- {case}: supervisor failed {v[case]['failed']} request(s) per round: "
                         f"**{'met' if v[case]['met'] else 'NOT met'}** (bar: 0)")
    if "kill" in v:
        per = ", ".join(f"{p['failed']} failed / {p['inflight_at_kill']} in flight"
                        for p in v["kill"]["rounds"])
        lines.append(f"- kill: {per}: **{'met' if v['kill']['met'] else 'NOT met'}** (bar: no "
                     f"more failures than the killed worker had in flight)")
    na = "\n".join(f"- {k}: {note}" for k, note in (c.get("not_run") or {}).items())
    return (f"## lifecycle: {c['workers']} workers, `GET {c['path']}` at a fixed "
            f"{rp.fmt(c['rate_rps'])} req/s (latency-corrected), while workers are replaced\n\n"
            f"Cases: steady (nothing happens), recycle ({c['recycle']}), hup "
            f"(SIGHUP every {HUP_EVERY:g} s), kill (one worker kill -9'd halfway), upgrade "
            f"({c.get('upgrade', 'USR2 halfway')}). Failed = "
            f"{c['failed']}. Latency figures are medians over rounds; failures are listed per "
            f"round.\n\n{t}\n\nThe issue's bar for supervisor:\n\n" + "\n".join(lines) +
            f"\n\nRatios supervisor / peer (lower is better for supervisor):\n\n{rt}\n\n"
            f"Not run:\n\n{na}\n")


def draw_lifecycle(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import plots

    rows = [r for r in result["summary"]["rows"]]
    names = ["supervisor", "gunicorn", "granian"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.27
    for i, name in enumerate(names):
        sel = {r["case"]: r for r in rows if r["name"] == name}
        xs = [x + (i - 1) * width for x in range(len(CASES))]
        for ax, key in ((axes[0], "failed_total"), (axes[1], "p99_ms")):
            vals = [None if sel.get(c, {}).get("na") else sel.get(c, {}).get(key) for c in CASES]
            ax.bar(xs, [v or 0 for v in vals], width, color=plots.color(name), alpha=0.85,
                   label=name)
            for x, v in zip(xs, vals):
                if v is None:  # not run: written at the bottom of the axes
                    ax.annotate("n/a", (x, 0.01), xycoords=("data", "axes fraction"),
                                ha="center", va="bottom", fontsize=7)
                else:
                    ax.annotate(f"{v:.0f}" if key == "failed_total" else f"{v:.1f}",
                                (x, v), ha="center", va="bottom", fontsize=7)
    for ax, title in ((axes[0], "failed requests, all rounds (symlog)"),
                      (axes[1], "p99 latency, ms (median of rounds, log)")):
        ax.set_xticks(range(len(CASES)))
        ax.set_xticklabels(CASES, fontsize=9)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("symlog", linthresh=1)
    axes[1].set_yscale("log")
    c = result["config"]
    plots._title(fig, result, f"lifecycle: {c['workers']} workers, GET {c['path']} at "
                 f"{c['rate_rps']:,} req/s while workers are recycled, HUP'd, killed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
