//! Recycling, hung workers and reload, under a client that keeps sending requests.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::util::*;

/// Requests sent and failed by a background client.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) ok: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// A client that keeps requests going until told to stop (or `max` requests, or 60 s): one
/// keep-alive connection (reconnecting when the server says `Connection: close`), or a new
/// connection per request; at most one request per `pace`.
pub(crate) fn client(
    addr: SocketAddr,
    keep_alive: bool,
    max: u64,
    pace: Duration,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
        let mut sent = 0;
        while sent < max && !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            sent += 1;
            // Pacing, not synchronisation: a steady load rather than a flood of two cores.
            let next = Instant::now() + pace;
            let result = if keep_alive {
                let (s, r) = match conn.as_mut() {
                    Some(c) => c,
                    None => {
                        let s = TcpStream::connect(addr).expect("connect");
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let r = BufReader::new(s.try_clone().unwrap());
                        conn.insert((s, r))
                    }
                };
                s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    .and_then(|_| read_response(r))
            } else {
                try_get(addr, "/")
            };
            match result {
                Ok(resp) if resp.status == 200 => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    if resp.header("connection") == Some("close") {
                        conn = None;
                    }
                }
                Ok(resp) => {
                    eprintln!("client: status {}", resp.status);
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
                Err(e) => {
                    eprintln!("client: {e}");
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    })
}

/// Two clients at this pace send ~1000 requests/s: a worker with max_requests=20 is replaced
/// about every 40 ms, several times its boot time on a loaded two-core machine.
pub(crate) const PACE: Duration = Duration::from_millis(2);

fn serving(server: &Server) -> usize {
    server.workers_in("serving").len()
}

fn count(server: &Server, needle: &str) -> usize {
    server
        .log
        .lines()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

#[test]
fn max_requests_recycles_without_a_failed_request_or_a_capacity_dip() {
    let server = Server::start(&[
        "-w",
        "2",
        "--set",
        "worker.max_requests=20",
        "--set",
        "worker.min_lifetime=0s",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients = [
        client(server.addr, true, 1000, PACE, stop.clone(), tally.clone()),
        client(server.addr, false, 1000, PACE, stop.clone(), tally.clone()),
    ];
    let mut fewest = usize::MAX;
    while clients.iter().any(|c| !c.is_finished()) {
        fewest = fewest.min(serving(&server));
        // A sampling interval, not synchronisation: the machine has two cores to share.
        std::thread::sleep(Duration::from_millis(10));
    }
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failed requests");
    assert_eq!(tally.ok.load(Ordering::Relaxed), 2000);
    assert!(fewest >= 2, "only {fewest} serving workers at some point");
    // Recycling kept up: once the tree settles, two workers serve, none drains, and neither is
    // at the limit. How far past 20 a worker goes while its replacement boots depends on the
    // machine's load, so the number of recycles is not fixed; where the requests went is.
    let under_limit = eventually(
        Duration::from_secs(20),
        "2 serving workers under 20",
        || {
            let status = server.status();
            let workers = status["workers"].as_array().unwrap();
            let requests: Vec<u64> = workers
                .iter()
                .filter(|w| w["state"] == "serving")
                .map(|w| w["requests"].as_u64().unwrap())
                .collect();
            // A replacement the master prepared ahead ("booting") may wait beside them.
            let settled = workers
                .iter()
                .all(|w| w["state"] == "serving" || w["state"] == "booting");
            (settled && requests.len() == 2 && requests.iter().all(|&n| n < 20))
                .then(|| requests.iter().sum::<u64>())
        },
    );
    // Every other request was served by a worker recycled at or past the limit, and each of
    // those drained (its last line counts what it served).
    let drained = eventually(Duration::from_secs(10), "a drain line per recycle", || {
        let drained: Vec<u64> = server
            .log
            .lines()
            .iter()
            .filter(|l| l.contains("drain complete"))
            .map(|l| {
                let n = l.split("requests.total=").nth(1).expect("requests.total");
                n.split_whitespace().next().unwrap().parse().unwrap()
            })
            .collect();
        let recycled = count(&server, "worker recycled");
        (drained.len() == recycled && drained.iter().sum::<u64>() + under_limit == 2000)
            .then_some(drained)
    });
    assert!(
        drained.iter().all(|&n| n >= 20),
        "a worker recycled before max_requests: {drained:?}"
    );
    assert!(server.log.text().contains("reason=max_requests"));
}

#[test]
fn a_worker_past_max_rss_is_recycled_after_the_configured_samples() {
    let server = Server::start(&[
        "-w",
        "1",
        "--set",
        "worker.max_rss=64MiB",
        "--set",
        "worker.rss_interval=200ms",
        "--set",
        "worker.rss_samples=3",
    ]);
    let before = server.workers_in("serving")[0]["pid"].as_u64().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let c = client(
        server.addr,
        true,
        u64::MAX,
        PACE,
        stop.clone(),
        tally.clone(),
    );
    let r = server.get("/leak?kb=81920"); // 80 MiB, resident
    assert_eq!(r.status, 200);
    let replaced = eventually(Duration::from_secs(20), "a replacement", || {
        let w = server.workers_in("serving");
        (w.len() == 1 && w[0]["pid"].as_u64().unwrap() != before).then(|| w[0].clone())
    });
    let line = server
        .log
        .wait_for(Duration::from_secs(10), |l| l.contains("worker recycled"))
        .unwrap();
    assert!(line.contains("reason=max_rss"), "{line}");
    // Sampled and counted: at least 3 samples over the limit, so not before ~600 ms.
    assert!(!alive(before as u32));
    // Memory of the tree is back under the limit.
    let fresh = eventually(Duration::from_secs(10), "a memory sample", || {
        let w = server.workers_in("serving");
        let rss = w.first()?["rss_bytes"].as_u64()?;
        (rss > 0).then_some(rss)
    });
    assert!(fresh < 64 << 20, "replacement uses {fresh} bytes");
    assert_eq!(replaced["generation"], 1);
    stop.store(true, Ordering::Relaxed);
    c.join().unwrap();
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failed requests");
    assert!(tally.ok.load(Ordering::Relaxed) > 0);
}

#[test]
fn a_hung_worker_is_reported_with_its_request_killed_and_replaced() {
    let server = Server::start(&["-w", "2", "--set", "worker.timeout=2s"]);
    let addr = server.addr;
    // Find the worker that gets the blocking request by its id in the report.
    let blocked = std::thread::spawn(move || try_get(addr, "/block?ms=30000"));
    let line = server
        .log
        .wait_for(Duration::from_secs(20), |l| l.contains("worker hung"))
        .expect("the hang is reported");
    assert!(line.contains("GET /block?ms=30000"), "{line}");
    assert!(line.contains("heartbeat_age_ms="), "{line}");
    let killed = server
        .log
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("worker killed as hung")
        })
        .expect("the kill is classified");
    assert!(!killed.contains("OOM"), "{killed}");
    assert_cut(
        blocked.join().unwrap(),
        "the blocked request dies with its worker",
    );
    eventually(Duration::from_secs(20), "2 serving workers again", || {
        (serving(&server) == 2).then_some(())
    });
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn hup_under_load_replaces_every_worker_and_applies_the_new_count() {
    let dir = tempfile::tempdir().unwrap();
    let conf = write_file(dir.path(), "s.toml", "[server]\nworkers = 2\n");
    let server =
        Server::spawn_in(dir, &["-c", conf.to_str().unwrap(), "-b", "127.0.0.1:0"]).wait_ready();
    let old = server.serving_pids();
    assert_eq!(old.len(), 2);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients = [
        client(
            server.addr,
            true,
            u64::MAX,
            PACE,
            stop.clone(),
            tally.clone(),
        ),
        client(
            server.addr,
            false,
            u64::MAX,
            PACE,
            stop.clone(),
            tally.clone(),
        ),
    ];
    std::fs::write(&conf, "[server]\nworkers = 4\n").unwrap();
    server.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(30), "4 new workers serving", || {
        let now = server.serving_pids();
        let fresh = now.iter().all(|p| !old.contains(p));
        (now.len() == 4 && fresh && old.iter().all(|&p| !alive(p))).then_some(())
    });
    // A broken file: logged, nothing changes, still serving.
    let now = server.serving_pids();
    std::fs::write(&conf, "[server]\nworkers = 4\nwokers = 5\n").unwrap();
    server.signal(Signal::SIGHUP);
    let why = server.refused_reload(1);
    assert!(why.contains("wokers"), "{why}");
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let after = server.serving_pids();
    assert_eq!(now.len(), after.len());
    assert!(
        now.iter().all(|p| after.contains(p)),
        "a bad reload changed workers"
    );
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failed requests");
    assert!(tally.ok.load(Ordering::Relaxed) > 0);
}

#[test]
fn usr1_reopens_the_log_file_in_master_and_workers() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("supervisor.log");
    let set = format!("log.file={}", log.display());
    let mut server = Server::spawn_in(dir, &["-b", "127.0.0.1:0", "-w", "1", "--set", &set]);
    let text = eventually(Duration::from_secs(20), "ready in the log file", || {
        let t = std::fs::read_to_string(&log).ok()?;
        t.contains(" ready workers=").then_some(t)
    });
    assert!(
        text.contains("worker{worker.id=1}"),
        "workers log to the file too"
    );
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    server.signal(Signal::SIGUSR1);
    let fresh = eventually(Duration::from_secs(20), "a reopened log file", || {
        let t = std::fs::read_to_string(&log).ok()?;
        (t.contains("log file reopened") && t.contains("worker{worker.id=1}")).then_some(t)
    });
    assert!(
        !fresh.contains(" ready workers="),
        "old lines stay in the rotated file"
    );
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn max_lifetime_recycles_a_worker_by_age() {
    let server = Server::start(&[
        "-w",
        "1",
        "--set",
        "worker.max_lifetime=1s",
        "--set",
        "worker.max_lifetime_jitter=500ms",
    ]);
    let first = server.serving_pids();
    let line = server
        .log
        .wait_for(Duration::from_secs(20), |l| l.contains("worker recycled"))
        .expect("a recycle by age");
    assert!(line.contains("reason=max_lifetime"), "{line}");
    let now = server.serving_pids();
    assert_eq!(now.len(), 1);
    assert_ne!(now, first);
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn hup_applies_new_listen_addresses_and_keeps_the_unchanged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let conf = write_file(
        dir.path(),
        "s.toml",
        "[server]\nworkers = 1\nbind = [\"127.0.0.1:0\"]\n",
    );
    let server = Server::spawn_in(dir, &["-c", conf.to_str().unwrap()]).wait_ready();
    let tcp = server.addr;

    // Add a Unix socket: it serves after the reload, and the TCP port is the same one.
    std::fs::write(
        &conf,
        format!(
            "[server]\nworkers = 1\nbind = [\"127.0.0.1:0\", \"unix:{}\"]\n",
            sock.display()
        ),
    )
    .unwrap();
    server.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(20), "the new socket serving", || {
        let r = try_get_unix(&sock, "/").ok()?;
        (r.status == 200).then_some(())
    });
    assert_eq!(
        get(tcp, "/").status,
        200,
        "the unchanged address still serves"
    );

    // Drop the TCP address: once the old worker has drained, nobody listens there.
    std::fs::write(
        &conf,
        format!(
            "[server]\nworkers = 1\nbind = [\"unix:{}\"]\n",
            sock.display()
        ),
    )
    .unwrap();
    server.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(20), "the TCP address closed", || {
        try_get(tcp, "/").is_err().then_some(())
    });
    assert_eq!(try_get_unix(&sock, "/").unwrap().status, 200);
}

#[test]
fn hup_with_an_explicit_port_and_port_0_on_one_ip_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let conf = write_file(
        dir.path(),
        "s.toml",
        "[server]\nworkers = 1\nbind = [\"127.0.0.1:0\"]\n",
    );
    let mut server = Server::spawn_in(dir, &["-c", conf.to_str().unwrap()]).wait_ready();
    let tcp = server.addr;
    // The port 0 got, now named explicitly, and port 0 again: two addresses that both match
    // the one socket held. (This used to take the same socket twice and crash the master.)
    std::fs::write(
        &conf,
        format!(
            "[server]\nworkers = 1\nbind = [\"127.0.0.1:{}\", \"127.0.0.1:0\"]\n",
            tcp.port()
        ),
    )
    .unwrap();
    server.signal(Signal::SIGHUP);
    let line = server
        .log
        .wait_for(Duration::from_secs(20), |l| {
            l.contains("listening") && !l.contains(&format!(":{}", tcp.port()))
        })
        .expect("a second TCP listener after the reload");
    let second: std::net::SocketAddr = field(&line, "addr").unwrap().parse().unwrap();
    eventually(Duration::from_secs(20), "both addresses serving", || {
        let a = try_get(tcp, "/").ok()?;
        let b = try_get(second, "/").ok()?;
        (a.status == 200 && b.status == 200).then_some(())
    });
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the master is still running"
    );
}

/// CPU time (user + system) of `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn the_master_idles_while_a_prepared_replacement_waits_for_the_limit() {
    // max_requests = 100: the replacement is started after 50 requests and held until 100.
    let server = Server::start(&["-w", "1", "--set", "worker.max_requests=100"]);
    for _ in 0..60 {
        assert_eq!(server.get("/").status, 200);
    }
    server
        .log
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("starting a replacement") && l.contains("reason=max_requests")
        })
        .expect("the replacement is prepared");
    // The held replacement waits for 40 more requests that do not come: the master has nothing
    // to do but wait. A master whose timers had it wake at once would burn its CPU meanwhile.
    let before = cpu_ticks(server.pid());
    let start = Instant::now();
    // A sampling interval, not synchronisation: what is measured is the CPU used during it.
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(server.pid()) - before;
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    let share = used as f64 / ticks_per_s / start.elapsed().as_secs_f64();
    assert!(
        share < 0.2,
        "the master used {:.0}% of a CPU while idle",
        share * 100.0
    );
    assert_eq!(server.get("/").status, 200);
}
