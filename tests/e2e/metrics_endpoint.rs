//! `[metrics] bind`: the Prometheus exposition from the master. Every scrape is parsed strictly
//! (a malformed line fails the test), and counters are checked exactly against the requests the
//! test sent and the answers it got, across worker deaths and reloads.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::*;

const WAIT: Duration = Duration::from_secs(20);

/// One scrape: series (`name{labels}` exactly as written) to value.
#[derive(Debug)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        *self
            .0
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in {:#?}", self.0))
    }

    fn count(&self, series: &str) -> u64 {
        self.get(series) as u64
    }
}

/// Parses the Prometheus text format (0.0.4) strictly: every line is a HELP, a TYPE or a sample
/// of the family typed just before it, names and labels are well formed, values are numbers,
/// counters end in `_total`, histogram buckets are cumulative and end at `+Inf` = `_count`, and
/// no series appears twice.
fn parse(text: &str) -> Scrape {
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    let mut series = BTreeMap::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut family: Option<(String, String)> = None;
    let mut helped: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(name_ok(name) && !help.is_empty(), "bad HELP line {line:?}");
            helped = Some(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(name_ok(name), "bad name in {line:?}");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unknown type in {line:?}"
            );
            assert_eq!(helped.as_deref(), Some(name), "TYPE without HELP: {line:?}");
            assert!(
                types.insert(name.into(), kind.into()).is_none(),
                "{name} typed twice"
            );
            if kind == "counter" {
                assert!(
                    name.ends_with("_total"),
                    "counter {name} must end in _total"
                );
            }
            family = Some((name.into(), kind.into()));
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (key, value) = line.rsplit_once(' ').expect("sample: series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        assert!(value.is_finite() && value >= 0.0, "bad value in {line:?}");
        let (name, labels) = match key.split_once('{') {
            Some((n, l)) => (n, Some(l.strip_suffix('}').expect("labels end with }"))),
            None => (key, None),
        };
        assert!(name_ok(name), "bad name in {line:?}");
        if let Some(labels) = labels {
            check_labels(labels, line);
        }
        let (fam, kind) = family.as_ref().expect("sample before any TYPE");
        let belongs = if kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s) == Some(fam))
        } else {
            name == fam
        };
        assert!(belongs, "{line:?} is not a sample of {fam}");
        assert!(
            series.insert(key.to_string(), value).is_none(),
            "series {key} twice"
        );
    }
    check_histograms(text, &types, &series);
    Scrape(series)
}

/// A metric or label name of the text format.
fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        })
}

/// A sample's labels (between the braces): `name="value"` pairs, well formed.
fn check_labels(labels: &str, line: &str) {
    assert!(!labels.is_empty(), "empty labels in {line:?}");
    for pair in labels.split(',') {
        let (k, v) = pair.split_once('=').expect("label k=v");
        assert!(name_ok(k), "bad label name in {line:?}");
        assert!(
            v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
            "unquoted label value in {line:?}"
        );
        assert!(!v[1..v.len() - 1].contains('"'), "bad quoting in {line:?}");
    }
}

/// Histograms: cumulative buckets ending at +Inf, which equals _count.
fn check_histograms(text: &str, types: &HashMap<String, String>, series: &BTreeMap<String, f64>) {
    for (name, kind) in types {
        if kind != "histogram" {
            continue;
        }
        let buckets: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{name} not cumulative"
        );
        let inf = series[&format!("{name}_bucket{{le=\"+Inf\"}}")];
        assert_eq!(
            Some(&inf),
            buckets.last(),
            "{name}: +Inf is not the last bucket"
        );
        assert_eq!(
            inf,
            series[&format!("{name}_count")],
            "{name}: +Inf != _count"
        );
    }
}

#[test]
fn the_parser_rejects_malformed_expositions() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{class=\"2xx\"} 3\n";
    parse(good);
    for bad in [
        "a_total 3\n",                                                       // no TYPE
        "# HELP a_total A.\n# TYPE a_total counter\na_total{class=2xx} 3\n", // unquoted
        "# HELP a_total A.\n# TYPE a_total counter\na_total 3x\n",           // bad value
        "# HELP a_total A.\n# TYPE a_total counter\nb_total 3\n",            // other family
        "# HELP a_total A.\n# TYPE a_total counter\na_total 3\na_total 4\n", // twice
        "# HELP a A.\n# TYPE a counter\na 3\n",                              // no _total
        "# HELP a_total A.\n# TYPE a_total counter\na_total 3",              // no newline
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n\
         h_sum 1\nh_count 1\n", // not cumulative
    ] {
        let caught = std::panic::catch_unwind(|| parse(bad));
        assert!(caught.is_err(), "accepted {bad:?}");
    }
}

/// Where the master serves metrics, from its log.
fn metrics_addr(s: &Server) -> SocketAddr {
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("metrics: serving /metrics"))
        .expect("the metrics line");
    field(&line, "addr").unwrap().parse().unwrap()
}

fn scrape(addr: SocketAddr) -> Scrape {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse(&r.text())
}

fn start(args: &[&str]) -> (Server, SocketAddr) {
    let s = Server::start(&[&["--set", "metrics.bind=127.0.0.1:0"], args].concat());
    let m = metrics_addr(&s);
    (s, m)
}

/// Waits until `series` reads `want`, failing at once if it ever goes past it.
fn wait_exactly(m: SocketAddr, series: &str, want: u64) -> Scrape {
    eventually(WAIT, &format!("{series} = {want}"), || {
        let s = scrape(m);
        let n = s.count(series);
        assert!(n <= want, "{series} = {n}, more than the {want} expected");
        (n == want).then_some(s)
    })
}

const OK: &str = "supervisor_requests_total{class=\"2xx\"}";
const NOT_FOUND: &str = "supervisor_requests_total{class=\"4xx\"}";
const UNAVAILABLE: &str = "supervisor_requests_total{class=\"5xx\"}";
const COUNT: &str = "supervisor_request_duration_seconds_count";

fn rejections(reason: &str) -> String {
    format!("supervisor_rejections_total{{reason=\"{reason}\"}}")
}

fn deaths(cause: &str) -> String {
    format!("supervisor_worker_deaths_total{{cause=\"{cause}\"}}")
}

#[test]
fn request_counters_and_the_histogram_match_the_requests_sent() {
    let (s, m) = start(&["-w", "2"]);
    for _ in 0..7 {
        assert_eq!(s.get("/").status, 200);
    }
    for _ in 0..4 {
        assert_eq!(s.get("/no-such-page").status, 404);
    }
    wait_exactly(m, OK, 7);
    let sc = wait_exactly(m, NOT_FOUND, 4);
    assert_eq!(sc.count(COUNT), 11, "one observation per request");
    assert_eq!(sc.count(UNAVAILABLE), 0);
    assert_eq!(sc.count("supervisor_requests_total{class=\"1xx\"}"), 0);
    assert!(sc.get("supervisor_request_duration_seconds_sum") > 0.0);
    assert_eq!(sc.count("supervisor_workers{state=\"serving\"}"), 2);
    assert_eq!(sc.count("supervisor_requests_in_flight"), 0);
    assert_eq!(sc.count("supervisor_host_requests_limit"), 50);
    for reason in [
        "rate_limit",
        "worker_limit",
        "host_limit",
        "cluster_limit",
        "queue_full",
        "queue_timeout",
    ] {
        assert_eq!(sc.count(&rejections(reason)), 0, "{reason}");
    }
    // Memory is sampled every second, per worker number.
    eventually(WAIT, "worker memory gauges", || {
        let sc = scrape(m);
        let per: u64 = ["1", "2"]
            .iter()
            .map(|w| sc.count(&format!("supervisor_worker_memory_bytes{{worker=\"{w}\"}}")))
            .filter(|&b| b > 0)
            .sum();
        (per > 0 && sc.count("supervisor_memory_bytes") == per).then_some(())
    });
    // Only /metrics is served there.
    assert_eq!(get(m, "/").status, 404);
    assert_eq!(get(m, "/metrics/x").status, 404);
}

#[test]
fn counters_do_not_go_back_when_workers_die_or_are_replaced() {
    let (s, m) = start(&["-w", "2"]);
    for _ in 0..10 {
        assert_eq!(s.get("/").status, 200);
    }
    wait_exactly(m, OK, 10);

    // kill -9 a worker: its record is freed and reused by the replacement.
    let victim = s.serving_pids()[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    eventually(WAIT, "a replacement for the killed worker", || {
        let pids = s.serving_pids();
        (pids.len() == 2 && !pids.contains(&victim)).then_some(())
    });
    let sc = scrape(m);
    assert_eq!(
        sc.count(OK),
        10,
        "the dead worker's requests are still counted"
    );
    assert_eq!(sc.count(COUNT), 10);
    // The death is counted, as a SIGKILL the master did not send.
    assert_eq!(sc.count(&deaths("sigkill")), 1);
    assert_eq!(sc.count(&deaths("exit")) + sc.count(&deaths("signal")), 0);

    // A reload replaces both workers: two recycles, and still every request.
    s.signal(Signal::SIGHUP);
    let sc = wait_exactly(m, "supervisor_recycles_total{reason=\"reload\"}", 2);
    assert_eq!(sc.count(OK), 10);
    assert_eq!(
        sc.count("supervisor_recycles_total{reason=\"max_requests\"}"),
        0
    );
    assert_eq!(sc.count(&deaths("sigkill")), 1, "a recycle is not a death");
    assert_eq!(s.get("/").status, 200);
    let sc = wait_exactly(m, OK, 11);
    assert_eq!(sc.count(COUNT), 11);
}

#[test]
fn app_restarts_are_counted_and_kept_when_the_worker_is_replaced() {
    const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
    let (s, m) = start(&["-w", "1", "--", "python3", APP, "--uds", "{socket}"]);
    let app_pid = || -> u32 {
        let r = s.get("/");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text().rsplit(' ').next().unwrap().parse().unwrap()
    };
    let first = app_pid();
    assert_eq!(scrape(m).count("supervisor_app_restarts_total"), 0);
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    wait_exactly(m, "supervisor_app_restarts_total", 1);
    eventually(WAIT, "the restarted app to serve", || {
        try_get(s.addr, "/")
            .ok()
            .filter(|r| r.status == 200)
            .map(|_| ())
    });
    assert_ne!(app_pid(), first);
    // The app process and the HTTP worker are replaced: its restart stays counted, and the
    // app's death was not its host's.
    s.signal(Signal::SIGHUP);
    let sc = wait_exactly(m, "supervisor_recycles_total{reason=\"reload\"}", 2);
    assert_eq!(sc.count("supervisor_app_restarts_total"), 1);
    for cause in ["exit", "sigkill", "signal"] {
        assert_eq!(sc.count(&deaths(cause)), 0, "{cause}");
    }
}

#[test]
fn max_requests_recycles_are_counted_and_lose_no_request() {
    let (s, m) = start(&["-w", "1", "--set", "worker.max_requests=5"]);
    for _ in 0..12 {
        assert_eq!(s.get("/").status, 200);
    }
    wait_exactly(m, OK, 12);
    eventually(WAIT, "a max_requests recycle", || {
        let sc = scrape(m);
        assert_eq!(sc.count(OK), 12);
        (sc.count("supervisor_recycles_total{reason=\"max_requests\"}") >= 1).then_some(())
    });
}

#[test]
fn rate_limited_requests_are_counted_as_rejections() {
    // 3 at once, then one per 20 s.
    let (s, m) = start(&["-w", "2", "--set", "limits.rate=3/min"]);
    let statuses: Vec<u16> = (0..10).map(|_| s.get("/").status).collect();
    let limited = statuses.iter().filter(|&&c| c == 429).count() as u64;
    let passed = statuses.iter().filter(|&&c| c == 200).count() as u64;
    assert_eq!(limited + passed, 10, "{statuses:?}");
    assert!(limited >= 5, "{statuses:?}");
    let sc = wait_exactly(m, &rejections("rate_limit"), limited);
    wait_exactly(m, NOT_FOUND, limited);
    wait_exactly(m, OK, passed);
    assert_eq!(sc.count(&rejections("worker_limit")), 0);
}

/// Sends `GET path` from a thread; the answer (or the error, when the server goes away
/// first) comes back on the handle.
fn background(addr: SocketAddr, path: &str) -> std::thread::JoinHandle<std::io::Result<u16>> {
    let path = path.to_string();
    std::thread::spawn(move || try_get(addr, &path).map(|r| r.status))
}

/// A request that stays in flight for the rest of the test (the server is stopped first).
const STAYS: &str = "/sleep?ms=60000";

#[test]
fn worker_and_host_caps_are_told_apart() {
    // One request at a time per worker.
    let (s, m) = start(&["-w", "1", "--set", "worker.max_concurrent=1"]);
    let _slow = background(s.addr, STAYS);
    wait_exactly(m, "supervisor_requests_in_flight", 1);
    assert_eq!(s.get("/").status, 503);
    let sc = wait_exactly(m, &rejections("worker_limit"), 1);
    assert_eq!(sc.count(&rejections("host_limit")), 0);
    let sc = wait_exactly(m, UNAVAILABLE, 1);
    assert_eq!(sc.count(OK), 0);
    drop(s);

    // One request at a time on the host, across two workers.
    let (s, m) = start(&["-w", "2", "--set", "limits.max_concurrent_requests=1"]);
    let _slow = background(s.addr, STAYS);
    wait_exactly(m, "supervisor_host_requests_in_flight", 1);
    assert_eq!(s.get("/").status, 503);
    let sc = wait_exactly(m, &rejections("host_limit"), 1);
    assert_eq!(sc.count(&rejections("worker_limit")), 0);
    wait_exactly(m, UNAVAILABLE, 1);
}

#[test]
fn queue_depth_and_queue_refusals_are_counted() {
    let (s, m) = start(&[
        "-w",
        "1",
        "--set",
        "worker.max_concurrent=1",
        "--set",
        "limits.queue=1",
        "--set",
        "limits.queue_timeout=5s",
    ]);
    let _slow = background(s.addr, STAYS);
    wait_exactly(m, "supervisor_requests_in_flight", 1);
    let waiting = background(s.addr, "/");
    wait_exactly(m, "supervisor_queue_depth", 1);
    // The queue is full: refused at once.
    assert_eq!(s.get("/").status, 503);
    wait_exactly(m, &rejections("queue_full"), 1);
    // The waiting one gives up after queue_timeout.
    assert_eq!(waiting.join().unwrap().unwrap(), 503);
    let sc = wait_exactly(m, &rejections("queue_timeout"), 1);
    assert_eq!(sc.count(&rejections("worker_limit")), 0);
    wait_exactly(m, "supervisor_queue_depth", 0);
    let sc = wait_exactly(m, UNAVAILABLE, 2);
    assert_eq!(sc.count(OK), 0);
}

/// Ports of the TCP sockets `pid` has listening.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = fd_targets(pid)
        .into_iter()
        .filter_map(|(_, t)| {
            t.strip_prefix("socket:[")
                .map(|i| i.trim_end_matches(']').to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; the inode is field 9.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit_once(':').unwrap().1;
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

#[test]
fn metrics_are_off_by_default() {
    let s = Server::start(&["-w", "1"]);
    assert_eq!(listening_ports(s.pid()), [s.addr.port()], "only the server");
    assert!(
        !s.log.text().contains("metrics: serving"),
        "{}",
        s.log.text()
    );
    // The same check sees the metrics socket when there is one.
    let (s, m) = start(&["-w", "1"]);
    let mut ports = listening_ports(s.pid());
    ports.sort_unstable();
    let mut want = vec![s.addr.port(), m.port()];
    want.sort_unstable();
    assert_eq!(ports, want);
}

#[test]
fn a_metrics_address_in_use_is_a_clear_startup_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let bind = format!("metrics.bind=127.0.0.1:{port}");
    let (code, _, err) = run(
        dir.path(),
        &["start", "-b", "127.0.0.1:0", "-w", "1", "--set", &bind],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot listen on metrics.bind 127.0.0.1:{port}"))
            && err.contains("in use"),
        "{err}"
    );
    assert!(
        !err.contains("worker ready"),
        "started workers first: {err}"
    );
    // A value that is no address is a config error (exit 2) naming the key.
    let (code, _, err) = run(
        dir.path(),
        &["start", "--set", "metrics.bind=localhost"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("metrics.bind"), "{err}");
}

#[test]
fn a_reload_that_moves_metrics_says_it_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "supervisor.toml",
        "[metrics]\nbind = \"127.0.0.1:0\"\n",
    );
    let config = config.to_str().unwrap().to_string();
    let s = Server::spawn_in(dir, &["-b", "127.0.0.1:0", "-w", "1", "-c", &config]).wait_ready();
    let m = metrics_addr(&s);
    std::fs::write(&config, "[metrics]\nbind = \"127.0.0.1:1\"\n").unwrap();
    s.signal(Signal::SIGHUP);
    s.log
        .wait_for(WAIT, |l| {
            l.contains("metrics.bind changes at the next start")
        })
        .expect("a warning about metrics.bind");
    // Still served where it was.
    scrape(m);
    // And still complete once the metrics are gone from the file: the replaced workers time
    // every request as before (the histogram counts what the requests count).
    let before = scrape(m).count(OK);
    std::fs::write(&config, "").unwrap();
    let old = s.serving_pids();
    s.signal(Signal::SIGHUP);
    eventually(WAIT, "the workers replaced", || {
        let now = s.serving_pids();
        (now.len() == 1 && !old.contains(&now[0])).then_some(())
    });
    for _ in 0..5 {
        assert_eq!(s.get("/").status, 200);
    }
    let sc = wait_exactly(m, OK, before + 5);
    assert_eq!(sc.count(COUNT), sc.count(OK), "every request timed");
}

#[test]
fn workers_on_a_live_redis_are_counted_connected_then_degraded_when_it_goes() {
    let redis = crate::cluster_limits::Redis::start();
    let url = format!("redis.url={}", redis.url());
    let (s, m) = start(&[
        "-w",
        "2",
        "--set",
        &url,
        "--set",
        "limits.cluster_max_concurrent_requests=5",
    ]);
    let connected = "supervisor_redis_workers{state=\"connected\"}";
    let degraded = "supervisor_redis_workers{state=\"degraded\"}";
    let sc = wait_exactly(m, connected, 2);
    assert_eq!(sc.count(degraded), 0);
    assert_eq!(sc.count("supervisor_redis_degraded_requests_total"), 0);
    drop(redis); // SIGKILL, socket gone
                 // Each worker finds out at its next call (a request, or its idle probe).
    eventually(WAIT, "both workers degraded", || {
        let _ = try_get(s.addr, "/");
        let sc = scrape(m);
        (sc.count(degraded) == 2 && sc.count(connected) == 0).then_some(())
    });
}

#[test]
fn time_degraded_without_redis_is_counted_and_kept_across_a_worker_death() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis.url=unix://{}/nothing.sock", dir.path().display());
    let (s, m) = start(&[
        "-w",
        "1",
        "--set",
        &url,
        "--set",
        "limits.cluster_max_concurrent_requests=5",
    ]);
    for _ in 0..6 {
        assert_eq!(s.get("/").status, 200);
    }
    let sc = wait_exactly(m, "supervisor_redis_degraded_requests_total", 6);
    assert_eq!(sc.count("supervisor_redis_workers{state=\"degraded\"}"), 1);
    assert_eq!(sc.count("supervisor_redis_workers{state=\"connected\"}"), 0);
    // Degraded since it started: whole seconds pile up.
    let before = eventually(WAIT, "a second spent degraded", || {
        let n = scrape(m).count("supervisor_redis_degraded_seconds_total");
        (n >= 1).then_some(n)
    });
    let victim = s.serving_pids()[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    eventually(WAIT, "a replacement", || {
        let pids = s.serving_pids();
        (pids.len() == 1 && pids[0] != victim).then_some(())
    });
    let sc = scrape(m);
    assert!(
        sc.count("supervisor_redis_degraded_seconds_total") >= before,
        "went back"
    );
    assert_eq!(sc.count("supervisor_redis_degraded_requests_total"), 6);
}

#[test]
fn idle_scrapers_are_cut_off_and_never_hold_up_the_server() {
    use std::io::Read;
    let (s, m) = start(&["-w", "1"]);
    // More silent connections than the exporter serves at once.
    let mut idle: Vec<std::net::TcpStream> = (0..6)
        .map(|_| std::net::TcpStream::connect(m).unwrap())
        .collect();
    // The server itself is not affected.
    assert_eq!(s.get("/").status, 200);
    // Each silent connection is closed after the header timeout...
    for c in &mut idle {
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 64];
        let n = c
            .read(&mut buf)
            .expect("closed by the exporter before the client's timeout");
        assert!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    // ...and a real scrape gets through.
    wait_exactly(m, OK, 1);
}

#[test]
fn silent_connections_do_not_delay_a_scrape() {
    let (_s, m) = start(&["-w", "1"]);
    // Twice as many connections that send nothing as the exporter serves at once.
    let silent: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(m).unwrap())
        .collect();
    for _ in 0..3 {
        // Well under the silent ones' 5 s header timeout: they are not waited out.
        let mut c = std::net::TcpStream::connect(m).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        std::io::Write::write_all(
            &mut c,
            b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let r = read_response(&mut std::io::BufReader::new(c))
            .expect("a scrape answered within 3 s beside silent connections");
        assert_eq!(r.status, 200);
        parse(&r.text());
    }
    drop(silent);
}

/// `/livez` and `/readyz` for an orchestrator: ready while workers serve and an app process
/// takes requests; not ready once a stop has begun (the workers drain, the listeners still
/// answer the requests in flight), so that a load balancer stops sending first.
#[test]
fn readyz_says_ready_while_serving_and_not_ready_once_draining() {
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
    let (mut s, m) = start(&[
        "-w",
        "2",
        "--set",
        "server.graceful_timeout=20s",
        "--",
        "python3",
        app,
        "--uds",
        "{socket}",
    ]);
    let live = get(m, "/livez");
    assert_eq!((live.status, live.text().as_str()), (200, "live\n"));
    let ready = eventually(WAIT, "every app process up", || {
        let r = get(m, "/readyz");
        (r.status == 200 && r.text().contains("2 of 2 app processes")).then_some(r)
    });
    assert!(ready.text().starts_with("ready: "), "{}", ready.text());
    // A request in flight keeps the stop draining.
    let addr = s.addr;
    let held = std::thread::spawn(move || get(addr, "/sleep?ms=3000"));
    eventually(WAIT, "the request in flight", || {
        (s.status()["global_inflight"] == 1).then_some(())
    });
    s.signal(Signal::SIGTERM);
    let not_ready = eventually(WAIT, "/readyz to say not ready", || {
        let r = get(m, "/readyz");
        (r.status == 503).then_some(r)
    });
    assert!(
        not_ready.text().contains("no HTTP worker is serving"),
        "{}",
        not_ready.text()
    );
    assert_eq!(get(m, "/livez").status, 200, "still live while it drains");
    assert_eq!(
        held.join().unwrap().status,
        200,
        "the request in flight is answered"
    );
    assert!(s.wait_exit(WAIT).success());
}
