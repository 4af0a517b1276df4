"""Writes a scenario's results: <scenario>.json (everything, raw), <scenario>.md (tables with
medians and supervisor/peer ratios) and <scenario>.png (matplotlib). The .md and .png are drawn
from the .json alone, so `bench/run --report-only` can redraw them."""

from __future__ import annotations

import json
from pathlib import Path

import lifecycle  # the lifecycle scenario keeps its own table and plot

ORDER = ["hello", "latency", "overload", "balance", "footprint", "lifecycle", "proxy", "redis"]


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}f}"
    return str(v)


def pct(v):
    return "–" if v is None else f"{v * 100:.1f}%"


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(x if isinstance(x, str) else fmt(x) for x in r) + " |")
    return "\n".join(out)


def meta_block(result: dict) -> str:
    m = result["meta"]
    v = m["versions"]
    pin = m["pinning"]
    pinning = (f"servers on CPU {','.join(map(str, pin['servers']))}, load generator on CPU "
               f"{','.join(map(str, pin['load_generator']))}" if pin["servers"] else pin["note"])
    lines = [
        f"- Date: {m['date']}; {'quick run (smoke check)' if result['quick'] else 'full run'}, "
        f"{result['rounds']} round(s), interleaved; {result.get('elapsed_s', '?')} s",
        f"- Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, {m['os']}, "
        f"Linux {m['kernel']}; {pinning}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    return "\n".join(lines)


def config_block(result: dict) -> str:
    return "\n".join(f"- {k}: `{json.dumps(v) if not isinstance(v, str) else v}`"
                     for k, v in result["config"].items())


def warnings_block(result: dict) -> str:
    w = result.get("warnings") or []
    if not w:
        return "No warnings: the load generator stayed below 90% of its CPU in every run."
    return "**Warnings**\n\n" + "\n".join(f"- {x}" for x in w)


# ---------------------------------------------------------------------------------------------


def measured(rows: list[dict]) -> list[dict]:
    """Rows of systems that ran (a run with --only leaves the others empty)."""
    return [x for x in rows if x.get("n", 1)]


def some_ratio(rows: list[dict]) -> list[dict]:
    return [x for x in rows
            if any(isinstance(v, (int, float)) for k, v in x.items() if k not in ("supervisor", "peer"))]


def md_hello(r: dict) -> str:
    s = dict(r["summary"], rows=measured(r["summary"]["rows"]),
             ratios=some_ratio(r["summary"]["ratios"]))
    rows = [[x["label"], x["workers"], x["rps"], f"{fmt(x['rps_min'])}–{fmt(x['rps_max'])}",
             x["p50_ms"], x["p99_ms"], x["p99.9_ms"], x["server_cpu_us_per_req"],
             pct(x["server_cpus_busy"]), pct(x["loadgen_cpu_util"]), x["non_2xx"]]
            for x in s["rows"]]
    t = table(["system", "workers", "req/s (median)", "req/s range", "p50 ms", "p99 ms",
               "p99.9 ms", "server CPU µs/req", "server CPU busy", "load gen CPU", "non-2xx"],
              rows)
    rt = table(["supervisor", "peer", "req/s ratio", "req/s ratio, paired", "p99 ratio",
                "CPU µs/req ratio", "CPU µs/req ratio, paired"],
               [[x["supervisor"], x["peer"], x["req/s"], x.get("req/s paired"), x["p99"],
                 x["CPU µs/req"], x.get("CPU µs/req paired")] for x in s["ratios"]])
    return (f"## hello: closed loop, c={r['config']['connections']}, GET / (13 bytes)\n\n{t}\n\n"
            f"Ratios supervisor / peer (req/s: higher is better for supervisor; p99 and CPU per "
            f"request: lower is better). \"ratio\" divides the medians; \"paired\" is the median "
            f"of the ratios within each round (systems measured back to back share the "
            f"machine's drift). Rows with \"-quota\" ran with the servers limited to half a CPU "
            f"so that they, not wrk, are the bottleneck.\n\n{rt}\n")


def md_latency(r: dict) -> str:
    s, c = dict(r["summary"], rows=measured(r["summary"]["rows"]),
                ratios=some_ratio(r["summary"]["ratios"])), r["config"]
    rows = [[x["label"], x["workers"], x["offered_rps"], x["achieved_rps"], x["p50_ms"],
             x["p99_ms"], x["p99.9_ms"], x["max_ms"], x["errors"] + x["non_2xx"],
             pct(x["loadgen_cpu_util"])] for x in s["rows"]]
    t = table(["system", "workers", "offered req/s", "served req/s", "p50 ms", "p99 ms",
               "p99.9 ms", "max ms", "errors+non-2xx", "load gen CPU"], rows)
    rt = table(["supervisor", "peer", "p50 ratio", "p99 ratio", "p99.9 ratio"],
               [[x["supervisor"], x["peer"], x["p50"], x["p99"], x["p99.9"]] for x in s["ratios"]])
    return (f"## latency: open loop at {fmt(c['rate_rps'])} req/s = 50% of nginx's max "
            f"({fmt(c['nginx_max_rps'])} req/s, {c['nginx_max_source']}), latency-corrected\n\n"
            f"{t}\n\nRatios supervisor / peer (lower is better for supervisor):\n\n{rt}\n")


def md_overload(r: dict) -> str:
    s, c = dict(r["summary"], rows=measured(r["summary"]["rows"]),
                ratios=some_ratio(r["summary"]["ratios"])), r["config"]
    rows = [[x["label"], x["workers"], x["cap"], x["unloaded_p50_ms"], x["unloaded_p99_ms"],
             x["capacity_rps"], x["offered_rps"], x["goodput_rps"], pct(x["share_503"]),
             x["rej_p50_ms"], x["rej_p99_ms"], x["ok_p50_ms"], x["ok_p99_ms"],
             x["ok_p99_over_unloaded_p99"], x["errors"]] for x in s["rows"]]
    t = table(["system", "workers", "cap", "unloaded p50 ms", "unloaded p99 ms",
               "capacity req/s", "offered req/s", "goodput req/s", "503 share", "503 p50 ms",
               "503 p99 ms", "admitted p50 ms", "admitted p99 ms",
               "admitted p99 / unloaded p99", "errors"], rows)
    rt = table(["supervisor", "peer", "goodput ratio", "admitted p99 ratio", "p99 growth ratio"],
               [[x["supervisor"], x["peer"], x["goodput"], x["admitted p99"], x["p99 growth"]]
                for x in s["ratios"]])
    return (f"## overload: `{c['path']}` (CPU-bound), open loop at 3x each system's capacity\n\n"
            f"Host-wide cap for supervisor: `limits.max_concurrent_requests = {c.get('cap')}`. "
            f"Rule: {c['cap_rule']}.\n\n{t}\n\nRatios supervisor / peer:\n\n{rt}\n")


def md_balance(r: dict) -> str:
    s, c = r["summary"], r["config"]
    rows = [[x["label"], x["load"], x["offered_rps"], x["rps"], x["p50_ms"], x["p99_ms"],
             x["max_ms"], x["fast_p99_ms"], x["fast_max_ms"], x["slow_p99_ms"],
             x["spread_max_over_min"], x["spread_cv"],
             " / ".join(map(str, x["per_worker_example"] or [])), x["errors"] + x["non_2xx"]]
            for x in s["rows"]]
    t = table(["accept, connections", "load", "offered req/s", "served req/s", "p50 ms",
               "p99 ms", "max ms", "fast p99 ms", "fast max ms", "slow p99 ms",
               "per-worker max/min", "per-worker CV", "requests per worker (median round)",
               "errors+non-2xx"], rows)
    d = s["decision"]
    ct = table(["connections", "load", "p99 reuseport/shared", "fast p99 reuseport/shared",
                "max reuseport/shared", "spread CV reuseport/shared"],
               [[x["connections"], x["load"], x["p99_ms reuseport/shared"],
                 x["fast_p99_ms reuseport/shared"], x["max_ms reuseport/shared"],
                 x["spread_cv reuseport/shared"]] for x in d["comparisons"]])
    return (f"## balance: {c['workers']} workers, {c['mix']}\n\n"
            f"closed = {c['closed']}; open = {c['open']}. Fast = `GET /`, slow = `/work`.\n\n"
            f"{t}\n\nreuseport / shared (below 1: reuseport has the lower figure):\n\n{ct}\n\n"
            f"Lower tail in more comparisons (>5% apart): **{d['lower_tail']}** "
            f"(votes {d['votes']}).\n")


def md_footprint(r: dict) -> str:
    s = r["summary"]
    ns = s["workers"]
    rows = []
    for x in s["rows"]:
        row = [x["label"]]
        for n in ns:
            b = x["by_workers"][str(n)] if str(n) in x["by_workers"] else x["by_workers"][n]
            row += [None if b["pss_kib"] is None else b["pss_kib"] / 1024, b["first_200_ms"]]
        row += [None if x["pss_per_worker_kib"] is None else x["pss_per_worker_kib"] / 1024,
                None if x["pss_base_kib"] is None else x["pss_base_kib"] / 1024]
        rows.append(row)
    hdr = ["system"]
    for n in ns:
        hdr += [f"PSS MiB, {n} worker(s)", f"start→200 ms, {n} worker(s)"]
    hdr += ["PSS MiB per extra worker", "PSS MiB base (intercept)"]
    t = table(hdr, rows)
    rh = ["peer", "PSS per worker ratio"] + [f"PSS total ratio, {n}w" for n in ns] + \
         [f"start→200 ratio, {n}w" for n in ns]
    rt = table(rh, [[x["peer"], x["pss_per_worker"]] + [x[f"pss_total_w{n}"] for n in ns] +
                    [x[f"first_200_w{n}"] for n in ns] for x in s["ratios"]])
    return (f"## footprint: idle PSS of the whole process tree, and start to first 200\n\n{t}\n\n"
            f"Ratios supervisor / peer (lower is better for supervisor):\n\n{rt}\n")


def md_proxy(r: dict) -> str:
    s, c = r["summary"], r["config"]
    rows = measured(s["rows"])
    main = table(
        ["system", "app processes", "processes in all", "GET / p50 ms", "GET / p99 ms", "GET / CPU µs/req",
         "/sleep p99 ms", "/sleep max req/s", "mix fast p50 ms", "mix fast p99 ms",
         "mix blocking p99 ms", "PSS peak MiB (recycling)", "PSS median MiB (recycling)"],
        [[x["label"], x["workers"], x.get("processes"), x["hello_p50_ms"], x["hello_p99_ms"],
          x["hello_cpu_us_per_req"], x["sleep_p99_ms"], x["sleep_rps"], x["mix_fast_p50_ms"],
          x["mix_fast_p99_ms"], x["mix_slow_p99_ms"],
          x["mem_pss_peak_mib"] if x["recycling"] else "n/a (no recycling by requests)",
          x["mem_pss_median_mib"] if x["recycling"] else "n/a"] for x in rows])
    tt = table(["target", "measured", "met?", "by how much"],
               [[x["target"], x["measured"],
                 "–" if x["met"] is None else ("**met**" if x["met"] else "**not met**"),
                 x["by"]] for x in s.get("targets", [])])
    names = ["GET / p50", "GET / p99", "GET / CPU µs/req", "/sleep req/s", "/sleep p99",
             "mix fast p50", "mix fast p99", "mix blocking p99", "PSS peak", "PSS median"]

    def both(x, k):
        v, p = x.get(k), x.get(f"{k} paired")
        return "–" if v is None else f"{fmt(v)} ({fmt(p)})"

    rt = table(["supervisor", "peer", *names],
               [[x["supervisor"], x["peer"], *[both(x, k) for k in names]]
                for x in some_ratio(s["ratios"])])
    loads = [("hello", "GET /"), ("sleep", "`/sleep?ms=5`"), ("mix", "mix"),
             ("memory", "GET /, recycling")]
    detail = []
    for name, what in loads:
        for x in rows:
            y = x[name]
            if not y["n"]:
                continue
            detail.append([what, x["label"], y["offered_rps"], y["achieved_rps"], y["p50_ms"],
                           y["p99_ms"], y["p99.9_ms"], y["max_ms"], y["server_cpu_us_per_req"],
                           y["failed"], pct(y["loadgen_cpu_util"])])
    dt = table(["load", "system", "offered req/s", "served req/s", "p50 ms", "p99 ms",
                "p99.9 ms", "max ms", "server CPU µs/req", "failed", "load gen CPU"], detail)
    closed = table(["system", "req/s (median)", "req/s range", "p50 ms", "p99 ms",
                    "server CPU µs/req", "failed", "load gen CPU"],
                   [[x["label"], x["sleep_closed"]["rps"],
                     f"{fmt(x['sleep_closed']['rps_min'])}–{fmt(x['sleep_closed']['rps_max'])}",
                     x["sleep_closed"]["p50_ms"], x["sleep_closed"]["p99_ms"],
                     x["sleep_closed"]["server_cpu_us_per_req"], x["sleep_closed"]["failed"],
                     pct(x["sleep_closed"]["loadgen_cpu_util"])] for x in rows])
    mix = table(["system", "fast requests", "fast p50 ms", "fast p99 ms", "fast max ms",
                 "blocking requests", "blocking p99 ms"],
                [[x["label"], x["mix"]["fast_n"], x["mix_fast_p50_ms"], x["mix_fast_p99_ms"],
                  x["mix_fast_max_ms"], x["mix"]["slow_n"], x["mix_slow_p99_ms"]]
                 for x in rows])
    mem = table(["system", "PSS peak MiB", "PSS median MiB", "RSS peak MiB", "RSS median MiB",
                 "processes (min–max)", "processes replaced meanwhile", "failed requests"],
                [[x["label"], x["mem_pss_peak_mib"], x["mem_pss_median_mib"],
                  x["mem_rss_peak_mib"], x["mem_rss_median_mib"],
                  f"{fmt(x['memory']['processes_min'])}–{fmt(x['memory']['processes_max'])}",
                  x["memory"]["new_processes"], x["memory"]["failed"]]
                 for x in rows if x["recycling"]])
    peers = " vs ".join(x["label"] for x in rows if not x["system"].startswith("supervisor"))
    return (f"## proxy: the app behind supervisor vs {peers}, {c['workers']} app processes "
            f"each\n\n{c['app']}.\n\nnginx + gunicorn+uvicorn: {c['nginx_gunicorn']}.\n\n"
            f"Medians over the rounds. GET /: {c['hello']}. /sleep: {c['sleep']}. Mix: "
            f"{c['mix']}. Memory: {c['memory']}.\n\n{main}\n\n"
            f"The issue's targets (ratios of the medians; paired: the median of the ratios "
            f"within each round):\n\n{tt}\n\n"
            f"Ratios supervisor / peer, of the medians (paired in brackets): req/s higher is "
            f"better for supervisor, the rest lower.\n\n{rt}\n\n"
            f"### Every fixed-rate load\n\n{dt}\n\n"
            f"### `/sleep?ms=5` closed loop (max throughput)\n\n{closed}\n\n"
            f"### The mix, each path apart\n\n{mix}\n\n"
            f"### Memory while recycling\n\n{mem}\n")


def md_redis(r: dict) -> str:
    s, c = r["summary"], r["config"]
    rows = measured(s["rows"])
    redis_cpu = any("redis_cpu_us_per_req" in x for x in rows)  # not in older results
    t = table(["system", "p50 µs (c=1)", "mean µs (c=1)", "req/s (c=64)", "server CPU µs/req (c=64)"]
              + (["redis-server CPU µs/req (c=64)"] if redis_cpu else []) + ["non-2xx"],
              [[x["label"], x["p50_us"], x["mean_us"], x["rps"], x["cpu_us_per_req"]]
               + ([x.get("redis_cpu_us_per_req")] if redis_cpu else []) + [x["non_2xx"]]
               for x in rows])
    targets = table(["target", "measured", "met?", "by how much"],
                    [[t_["target"], t_["measured"],
                      "**met**" if t_["met"] else ("**not met**" if t_["met"] is False else "–"),
                      t_["by"]] for t_ in s["targets"]])
    rounds = table(["", "per round"],
                   [["added p50 µs (redis - local)", ", ".join(f"{v:+.1f}" for v in
                                                          s["added_p50_us"])],
                    ["req/s kept (redis / local)", ", ".join(f"{v:.3f}" for v in s["kept_rps"])]])
    return (f"## redis: the cluster-wide cap through Redis vs host limits only, GET /\n\n"
            f"{c['redis']}. c=1: {c['c1']}. c=64: {c['c64']}.\n\n{targets}\n\n{t}\n\n"
            f"{rounds}\n\nLeases left in Redis after the runs: {s['leases_left']}.\n"
            f"{md_redis_overload(r)}")


def md_redis_overload(r: dict) -> str:
    """The second part of the redis scenario (absent from results made before it existed)."""
    o, c = r["summary"].get("overload"), r["config"]
    if not o:
        return ""
    head = "\n### Overload across two instances that share one Redis\n\n"
    if not o.get("rows"):
        return head + "Not measured: the capacity run failed (see the warnings).\n"
    rows = measured(o["rows"])
    t = table(["system", "cap, both instances", "offered req/s", "goodput req/s",
               "goodput / capacity", "503 share", "admitted p50 ms", "admitted p99 ms",
               "admitted p99 / unloaded p99", "503 p50 / p99 ms", "errors, other status",
               "live leases in Redis: peak / left"],
              [[x["label"], x["cap"] if x["cap"] is not None else "none", x["offered_rps"],
                x["goodput_rps"], x["goodput_vs_capacity"], pct(x["share_503"]),
                x["ok_p50_ms"], x["ok_p99_ms"], x["ok_p99_over_unloaded_p99"],
                f"{fmt(x['rej_p50_ms'])} / {fmt(x['rej_p99_ms'])}",
                f"{fmt(x['errors'])}, {fmt(x['other_status'])}",
                "–" if x["leases_peak"] is None
                else f"{fmt(x['leases_peak'])} / {fmt(x['leases_left'])}"] for x in rows])
    raw = o["capacity_one_rps"] * o["unloaded_p50_ms"] / 1000.0
    lines = [head, f"{c['overload']}. Calibration: {c['overload_calibration']}.\n\n",
             f"Cluster cap = floor({fmt(o['capacity_one_rps'])} req/s x "
             f"{fmt(o['unloaded_p50_ms'])} ms) = floor({raw:.2f}), at least 1: **{o['cap']}** "
             f"for both instances together; host-local caps only: {o['local_cap_each']} per "
             f"instance ({2 * o['local_cap_each']} in all). Combined capacity of the two "
             f"instances {fmt(o['capacity_rps'])} req/s (one alone {fmt(o['capacity_one_rps'])}"
             f"); offered {fmt(o['rate_rps'])} req/s, half to each; unloaded p50 / p99 of one "
             f"instance {fmt(o['unloaded_p50_ms'])} / {fmt(o['unloaded_p99_ms'])} ms.\n\n",
             f"{t}\n"]
    for x in rows:
        if x["leases_peak"] is None:
            continue
        held = "**held**" if x["leases_peak"] <= o["cap"] else "**exceeded**"
        lines.append(
            f"\n{x['label']}: live leases in Redis peaked at {x['leases_peak']} against the cap "
            f"of {o['cap']} ({held}; {fmt(x['lease_samples'])} samples in {x['n']} run(s), "
            f"{pct(x.get('leases_at_cap_share'))} of them at the cap); "
            f"left after the load: {x['leases_left']} at most; requests decided without Redis: "
            f"{fmt(x['redis_degraded'])}.\n")
    return "".join(lines)


MD = {"hello": md_hello, "latency": md_latency, "overload": md_overload,
      "balance": md_balance, "footprint": md_footprint, "lifecycle": lifecycle.md_lifecycle,
      "proxy": md_proxy, "redis": md_redis}


def write(result: dict, out: Path) -> None:
    name = result["scenario"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    body = MD[name](result)
    text = (f"{body}\n![{name}]({name}.png)\n\n### Setup\n\n{meta_block(result)}\n\n"
            f"{config_block(result)}\n\n{warnings_block(result)}\n\n"
            f"Raw data, every round: [{name}.json]({name}.json). Produced by `"
            f"{result.get('command') or 'bench/run ' + name}`.\n")
    (out / f"{name}.md").write_text(text)
    try:
        import plots

        plots.draw(result, out / f"{name}.png")
    except ImportError as e:  # matplotlib missing: tables still stand
        print(f"no plot for {name}: {e}")


def write_index(out: Path) -> None:
    parts = ["# bench results\n", "One file per scenario; each starts with its table of medians "
             "and supervisor/peer ratios.\n"]
    for name in ORDER:
        if (out / f"{name}.md").exists():
            parts.append(f"- [{name}]({name}.md) ([json]({name}.json), [plot]({name}.png))")
    for sub in sorted(p for p in out.iterdir() if p.is_dir() and (p / "README.md").exists()):
        parts.append(f"- [{sub.name}/]({sub.name}/README.md): a narrower run "
                     f"(its command is at the end of each file)")
    if (out / "profile.txt").exists():
        parts.append("- [profile.txt](profile.txt): `bench/profile` output, a supervisor worker "
                     "next to an nginx worker under `perf` and `strace`")
    (out / "README.md").write_text("\n".join(parts) + "\n")


def console_summary(result: dict) -> str:
    body = MD[result["scenario"]](result)
    w = result.get("warnings") or []
    return body + ("\n" + "\n".join(f"WARNING: {x}" for x in w) if w else "") + "\n"
