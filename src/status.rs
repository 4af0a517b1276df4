//! `supervisor status`: a running master's scoreboard, and how it is printed. No request goes to
//! any worker: the scoreboard already holds every worker's state and counters.
//!
//! Two ways in: the master builds a [`Status`] from its own scoreboard and sends it over the
//! control socket (`control`), with what only the master knows added (`master`); or, with
//! `--pid`, this module maps the scoreboard itself. It is a memfd with no name on disk, found
//! through `/proc/PID/fd`, which needs the same user as the master (or root).

use std::fs;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use worker::cluster::RedisState;
use worker::ratelimit::RateTable;
use worker::scoreboard::{monotonic_ms, Kind, Scoreboard, Slot, SlotState, MEMFD_NAME};

#[derive(Serialize, Deserialize)]
pub struct Status {
    pub master_pid: u32,
    /// What the master adds when it answers on the control socket; absent with `--pid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<MasterInfo>,
    pub global_inflight: u32,
    pub global_cap: u32,
    pub global_rejected: u64,
    /// The per-client rate table (`limits.rate`); absent if the master has none.
    pub rate_limit: Option<RateStatus>,
    /// The HTTP workers.
    pub workers: Vec<WorkerStatus>,
    /// The app processes (`app.command`), each behind its app host: `pid` is the host's,
    /// `app_pid` the app's, `requests` those sent to it, `inflight` those it has now.
    #[serde(default)]
    pub apps: Vec<WorkerStatus>,
}

/// The master's own view: its configuration's numbers and limits.
#[derive(Serialize, Deserialize)]
pub struct MasterInfo {
    /// The addresses it listens on, as bound (a port 0 resolved), `unix:PATH` for a Unix
    /// socket: which master answered, when several run.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Its control socket.
    #[serde(default)]
    pub control_socket: String,
    /// Where it serves `/metrics` (`metrics.bind`, as bound); empty: no metrics.
    #[serde(default)]
    pub metrics: String,
    /// The number of HTTP workers it keeps (`server.workers` without `app.command`, changed
    /// by TTIN/TTOU and `scale`; `server.http_workers` with it).
    pub workers: u32,
    /// The number of app processes it keeps (`server.workers` with `app.command`, changed by
    /// TTIN/TTOU and `scale`); 0 without one.
    #[serde(default)]
    pub apps: u32,
    /// Whether every worker and app process it started with has reported ready (when it told
    /// systemd `READY=1`); it stays true through later replacements.
    #[serde(default)]
    pub ready: bool,
    /// Whether it is stopping.
    pub stopping: bool,
    /// Configurations applied since start (HUP, `reload`).
    pub reloads: u64,
    /// Reloads refused since start: a configuration that did not load, or whose new workers
    /// could not boot (the previous one kept serving).
    #[serde(default)]
    pub reload_failures: u64,
    /// Why the last reload was refused; empty when none was, or a later one was applied.
    #[serde(default)]
    pub last_reload_error: String,
    pub limits: LimitsInfo,
    /// `redis.url` with any password hidden; empty: no Redis.
    pub redis_url: String,
}

/// The limits in force (see `[limits]` in supervisor.toml(5)).
#[derive(Serialize, Deserialize)]
pub struct LimitsInfo {
    pub max_concurrent_requests: u32,
    pub cluster_max_concurrent_requests: u32,
    pub worker_max_concurrent: u32,
    pub rate: String,
    pub queue: u32,
    pub on_redis_error: String,
}

#[derive(Serialize, Deserialize)]
pub struct RateStatus {
    /// Whether `limits.rate` is set.
    pub enabled: bool,
    /// Most clients the table holds (`limits.max_active_instances`).
    pub capacity: usize,
    /// Clients seen within `limits.idle_ttl`.
    pub tracked: usize,
    /// Clients pushed out to make room for new ones.
    pub evictions: u64,
    /// Requests refused with 429.
    pub limited: u64,
}

#[derive(Serialize, Deserialize)]
pub struct WorkerStatus {
    pub record: usize,
    pub worker_id: u32,
    pub generation: u32,
    pub pid: u32,
    pub state: String,
    pub requests: u64,
    pub inflight: u32,
    pub held_global: u32,
    pub connections: u32,
    pub rejected_local: u64,
    pub timeouts: u64,
    /// Requests waiting in the worker's queue (`limits.queue`) now.
    pub queued: u32,
    /// Health checks (`limits.health_paths`) in flight past the limits now.
    pub health_inflight: u32,
    /// Requests refused because the queue was full.
    pub queue_full: u64,
    /// Requests refused after `limits.queue_timeout` in the queue.
    pub queue_timeouts: u64,
    /// This worker's view of Redis: "off", "connected" or "degraded".
    pub redis: String,
    /// Requests refused at `limits.cluster_max_concurrent_requests`.
    pub cluster_rejected: u64,
    /// Requests handled by `limits.on_redis_error` because Redis did not answer.
    pub redis_degraded: u64,
    /// Memory of the worker and its descendants at the last sample.
    pub rss_bytes: u64,
    /// Why it is being replaced, if it is.
    pub recycle_reason: Option<String>,
    /// Why the process before it in this worker number was replaced (from the master only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recycle: Option<String>,
    pub uptime_ms: u64,
    pub heartbeat_age_ms: u64,
    /// The worker's app process, if it runs one; 0 otherwise.
    pub app_pid: u32,
    pub app_restarts: u32,
    /// `accept` failures for want of resources (the fd limit, socket buffers, memory).
    #[serde(default)]
    pub accept_errors: u64,
    /// Requests in a row its app (or upstream) did not answer (502s); 0 after an answer.
    #[serde(default)]
    pub app_502_streak: u32,
    /// False while its app answers nothing but 502s (the last
    /// `APP_UNHEALTHY_AFTER_502S` requests or more).
    #[serde(default = "yes")]
    pub app_healthy: bool,
}

fn yes() -> bool {
    true
}

/// Opens the scoreboard of master `pid` (read-only).
fn open_board(pid: u32) -> Result<Option<Scoreboard>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) => return Err(e).with_context(|| format!("cannot read {dir}")),
    };
    let wanted = format!("/memfd:{MEMFD_NAME}");
    for entry in entries.flatten() {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with(&wanted) {
            continue;
        }
        let file = fs::File::open(entry.path())
            .with_context(|| format!("cannot open {}", entry.path().display()))?;
        let board = Scoreboard::open(&file, false)?;
        // Workers hold the same memfd; only the process that created it is the master.
        if board.header().master_pid.load(Ordering::Relaxed) == pid {
            return Ok(Some(board));
        }
    }
    Ok(None)
}

/// The per-client rate table the master `pid` holds (read-only).
fn open_rates(pid: u32) -> Option<RateTable> {
    let wanted = format!("/memfd:{}", worker::ratelimit::MEMFD_NAME);
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with(&wanted)))
        .and_then(|e| fs::File::open(e.path()).ok())
        .and_then(|f| RateTable::open(&f, false).ok())
}

/// Every master on this host that we can see.
fn find_masters() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&pid| matches!(open_board(pid), Ok(Some(_))))
        .collect();
    pids.sort_unstable();
    pids
}

pub fn read(pid: Option<u32>) -> Result<Status> {
    let pid = match pid {
        Some(p) => p,
        None => match find_masters().as_slice() {
            [] => bail!("no running supervisor master found (is it running as another user?)"),
            [one] => *one,
            many => bail!("several masters are running ({many:?}); choose one with --pid"),
        },
    };
    let board =
        open_board(pid)?.with_context(|| format!("process {pid} is not a supervisor master"))?;
    Ok(snapshot(pid, &board, open_rates(pid).as_ref()))
}

/// The status of master `pid` from its scoreboard and rate table (read-only).
pub fn snapshot(pid: u32, board: &Scoreboard, rates: Option<&RateTable>) -> Status {
    let h = board.header();
    let now = monotonic_ms();
    // The records are read one after another while the tree changes: a handover read half
    // before and half after it would show the replacement still booting and the worker it
    // replaces already draining, one serving worker too few. A record's state only moves
    // forward (booting, serving, draining, free), so when two scans of every state and pid
    // agree, the records read between them held those values at one same moment. Retried a
    // bounded number of times; a tree that never sits still that long gets the last read.
    let states = || {
        board
            .slots()
            .map(|(_, s)| (s.state(), s.pid.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
    };
    let mut before = states();
    let mut all = read_workers(board, now);
    for _ in 0..100 {
        let after = states();
        if after == before {
            break;
        }
        before = after;
        all = read_workers(board, now);
    }
    let (apps, workers) = all.into_iter().partition(|(kind, _)| *kind == Kind::App);
    let strip = |v: Vec<(Kind, WorkerStatus)>| v.into_iter().map(|(_, w)| w).collect();
    Status {
        master_pid: pid,
        master: None,
        global_inflight: h.global_inflight.load(Ordering::Relaxed),
        global_cap: h.global_cap.load(Ordering::Relaxed),
        global_rejected: h.global_rejected.load(Ordering::Relaxed),
        rate_limit: rates.map(|t| RateStatus {
            enabled: t.enabled(),
            capacity: t.capacity(),
            tracked: t.tracked(),
            evictions: t.evictions(),
            limited: t.limited(),
        }),
        workers: strip(workers),
        apps: strip(apps),
    }
}

fn read_workers(board: &Scoreboard, now: u64) -> Vec<(Kind, WorkerStatus)> {
    board
        .slots()
        .filter(|(_, s)| s.state() != SlotState::Free)
        .map(|(record, s)| (s.kind(), read_one(record, s, now)))
        .collect()
}

fn read_one(record: usize, s: &Slot, now: u64) -> WorkerStatus {
    let app = s.kind() == Kind::App;
    WorkerStatus {
        record,
        worker_id: s.worker_id.load(Ordering::Relaxed),
        generation: s.generation.load(Ordering::Relaxed),
        pid: s.pid.load(Ordering::Relaxed),
        state: s.state().as_str().to_string(),
        requests: if app {
            s.app_sent.load(Ordering::Relaxed)
        } else {
            s.requests.load(Ordering::Relaxed)
        },
        inflight: if app {
            s.app_load().inflight
        } else {
            s.inflight.load(Ordering::Relaxed)
        },
        held_global: s.held_global.load(Ordering::Relaxed),
        connections: s.connections.load(Ordering::Relaxed),
        rejected_local: s.rejected_local.load(Ordering::Relaxed),
        timeouts: s.timeouts.load(Ordering::Relaxed),
        queued: s.queued.load(Ordering::Relaxed),
        health_inflight: s.health_inflight.load(Ordering::Relaxed),
        queue_full: s.queue_full.load(Ordering::Relaxed),
        queue_timeouts: s.queue_timeouts.load(Ordering::Relaxed),
        redis: RedisState::from_u32(s.redis_state.load(Ordering::Relaxed))
            .as_str()
            .to_string(),
        cluster_rejected: s.cluster_rejected.load(Ordering::Relaxed),
        redis_degraded: s.redis_degraded.load(Ordering::Relaxed),
        rss_bytes: s.rss_bytes.load(Ordering::Relaxed),
        recycle_reason: s.recycle_reason().map(|r| r.as_str().to_string()),
        last_recycle: None,
        uptime_ms: now.saturating_sub(s.started_ms.load(Ordering::Relaxed)),
        heartbeat_age_ms: now.saturating_sub(s.heartbeat_ms.load(Ordering::Relaxed)),
        app_pid: s.app_pid.load(Ordering::Relaxed),
        app_restarts: s.app_restarts.load(Ordering::Relaxed),
        accept_errors: s.accept_errors.load(Ordering::Relaxed),
        app_502_streak: s.app_502_streak.load(Ordering::Relaxed),
        app_healthy: s.app_healthy(),
    }
}

pub fn print(status: &Status, json: bool) {
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(status).expect("status serializes")
        );
        return;
    }
    outln!(
        "master {}  in flight {}/{} host-wide  rejected at the host-wide cap {}",
        status.master_pid,
        status.global_inflight,
        status.global_cap,
        status.global_rejected
    );
    if let Some(m) = &status.master {
        print_master(m);
    }
    print_health(status);
    print_table(status);
}

/// The master's lines: where it listens, its workers and the limits in force.
fn print_master(m: &MasterInfo) {
    outln!(
        "listening on {}  control socket {}{}",
        if m.listen.is_empty() {
            "nothing".to_string()
        } else {
            m.listen.join(", ")
        },
        m.control_socket,
        if m.metrics.is_empty() {
            String::new()
        } else {
            format!("  metrics {}", m.metrics)
        }
    );
    let l = &m.limits;
    outln!(
        "workers {}{}{}  reloads {}  limits: host-wide {}  per worker {}  queue {}  rate {}  \
         cluster-wide {}",
        m.workers,
        if m.apps > 0 {
            format!("  app processes {}", m.apps)
        } else {
            String::new()
        },
        if m.stopping {
            " (stopping)"
        } else if !m.ready {
            " (starting)"
        } else {
            ""
        },
        m.reloads,
        l.max_concurrent_requests,
        l.worker_max_concurrent,
        l.queue,
        if l.rate.is_empty() { "none" } else { &l.rate },
        match l.cluster_max_concurrent_requests {
            0 => "none".to_string(),
            n => format!("{n} (on redis error: {})", l.on_redis_error),
        },
    );
    if m.reload_failures > 0 {
        outln!(
            "reloads refused {}{}",
            m.reload_failures,
            if m.last_reload_error.is_empty() {
                String::new()
            } else {
                format!("  last: {}", m.last_reload_error)
            }
        );
    }
    if !m.redis_url.is_empty() {
        outln!("redis {}", m.redis_url);
    }
}

/// Redis, the per-client rate table, and apps that answer only 502s.
fn print_health(status: &Status) {
    let redis: Vec<&str> = status
        .workers
        .iter()
        .map(|w| w.redis.as_str())
        .filter(|r| *r != "off")
        .collect();
    if !redis.is_empty() {
        let degraded = redis.iter().filter(|r| **r == "degraded").count();
        outln!(
            "redis: {} workers connected, {degraded} degraded  refused at the cluster-wide cap {}  \
             handled while redis was away {}",
            redis.len() - degraded,
            status.workers.iter().map(|w| w.cluster_rejected).sum::<u64>(),
            status.workers.iter().map(|w| w.redis_degraded).sum::<u64>()
        );
    }
    if let Some(r) = status.rate_limit.as_ref().filter(|r| r.enabled) {
        outln!(
            "clients tracked {}/{}  evicted {}  refused by limits.rate (429) {}",
            r.tracked,
            r.capacity,
            r.evictions,
            r.limited
        );
    }
    // Those whose app answers only 502s, as "ID (N in a row)".
    let unhealthy = |list: &[WorkerStatus]| -> String {
        list.iter()
            .filter(|w| !w.app_healthy)
            .map(|w| format!("{} ({} in a row)", w.worker_id, w.app_502_streak))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (workers, apps) = (unhealthy(&status.workers), unhealthy(&status.apps));
    if !workers.is_empty() {
        outln!("app unhealthy (answers only 502s) behind worker {workers}");
    }
    if !apps.is_empty() {
        outln!("app process unhealthy (answers only 502s): {apps}");
    }
}

/// One row per worker and app process.
fn print_table(status: &Status) {
    outln!(
        "{:>6} {:>4} {:>8} {:>9} {:>10} {:>8} {:>6} {:>6} {:>6} {:>9} {:>9} {:>9} {:>8}  last recycle",
        "worker",
        "gen",
        "pid",
        "state",
        "requests",
        "inflight",
        "queued",
        "held",
        "conns",
        "rejected",
        "memory",
        "uptime",
        "app pid"
    );
    let rows = status.workers.iter().map(|w| (w.worker_id.to_string(), w));
    let apps = status
        .apps
        .iter()
        .map(|w| (format!("app-{}", w.worker_id), w));
    for (id, w) in rows.chain(apps) {
        outln!(
            "{:>6} {:>4} {:>8} {:>9} {:>10} {:>8} {:>6} {:>6} {:>6} {:>9} {:>9} {:>8}s {:>8}  {}",
            id,
            w.generation,
            w.pid,
            w.state,
            w.requests,
            w.inflight,
            w.queued,
            w.held_global,
            w.connections,
            w.rejected_local + w.queue_full + w.queue_timeouts,
            worker::config::ByteSize(w.rss_bytes / 1024 * 1024).to_string(),
            w.uptime_ms / 1000,
            if w.app_pid == 0 {
                "-".to_string()
            } else {
                w.app_pid.to_string()
            },
            w.recycle_reason
                .as_deref()
                .or(w.last_recycle.as_deref())
                .unwrap_or("-")
        );
    }
}
