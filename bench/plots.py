"""One PNG per scenario, drawn with matplotlib from the scenario's result dict."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import lifecycle  # noqa: E402

# First match wins: the more specific keys first.
COLORS = {"supervisor-redis": "#e67e22", "supervisor": "#c0392b", "nginx-gunicorn": "#2c3e50",
          "nginx": "#27ae60", "granian": "#2980b9",
          "gunicorn": "#8e44ad", "uvicorn": "#16a085"}


def color(key: str) -> str:
    for k, c in COLORS.items():
        if key.startswith(k):
            return c
    return "#7f8c8d"


def _runs(result, key, field, phase=None):
    vals = []
    for r in result["runs"]:
        if r["system"] != key or "metrics" not in r:
            continue
        m = r["metrics"][phase] if phase else r["metrics"]
        if m.get(field) is not None:
            vals.append(m[field])
    return vals


def _bars(ax, labels, values, colors, runs=None, log=False, fmt="{:.0f}"):
    xs = range(len(labels))
    ax.bar(xs, [v or 0 for v in values], color=colors, alpha=0.85)
    if runs:
        for x, rv in zip(xs, runs):
            ax.scatter([x] * len(rv), rv, color="black", s=8, zorder=3)
    for x, v in zip(xs, values):
        if v is not None:
            ax.annotate(fmt.format(v), (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    if log and any(v for v in values):
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)


def _title(fig, result, text):
    m = result["meta"]
    fig.suptitle(f"{text}\n{m['cpu']}, servers on CPU {m['pinning']['servers'] or 'any'}, "
                 f"{m['date']}{' (quick)' if result['quick'] else ''}", fontsize=9)


def draw_hello(result, path):
    rows = [r for r in result["summary"]["rows"] if r.get("n", 1)]
    labels = [r["label"] for r in rows]
    cols = [color(r["system"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    _bars(axes[0], labels, [r["rps"] for r in rows], cols,
          [_runs(result, r["system"], "rps") for r in rows])
    axes[0].set_title("req/s (median; dots: rounds)", fontsize=9)
    _bars(axes[1], labels, [r["p99_ms"] for r in rows], cols,
          [_runs(result, r["system"], "p99_ms") for r in rows], log=True, fmt="{:.2f}")
    axes[1].set_title("p99 latency, ms (log)", fontsize=9)
    _bars(axes[2], labels, [r["server_cpu_us_per_req"] for r in rows], cols,
          [_runs(result, r["system"], "server_cpu_us_per_req") for r in rows], fmt="{:.1f}")
    axes[2].set_title("server CPU per request, µs", fontsize=9)
    _title(fig, result, f"hello: closed loop c={result['config']['connections']}, GET /")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_latency(result, path):
    rows = [r for r in result["summary"]["rows"] if r.get("n", 1)]
    labels = [r["label"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.27
    for i, (k, name) in enumerate([("p50_ms", "p50"), ("p99_ms", "p99"), ("p99.9_ms", "p99.9")]):
        xs = [x + (i - 1) * width for x in range(len(rows))]
        vals = [r[k] or 0 for r in rows]
        ax.bar(xs, vals, width, label=name, color=[color(r["system"]) for r in rows],
               alpha=0.35 + 0.3 * i)
        for x, v in zip(xs, vals):
            ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=15, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.legend(title="bars per system: p50, p99, p99.9", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _title(fig, result, f"latency at a fixed {result['config']['rate_rps']:,} req/s "
           f"(50% of nginx's max), latency-corrected")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_overload(result, path):
    rows = [r for r in result["summary"]["rows"] if r.get("n", 1)]
    labels = [r["system"] for r in rows]
    cols = [color(r["system"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    xs = range(len(rows))
    axes[0].bar([x - 0.2 for x in xs], [r["capacity_rps"] or 0 for r in rows], 0.4,
                color=cols, alpha=0.4, label="capacity (closed loop)")
    axes[0].bar([x + 0.2 for x in xs], [r["goodput_rps"] or 0 for r in rows], 0.4,
                color=cols, alpha=0.9, label="goodput at 3x (200s/s)")
    axes[0].set_xticks(list(xs))
    axes[0].set_xticklabels(labels, fontsize=8)
    axes[0].legend(fontsize=7)
    axes[0].set_title("req/s", fontsize=9)
    axes[0].grid(axis="y", alpha=0.3)
    axes[1].bar([x - 0.2 for x in xs], [r["unloaded_p99_ms"] or 0 for r in rows], 0.4,
                color=cols, alpha=0.4, label="unloaded p99")
    axes[1].bar([x + 0.2 for x in xs], [r["ok_p99_ms"] or 0 for r in rows], 0.4,
                color=cols, alpha=0.9, label="admitted p99 at 3x")
    for x, r in zip(xs, rows):
        if r["ok_p99_ms"]:
            axes[1].annotate(f"{r['ok_p99_ms']:.0f} ms", (x + 0.2, r["ok_p99_ms"]),
                             ha="center", va="bottom", fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels(labels, fontsize=8)
    axes[1].legend(fontsize=7)
    axes[1].set_title("latency of 200s, ms (log)", fontsize=9)
    axes[1].grid(axis="y", alpha=0.3)
    _bars(axes[2], labels, [(r["share_503"] or 0) * 100 for r in rows], cols, fmt="{:.1f}%")
    axes[2].set_title("share of fast 503 rejections, %", fontsize=9)
    _title(fig, result, f"overload: {result['config']['path']} at 3x capacity, "
           f"supervisor cap={result['config'].get('cap')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_balance(result, path):
    rows = result["summary"]["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, load in zip(axes[:2], ("closed", "open")):
        sel = [r for r in rows if r["load"] == load]
        width = 0.27
        for i, (k, name) in enumerate([("fast_p99_ms", "fast p99"), ("p99_ms", "all p99"),
                                       ("max_ms", "max")]):
            xs = [x + (i - 1) * width for x in range(len(sel))]
            vals = [r[k] or 0 for r in sel]
            ax.bar(xs, vals, width, label=name, alpha=0.4 + 0.25 * i,
                   color=["#c0392b" if "reuseport" in r["system"] else "#e67e22" for r in sel])
            for x, v in zip(xs, vals):
                ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels([r["label"] for r in sel], rotation=15, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{load} loop: latency ms (log)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    sel = [r for r in rows if r["load"] == "open" and r["per_worker_example"]]
    for i, r in enumerate(sel):
        counts = r["per_worker_example"]
        total = sum(counts) or 1
        ax.bar([i + (j - len(counts) / 2) * 0.15 for j in range(len(counts))],
               [c / total * 100 for c in counts], 0.15,
               color="#c0392b" if "reuseport" in r["system"] else "#e67e22", alpha=0.8)
    ax.axhline(100 / 5, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(sel)))
    ax.set_xticklabels([r["label"] for r in sel], rotation=15, ha="right", fontsize=8)
    ax.set_title("open loop: share of requests per worker, % (dashed: even)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _title(fig, result, f"balance: {result['config']['workers']} workers, "
           f"{result['config']['mix']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_footprint(result, path):
    rows = result["summary"]["rows"]
    ns = result["summary"]["workers"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))

    def get(r, n):
        return r["by_workers"].get(str(n)) or r["by_workers"].get(n)

    for r in rows:
        pts = [(n, get(r, n)["pss_kib"] / 1024) for n in ns if get(r, n)["pss_kib"]]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                     color=color(r["system"]), label=r["label"])
        for n, v in pts:
            axes[0].annotate(f"{v:.1f}", (n, v), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")
    axes[0].set_xlabel("workers")
    axes[0].set_ylabel("PSS of the process tree, MiB")
    axes[0].set_xticks(ns)
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[0].set_title("idle memory (PSS, whole tree)", fontsize=9)
    width = 0.8 / max(1, len(ns))
    for i, n in enumerate(ns):
        xs = [x + (i - (len(ns) - 1) / 2) * width for x in range(len(rows))]
        vals = [get(r, n)["first_200_ms"] or 0 for r in rows]
        axes[1].bar(xs, vals, width, color=[color(r["system"]) for r in rows],
                    alpha=0.4 + 0.5 * i / max(1, len(ns) - 1), label=f"{n} worker(s)")
        for x, v in zip(xs, vals):
            axes[1].annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=6)
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels([r["label"] for r in rows], fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms (log)")
    axes[1].legend(fontsize=7)
    axes[1].grid(axis="y", alpha=0.3)
    axes[1].set_title("start to first 200", fontsize=9)
    _title(fig, result, "footprint")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grouped(ax, rows, metrics, log=True, fmt="{:.2f}"):
    """Bars per system, one per metric (key, label), each system in its colour."""
    width = 0.8 / len(metrics)
    for i, (k, label) in enumerate(metrics):
        xs = [x + (i - (len(metrics) - 1) / 2) * width for x in range(len(rows))]
        vals = [r.get(k) or 0 for r in rows]
        ax.bar(xs, vals, width, color=[color(r["system"]) for r in rows],
               alpha=0.4 + 0.5 * i / max(1, len(metrics) - 1), label=label)
        for x, v in zip(xs, vals):
            if v:
                ax.annotate(fmt.format(v), (x, v), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["label"] for r in rows], rotation=15, ha="right", fontsize=7)
    if log and any(r.get(k) for r in rows for k, _ in metrics):
        ax.set_yscale("log")
    ax.legend(title="bars, left to right", fontsize=7, title_fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def draw_proxy(result, path):
    s, c = result["summary"], result["config"]
    rows = [r for r in s["rows"] if r.get("n", 1)]
    rates = c["rates_rps"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 9.5))
    ax = axes[0][0]
    _grouped(ax, rows, [("hello_p50_ms", "p50"), ("hello_p99_ms", "p99")])
    ax.set_ylabel("ms (log)")
    ax.set_title(f"GET / at {rates['hello']:,} req/s, latency-corrected: p50, p99", fontsize=9)
    ax = axes[0][1]
    _bars(ax, [r["label"] for r in rows], [r["sleep_rps"] for r in rows],
          [color(r["system"]) for r in rows], [_runs(result, r["system"], "sleep_rps")
                                               for r in rows])
    ax.set_title("/sleep?ms=5, closed loop c=64: req/s (median; dots: rounds)", fontsize=9)
    ax = axes[1][0]
    _grouped(ax, rows, [("mix_fast_p50_ms", "fast p50"), ("mix_fast_p99_ms", "fast p99"),
                        ("mix_slow_p99_ms", "blocking p99")])
    ax.set_ylabel("ms (log)")
    ax.set_title(f"95% GET / + 5% /block?ms=100 at {rates['mix']:,} req/s", fontsize=9)
    ax = axes[1][1]
    for r in rows:
        series = [run["metrics"]["memory"]["memory"]["series"] for run in result["runs"]
                  if run["system"] == r["system"] and "metrics" in run
                  and "memory" in (run["metrics"].get("memory") or {})]
        if series:  # the first round's
            ax.plot([p[0] for p in series[0]], [p[1] for p in series[0]],
                    color=color(r["system"]), label=r["label"])
    ax.set_xlabel("s")
    ax.set_ylabel("PSS of the process tree(s), MiB")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7)
    ax.set_title(f"memory while recycling every {c['max_requests']} requests, GET / at "
                 f"{rates['memory']:,} req/s (first round)", fontsize=9)
    _title(fig, result, f"proxy: bench/app.py under uvicorn, {c['workers']} app processes each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_redis(result, path):
    rows = [r for r in result["summary"]["rows"] if r.get("n", 1)]
    labels = [r["label"] for r in rows]
    cols = [color(r["system"]) for r in rows]
    over = result["summary"].get("overload") or {}
    fig, axes = plt.subplots(1, 3 if over.get("rows") else 2,
                             figsize=(18, 4.8) if over.get("rows") else (12, 4.5))
    _bars(axes[0], labels, [r["p50_us"] for r in rows], cols,
          [_runs(result, r["system"], "p50_us") for r in rows], fmt="{:.0f}")
    axes[0].set_title("GET /, c=1: p50 µs (median; dots: rounds)", fontsize=9)
    _bars(axes[1], labels, [r["rps"] for r in rows], cols,
          [_runs(result, r["system"], "rps") for r in rows])
    axes[1].set_title("GET /, c=64: req/s (median; dots: rounds)", fontsize=9)
    if over.get("rows"):
        _redis_overload(axes[2], result, over)
    _title(fig, result, "redis: the cluster-wide cap through Redis vs host limits only")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _redis_overload(ax, result, over):
    """Two instances at 3x their capacity: goodput (bars, left), admitted p99 (diamonds, right,
    log), the 503 share and the peak of live leases written on the bars."""
    rows = [r for r in over["rows"] if r.get("n", 1)]
    xs = list(range(len(rows)))
    goodput = [r["goodput_rps"] or 0 for r in rows]
    ax.bar(xs, goodput, color=[color(r["system"]) for r in rows], alpha=0.85)
    runs = [[m["goodput_rps"] for r2 in result.get("overload_runs", [])
             if r2["system"] == r["system"] and "metrics" in r2
             for m in [r2["metrics"]]] for r in rows]
    for x, rv in zip(xs, runs):
        ax.scatter([x] * len(rv), rv, color="black", s=8, zorder=3)
    ax.axhline(over["capacity_rps"], color="black", lw=0.8, ls="--")
    ax.annotate(f"combined capacity {over['capacity_rps']:.0f}/s", (-0.4, over["capacity_rps"]),
                ha="left", va="bottom", fontsize=7)
    for x, r in zip(xs, rows):
        note = f"{r['goodput_rps'] or 0:.0f}/s, 503 {(r['share_503'] or 0) * 100:.0f}%"
        if r.get("leases_peak") is not None:
            note += f"\nleases peak {r['leases_peak']} (cap {over['cap']})"
        ax.annotate(note, (x, (r["goodput_rps"] or 0) / 2), ha="center", va="center",
                    fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels([r["label"] for r in rows], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("goodput, 200s/s (both instances)")
    ax.set_ylim(top=max(goodput + [over["capacity_rps"]]) * 1.2)
    ax.grid(axis="y", alpha=0.3)
    right = ax.twinx()
    p99 = [r["ok_p99_ms"] for r in rows]
    right.scatter([x for x, v in zip(xs, p99) if v], [v for v in p99 if v], marker="D",
                  color="black", zorder=4)
    for x, v in zip(xs, p99):
        if v:
            right.annotate(f"p99 {v:.1f} ms", (x, v), xytext=(6, 0), textcoords="offset points",
                           va="center", fontsize=7)
    if any(p99):
        right.set_yscale("log")
        right.set_ylim(top=max(v for v in p99 if v) * 3)  # room for the top label
        right.axhline(over["unloaded_p99_ms"], color="grey", lw=0.8, ls=":")
    right.set_ylabel("admitted p99 ms (◆, log; dotted: unloaded)")
    ax.set_title(f"2 instances each, {over['path']} at 3x their capacity "
                 f"({over['rate_rps']:,} req/s)", fontsize=9)


DRAW = {"hello": draw_hello, "latency": draw_latency, "overload": draw_overload,
        "balance": draw_balance, "footprint": draw_footprint,
        "lifecycle": lifecycle.draw_lifecycle, "proxy": draw_proxy, "redis": draw_redis}


def draw(result: dict, path: Path) -> None:
    DRAW[result["scenario"]](result, path)
