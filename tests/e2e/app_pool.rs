//! The app processes as one pool behind the HTTP workers (`app.command`): any HTTP worker sends
//! a request to the least busy open app process, requests wait host-wide first come first
//! served when all are busy, and the app processes have the whole lifecycle (recycling, crash,
//! hang, reload, stop) without losing a request.
//!
//! The app is the standard-library test app; `GET /block?file=PATH` holds its whole process
//! (every other request to it waits) until the test creates PATH, so that "still in flight" and
//! "answered" are ordered by the test, never by wall-clock speed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::util::{alive, eventually, exchange, try_get, Response, Server};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
const WAIT: Duration = Duration::from_secs(10);

/// `supervisor start -w APPS --set server.http_workers=HTTP SETTINGS... -- python3
/// stdlib_app.py --uds {socket} EXTRA...`, ready once every app process is.
fn start_pool(apps: u32, http: u32, settings: &[&str], extra: &[&str]) -> Server {
    let w = apps.to_string();
    let h = format!("server.http_workers={http}");
    let mut args = vec!["-w", w.as_str(), "--set", h.as_str()];
    args.extend_from_slice(settings);
    args.extend_from_slice(&["--", "python3", APP, "--uds", "{socket}"]);
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    assert_eq!(
        s.status()["workers"].as_array().unwrap().len(),
        http as usize
    );
    serving_apps(&s, apps as usize);
    s
}

/// The app processes `status` lists.
fn apps(s: &Server) -> Vec<Value> {
    s.status()["apps"]
        .as_array()
        .expect("an apps array")
        .clone()
}

/// App number -> the app's pid, once exactly `n` app processes serve (each with its app up).
fn serving_apps(s: &Server, n: usize) -> BTreeMap<u64, u32> {
    eventually(WAIT, "the app processes to serve", || {
        let serving: BTreeMap<u64, u32> = apps(s)
            .iter()
            .filter(|a| a["state"] == "serving" && a["app_pid"].as_u64() != Some(0))
            .map(|a| {
                (
                    a["worker_id"].as_u64().unwrap(),
                    a["app_pid"].as_u64().unwrap() as u32,
                )
            })
            .collect();
        (serving.len() == n).then_some(serving)
    })
}

/// The pid of the app process that answered `GET /` ("app ID PID").
fn answered_by(r: &Response) -> u32 {
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {:?}", r.text()))
}

/// `GET /block` requests and the files that release them.
struct Blocks {
    dir: tempfile::TempDir,
}

/// One `GET /block` in flight.
struct Block {
    file: PathBuf,
    /// The app process it holds (its number).
    app: u64,
    answer: JoinHandle<std::io::Result<Response>>,
}

impl Blocks {
    fn new() -> Blocks {
        Blocks {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Sends `GET /block` (held at most `ms`) and waits until an app process holds it.
    fn hold(&self, s: &Server, name: &str, ms: u64) -> Block {
        let file = self.dir.path().join(name);
        let target = format!("/block?file={}&ms={ms}", file.display());
        let addr = s.addr;
        let answer = std::thread::spawn(move || try_get(addr, &target));
        let needle = format!("until {} exists", file.display());
        let line = s
            .log
            .wait_for(WAIT, |l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no app process began {name}"));
        let app = line
            .split("app{app.id=")
            .nth(1)
            .and_then(|r| r.split('}').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("the app's line is tagged with its number: {line}"));
        Block { file, app, answer }
    }
}

impl Block {
    fn release(&self) {
        std::fs::write(&self.file, b"").unwrap();
    }

    fn answer(self) -> Response {
        self.answer
            .join()
            .unwrap()
            .expect("the blocking request answered")
    }
}

/// One request of a background client.
#[derive(Debug)]
struct Outcome {
    sent: Instant,
    /// The status; 0 when the exchange failed (reset, closed before an answer).
    status: u16,
    body: String,
}

/// Clients that send `GET path` in a loop, a new connection each (as many clients do), until
/// told to stop, `max` requests each, or 30 s.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    clients: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, path: &'static str, max: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let clients = (0..clients)
            .map(|_| {
                let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut out = Vec::new();
                    while out.len() < max
                        && !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                    {
                        let sent = Instant::now();
                        let outcome = match try_get(addr, path) {
                            Ok(r) => Outcome {
                                sent,
                                status: r.status,
                                body: r.text(),
                            },
                            Err(e) => Outcome {
                                sent,
                                status: 0,
                                body: e.to_string(),
                            },
                        };
                        out.push(outcome);
                        done.fetch_add(1, Ordering::Relaxed);
                        // Pacing, not synchronisation: a steady load, not a flood of two cores.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    out
                })
            })
            .collect();
        Load {
            stop,
            done,
            clients,
        }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have been answered (or failed) from now.
    fn wait_more(&self, n: u64, what: &str) {
        let target = self.done() + n;
        eventually(WAIT, what, || (self.done() >= target).then_some(()));
    }

    fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    }
}

/// Panics with every request that did not get a 200.
#[track_caller]
fn assert_all_ok(outcomes: &[Outcome], what: &str) {
    let failed: Vec<_> = outcomes.iter().filter(|o| o.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed: {failed:?}",
        failed.len(),
        outcomes.len()
    );
}

/// Children of `pid` (of any of its threads), from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The master's app hosts (`supervisor worker --app`) that live (not zombies).
fn app_hosts(master: u32) -> Vec<u32> {
    children(master)
        .into_iter()
        .filter(|&c| {
            alive(c)
                && std::fs::read(format!("/proc/{c}/cmdline"))
                    .is_ok_and(|cmd| cmd.split(|&b| b == 0).any(|a| a == b"--app"))
        })
        .collect()
}

/// Every process under `pid`, children first.
fn descendants(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut next = children(pid);
    while let Some(p) = next.pop() {
        next.extend(children(p));
        all.push(p);
    }
    all
}

/// The log lines saying an app process was recycled.
fn app_recycles(s: &Server) -> usize {
    s.log
        .lines()
        .iter()
        .filter(|l| l.contains("worker recycled") && l.contains("worker.id=app-"))
        .count()
}

#[test]
fn requests_reach_every_app_process() {
    for http in [1, 2] {
        let s = start_pool(3, http, &[], &[]);
        let pids = serving_apps(&s, 3);
        // One after another: every app process answers some.
        let mut seen = BTreeSet::new();
        for _ in 0..60 {
            let pid = answered_by(&s.get("/"));
            assert!(
                pids.values().any(|&p| p == pid),
                "http_workers={http}: answered by {pid}, not one of {pids:?}"
            );
            seen.insert(pid);
            if seen.len() == 3 {
                break;
            }
        }
        assert_eq!(
            seen.len(),
            3,
            "http_workers={http}: 60 requests reached only {seen:?} of {pids:?}"
        );
        let counted: Vec<u64> = apps(&s)
            .iter()
            .map(|a| a["requests"].as_u64().unwrap())
            .collect();
        assert!(
            counted.iter().all(|&n| n > 0),
            "http_workers={http}: status counts requests sent to each: {counted:?}"
        );
        // At once: three requests that hold their app process go to three app processes.
        let blocks = Blocks::new();
        let held: Vec<Block> = (0..3)
            .map(|i| blocks.hold(&s, &format!("b{i}"), 10_000))
            .collect();
        let used: BTreeSet<u64> = held.iter().map(|b| b.app).collect();
        assert_eq!(used.len(), 3, "http_workers={http}: spread over {used:?}");
        let inflight: Vec<u64> = apps(&s)
            .iter()
            .map(|a| a["inflight"].as_u64().unwrap())
            .collect();
        assert_eq!(inflight, [1, 1, 1], "http_workers={http}: status in flight");
        for b in &held {
            b.release();
        }
        for b in held {
            let r = b.answer();
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(r.text().starts_with("released"), "{}", r.text());
        }
    }
}

#[test]
fn a_blocked_app_process_does_not_delay_requests_while_another_is_free() {
    for concurrency in [1, 0] {
        let setting = format!("app.concurrency={concurrency}");
        let s = start_pool(2, 2, &["--set", &setting], &[]);
        let pids = serving_apps(&s, 2);
        let blocks = Blocks::new();
        let block = blocks.hold(&s, "hold", 10_000);
        let free = pids[&(3 - block.app)];
        let answers: Vec<Response> = if concurrency == 1 {
            // Several at once: they wait for the free one, never for the blocked one.
            let clients: Vec<_> = (0..4)
                .map(|_| {
                    let addr = s.addr;
                    std::thread::spawn(move || {
                        (0..5)
                            .map(|_| try_get(addr, "/").expect("an answer"))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            clients
                .into_iter()
                .flat_map(|c| c.join().unwrap())
                .collect()
        } else {
            // No limit per app: the least busy (none in flight) is chosen, not the blocked one.
            (0..20).map(|_| s.get("/")).collect()
        };
        for r in &answers {
            assert_eq!(
                answered_by(r),
                free,
                "app.concurrency={concurrency}: answered by the free app process"
            );
        }
        assert!(
            !block.answer.is_finished(),
            "app.concurrency={concurrency}: the blocking request was still in flight"
        );
        block.release();
        let r = block.answer();
        assert!(r.text().starts_with("released"), "{}", r.text());
    }
}

#[test]
fn recycling_app_processes_loses_no_request() {
    let s = start_pool(3, 2, &["--set", "worker.max_requests=20"], &[]);
    let before = serving_apps(&s, 3);
    let load = Load::start(s.addr, 3, "/", 4000);
    let after = eventually(
        Duration::from_secs(20),
        "every app process replaced",
        || {
            let now = serving_apps(&s, 3);
            let replaced = now.values().all(|p| !before.values().any(|b| b == p));
            (replaced && app_recycles(&s) >= 3).then_some(now)
        },
    );
    load.wait_more(60, "requests to the new app processes");
    let outcomes = load.finish();
    assert_all_ok(&outcomes, "while app processes were recycled");
    let answered: BTreeSet<&str> = outcomes
        .iter()
        .filter_map(|o| o.body.rsplit(' ').next())
        .collect();
    assert!(
        answered.len() >= 6,
        "answered by {} app processes, the first three and their replacements",
        answered.len()
    );
    eprintln!("app processes {before:?} -> {after:?}");
    assert!(
        apps(&s)
            .iter()
            .all(|a| a["generation"].as_u64().unwrap() > 0),
        "every app number's generation advanced"
    );
}

#[test]
fn a_crashed_app_process_fails_only_its_own_requests_and_is_restarted() {
    let s = start_pool(3, 2, &[], &[]);
    let before = serving_apps(&s, 3);
    let victim = before[&2];
    let load = Load::start(s.addr, 3, "/", 3000);
    load.wait_more(30, "requests before the crash");
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let exited = format!("app.pid={victim} ");
    s.log
        .wait_for(WAIT, |l| {
            l.contains("the app exited") && l.contains(&exited)
        })
        .expect("its host saw it die");
    // From here its host has closed it to new requests.
    let noticed = Instant::now();
    let restarted = eventually(WAIT, "app process 2 restarted", || {
        serving_apps(&s, 3)
            .get(&2)
            .copied()
            .filter(|&p| p != victim)
    });
    s.log
        .wait_for(WAIT, |l| {
            l.contains("app ready") && l.contains(&format!("app.pid={restarted} "))
        })
        .expect("the restarted app ready");
    load.wait_more(60, "requests after the restart");
    let outcomes = load.finish();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != 200).collect();
    // Only requests it had, or was given before its host saw it die (a few ms), may fail.
    assert!(failed.len() <= 6, "too many failed: {failed:?}");
    for f in &failed {
        assert_eq!(f.status, 502, "{f:?}");
        assert!(
            f.sent < noticed,
            "a request sent once its host knew it dead failed: {f:?}"
        );
    }
    assert!(
        outcomes
            .iter()
            .any(|o| o.body.ends_with(&format!(" {restarted}"))),
        "the restarted app process answers"
    );
    for (id, pid) in &before {
        if *id != 2 {
            assert_eq!(serving_apps(&s, 3)[id], *pid, "app process {id} untouched");
        }
    }
}

#[test]
fn an_app_process_that_exits_under_load_is_replaced_and_no_other_request_fails() {
    // One request per app process: the one that asks it to exit is the only one on it.
    let s = start_pool(3, 2, &["--set", "app.concurrency=1"], &[]);
    let before = serving_apps(&s, 3);
    let load = Load::start(s.addr, 2, "/", 3000);
    load.wait_more(30, "requests before the exit");
    let r = s.get("/exit");
    assert_eq!(r.status, 502, "{}", r.text());
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("exiting on request"))
        .unwrap();
    let id: u64 = line
        .split("app{app.id=")
        .nth(1)
        .and_then(|r| r.split('}').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    eventually(WAIT, "the app process restarted", || {
        (serving_apps(&s, 3)[&id] != before[&id]).then_some(())
    });
    load.wait_more(60, "requests after the restart");
    assert_all_ok(&load.finish(), "while an app process exited");
}

#[test]
fn a_hung_app_process_is_killed_its_request_gets_504_and_others_200() {
    let s = start_pool(
        2,
        2,
        &[
            "--set",
            "app.kill_on_timeout=true",
            "--set",
            "worker.request_timeout=2s",
            "--set",
            "app.concurrency=1",
        ],
        &[],
    );
    let before = serving_apps(&s, 2);
    let load = Load::start(s.addr, 2, "/", 3000);
    load.wait_more(20, "requests before the hang");
    let blocks = Blocks::new();
    // Never released: it passes request_timeout.
    let hung = blocks.hold(&s, "never", 10_000);
    let app = hung.app;
    let r = hung.answer();
    assert_eq!(r.status, 504, "{}", r.text());
    s.log
        .wait_for(WAIT, |l| l.contains("killing the app process"))
        .expect("the kill logged");
    eventually(WAIT, "the hung app process restarted", || {
        (serving_apps(&s, 2)[&app] != before[&app]).then_some(())
    });
    load.wait_more(40, "requests after the restart");
    assert_all_ok(&load.finish(), "while an app process hung");
}

#[test]
fn reload_replaces_every_app_process_and_loses_no_request() {
    let s = start_pool(3, 2, &[], &[]);
    let before = serving_apps(&s, 3);
    let load = Load::start(s.addr, 3, "/", 3000);
    load.wait_more(30, "requests before the reload");
    s.signal(Signal::SIGHUP);
    let after = eventually(WAIT, "every app process replaced", || {
        let now = serving_apps(&s, 3);
        let replaced = now.values().all(|p| !before.values().any(|b| b == p))
            && before.values().all(|&b| !alive(b));
        replaced.then_some(now)
    });
    load.wait_more(60, "requests after the reload");
    let outcomes = load.finish();
    assert_all_ok(&outcomes, "during the reload");
    for pid in after.values() {
        assert!(
            outcomes
                .iter()
                .any(|o| o.body.ends_with(&format!(" {pid}"))),
            "the new app process {pid} answers"
        );
    }
}

/// Counted throughout: the app processes alive (children of the master's app hosts, zombies
/// not counted) and the app hosts alive. Neither ever exceeds `workers + max_recycling`.
#[test]
fn a_recycle_storm_never_runs_more_than_max_recycling_extra_app_processes() {
    const WORKERS: usize = 4;
    const MAX_RECYCLING: usize = 1;
    let s = start_pool(
        WORKERS as u32,
        2,
        &[
            "--set",
            "worker.max_requests=10",
            "--set",
            "worker.max_recycling=1",
        ],
        &[],
    );
    let master = s.pid();
    let load = Load::start(s.addr, 3, "/", 3000);
    let (mut most_apps, mut most_hosts, mut samples) = (0, 0, 0u64);
    let deadline = Instant::now() + Duration::from_secs(14);
    while app_recycles(&s) < 4 && Instant::now() < deadline {
        let hosts = app_hosts(master);
        let apps = hosts
            .iter()
            .flat_map(|&h| children(h))
            .filter(|&a| alive(a))
            .count();
        if apps > most_apps || hosts.len() > most_hosts {
            eprintln!(
                "sample {samples}: {apps} app processes, {} app hosts",
                hosts.len()
            );
        }
        most_apps = most_apps.max(apps);
        most_hosts = most_hosts.max(hosts.len());
        samples += 1;
        // Pacing of the sampler, not synchronisation.
        std::thread::sleep(Duration::from_millis(2));
    }
    let outcomes = load.finish();
    let recycled = app_recycles(&s);
    assert!(
        recycled >= 4,
        "only {recycled} app processes recycled in 14 s"
    );
    assert_all_ok(&outcomes, "during the recycle storm");
    assert!(
        most_apps <= WORKERS + MAX_RECYCLING,
        "{most_apps} app processes at once ({samples} samples)"
    );
    assert!(
        most_hosts <= WORKERS + MAX_RECYCLING,
        "{most_hosts} app hosts at once ({samples} samples)"
    );
    // The replacement was up before the one it replaced stopped (a surge, not a gap).
    assert_eq!(
        most_apps,
        WORKERS + MAX_RECYCLING,
        "a replacement ran beside the app process it replaced"
    );
}

/// Requests read by one HTTP worker: a keep-alive connection whose requests it serves.
struct Conn {
    stream: std::net::TcpStream,
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl Conn {
    /// A keep-alive connection served by HTTP worker `worker` (reuseport spreads connections;
    /// a few tries find one).
    fn to_worker(addr: SocketAddr, worker: &str) -> Conn {
        for _ in 0..200 {
            let stream = std::net::TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let mut c = Conn {
                reader: std::io::BufReader::new(stream.try_clone().unwrap()),
                stream,
            };
            let r = c.ask("GET / HTTP/1.1\r\nHost: t\r\n\r\n");
            if r.header("x-worker-id") == Some(worker) {
                return c;
            }
        }
        panic!("no connection to HTTP worker {worker} in 200 tries");
    }

    fn send(&mut self, raw: &str) {
        std::io::Write::write_all(&mut self.stream, raw.as_bytes()).unwrap();
    }

    fn read(&mut self) -> Response {
        crate::util::read_response(&mut self.reader).unwrap()
    }

    fn ask(&mut self, raw: &str) -> Response {
        self.send(raw);
        self.read()
    }
}

/// In flight in each HTTP worker (waiting for an app process included), by worker number.
fn http_inflight(s: &Server) -> BTreeMap<u64, u64> {
    s.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["worker_id"].as_u64().unwrap(),
                w["inflight"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn requests_waiting_for_an_app_process_are_served_in_arrival_order_host_wide() {
    let s = start_pool(2, 2, &["--set", "app.concurrency=1"], &[]);
    // Kept-alive connections to each HTTP worker, made before the app processes are busy.
    let mut conns: Vec<Conn> = (0..6)
        .map(|i| Conn::to_worker(s.addr, if i % 2 == 0 { "1" } else { "2" }))
        .collect();
    let blocks = Blocks::new();
    let first = blocks.hold(&s, "first", 10_000);
    let second = blocks.hold(&s, "second", 10_000);
    assert_ne!(first.app, second.app);
    // Both app processes busy: each request waits; the next is sent once it does, from the
    // other HTTP worker.
    let mut expected = http_inflight(&s);
    for (i, c) in conns.iter_mut().enumerate() {
        c.send("POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
        *expected.get_mut(&(i as u64 % 2 + 1)).unwrap() += 1;
        eventually(WAIT, "the request to wait", || {
            (http_inflight(&s) == expected).then_some(())
        });
    }
    // One app process is freed: it takes them one at a time, the oldest first.
    first.release();
    let counts: Vec<String> = conns.iter_mut().map(|c| c.read().text()).collect();
    assert_eq!(
        counts,
        ["1", "2", "3", "4", "5", "6"],
        "the app saw the requests in the order they arrived"
    );
    assert!(
        !second.answer.is_finished(),
        "the other app process is still held"
    );
    second.release();
    assert_eq!(first.answer().status, 200);
    assert_eq!(second.answer().status, 200);
}

#[test]
fn a_graceful_stop_finishes_requests_in_flight_and_waiting_then_leaves_no_process() {
    let mut s = start_pool(
        2,
        2,
        &[
            "--set",
            "app.concurrency=1",
            "--set",
            "worker.request_timeout=6s",
        ],
        &[],
    );
    let everything = descendants(s.pid());
    assert_eq!(everything.len(), 6, "2 HTTP workers, 2 app hosts, 2 apps");
    let blocks = Blocks::new();
    let held = [blocks.hold(&s, "a", 10_000), blocks.hold(&s, "b", 10_000)];
    // Two more wait for an app process.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let addr = s.addr;
            std::thread::spawn(move || {
                exchange(
                    addr,
                    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                )
            })
        })
        .collect();
    eventually(WAIT, "four requests in flight", || {
        (http_inflight(&s).values().sum::<u64>() == 4).then_some(())
    });
    s.signal(Signal::SIGTERM);
    // Both HTTP workers are draining (they wait for their requests) before any is released.
    eventually(WAIT, "the HTTP workers to drain", || {
        let workers = s.status()["workers"].as_array().unwrap().clone();
        workers
            .iter()
            .all(|w| w["state"] == "draining")
            .then_some(())
    });
    for b in &held {
        b.release();
    }
    for w in waiting {
        let r = w.join().unwrap().expect("an answer");
        assert_eq!(r.status, 200, "a waiting request: {}", r.text());
    }
    for b in held {
        let r = b.answer();
        assert_eq!(r.status, 200, "a request in flight: {}", r.text());
    }
    let status = s.wait_exit(WAIT);
    assert!(status.success(), "the master exits 0: {status:?}");
    let left: Vec<u32> = everything.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "processes left: {left:?}");
}

/// What the one HTTP worker and the one app process hold: (host-wide permits, requests in
/// flight in the app process's slot).
fn held_by(s: &Server) -> (u64, u64) {
    let st = s.status();
    (
        st["global_inflight"].as_u64().unwrap(),
        st["apps"][0]["inflight"].as_u64().unwrap(),
    )
}

/// Sends `GET /block?file=FILE` on a connection of its own and waits until the app process
/// holds it.
fn send_block(s: &Server, file: &std::path::Path) -> std::net::TcpStream {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        c,
        "GET /block?file={}&ms=600000 HTTP/1.1\r\nHost: t\r\n\r\n",
        file.display()
    )
    .unwrap();
    let needle = format!("until {} exists", file.display());
    s.log
        .wait_for(WAIT, |l| l.contains(&needle))
        .expect("the app process holds the request");
    c
}

/// The permits and the app process's slot (`app.concurrency = 1`: one leaked would leave the
/// app unreachable) come back exactly when the app is done with the request: not while it still
/// works on it, however the client behaves (reset, half-close, never reading, trickling its
/// body), and not later, when it answers, crashes or closes its connection. "Still working" and
/// "done" are ordered by the test (the app holds `/block` until the test creates a file), not by
/// wall-clock speed.
#[test]
fn the_app_slot_and_the_permits_come_back_exactly_when_the_app_is_done() {
    let s = start_pool(
        1,
        1,
        &[
            "--set",
            "app.concurrency=1",
            "--set",
            "limits.max_concurrent_requests=5",
            "--set",
            "worker.request_timeout=1h",
            "--set",
            "worker.min_rate_grace=1s",
            "--set",
            "worker.min_request_rate=100",
            "--set",
            "worker.min_response_rate=1MiB/s",
        ],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let idle = |what: &str| back_to_idle(&s, what);

    // A client that resets while the app works: held until the app answers, then back.
    let file = dir.path().join("reset");
    let c = send_block(&s, &file);
    assert_eq!(held_by(&s), (1, 1));
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    // The worker has seen the reset once the connection is gone from its count.
    eventually(WAIT, "the reset connection gone", || {
        (s.status()["workers"][0]["connections"] == 0).then_some(())
    });
    assert_eq!(held_by(&s), (1, 1), "released while the app still works");
    std::fs::write(&file, "").unwrap();
    idle("the app answered the reset client's request");

    // A client that half-closes after its request: held while the app works, answered, back.
    let file = dir.path().join("half");
    let c = send_block(&s, &file);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(held_by(&s), (1, 1));
    std::fs::write(&file, "").unwrap();
    let r = crate::util::read_response(&mut std::io::BufReader::new(&c)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    idle("the half-closed client answered");

    never_reading_client(&s, "/download?mb=64", (1, 1));
    idle("the app sent the rest of the never-read response");
    trickling_client(&s);
    idle("the trickled request refused");

    // The app crashes under a request: back at once (502), an hour before request_timeout.
    let app = serving_apps(&s, 1)[&1];
    let file = dir.path().join("crash");
    let c = send_block(&s, &file);
    assert_eq!(held_by(&s), (1, 1));
    kill(Pid::from_raw(app as i32), Signal::SIGKILL).unwrap();
    let r = crate::util::read_response(&mut std::io::BufReader::new(&c)).unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    serving_apps(&s, 1);
    idle("the app crashed under the request");

    // The app closes its connection after its answer (uvicorn after an exception): the next
    // request takes the same slot.
    assert_eq!(s.get("/boom").status, 500);
    idle("the app closed its connection after its answer");
}

/// Waits until the request's permits and its app slot are back, then checks the one slot
/// takes the next request at once: nothing leaked.
fn back_to_idle(s: &Server, what: &str) {
    eventually(WAIT, what, || (held_by(s) == (0, 0)).then_some(()));
    assert_eq!(s.get("/").status, 200, "after: {what}");
}

/// A client that never reads a large response (`target`): the app cannot finish sending it,
/// so what it holds (`held`, as `held_by` says) stays held until the worker cuts the client
/// below min_response_rate and reads the rest.
fn never_reading_client(s: &Server, target: &str, held: (u64, u64)) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    write!(c, "GET {target} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    eventually(WAIT, "the download held", || {
        (held_by(s) == held).then_some(())
    });
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Reads nothing until cut: the worker resets the connection.
    s.log
        .wait_for(Duration::from_secs(20), |l| {
            l.contains("slower than worker.min_response_rate")
        })
        .expect("the stalled reader cut");
    let _ = c.read(&mut [0u8; 1]);
    drop(c);
}

/// A client that trickles its body: 408 below min_request_rate.
fn trickling_client(s: &Server) {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"POST /consume HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        .unwrap();
    let mut trickle = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for _ in 0..60 {
            if trickle.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200)); // the trickle itself, not a wait
        }
    });
    eventually(WAIT, "the trickled request held", || {
        (held_by(s) == (1, 1)).then_some(())
    });
    let r = crate::util::read_response(&mut std::io::BufReader::new(&c)).unwrap();
    assert_eq!(r.status, 408, "{}", r.text());
    drop(c);
    writer.join().unwrap();
}

/// `worker.max_requests_preboot = false`: no replacement is booted ahead and held beside an app
/// process nearing `max_requests` (one app process's memory saved); the replacement starts at
/// the limit, the old process serving until it is ready, and no request fails.
#[test]
fn without_preboot_no_replacement_waits_beside_an_app_process_before_its_limit() {
    let s = start_pool(
        1,
        1,
        &[
            "--set",
            "worker.max_requests=20",
            "--set",
            "worker.max_requests_preboot=false",
        ],
        &[],
    );
    let first = serving_apps(&s, 1)[&1];
    // One request at a time, looking after each: with preboot a replacement would be started
    // from the 10th on (half-way) and be listed at once.
    for n in 1..=19 {
        assert_eq!(s.get("/").status, 200);
        let listed = apps(&s);
        assert_eq!(listed.len(), 1, "after {n} requests: {listed:#?}");
    }
    // The 20th reaches the limit: the replacement starts then, and takes over once ready.
    let mut answered = std::collections::BTreeSet::new();
    eventually(WAIT, "the replacement serving", || {
        let r = s.get("/");
        assert_eq!(r.status, 200, "{}", r.text());
        answered.insert(answered_by(&r));
        (answered.iter().any(|&p| p != first)).then_some(())
    });
    assert!(s.log.text().contains("reason=max_requests"));
}

/// Health checks in flight past the limits (`limits.health_paths`), summed over the workers.
fn health_held(s: &Server) -> u64 {
    s.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["health_inflight"].as_u64().unwrap())
        .sum()
}

/// Health checks skip the caps but not the app: their place among the 8 a worker lets past the
/// limits, and their app slot, come back exactly when the app is done, however the client or
/// the app behaves (a client that resets, half-closes or never reads; an app that answers late,
/// crashes or closes its connection). With `app.pack_window` on, so that the packed choice of
/// an app process gives its slot back as the strict one does. No host permit is ever taken.
#[test]
fn a_health_checks_place_and_app_slot_come_back_exactly_when_the_app_is_done() {
    let s = start_pool(
        1,
        1,
        &[
            "--set",
            "app.concurrency=1",
            "--set",
            "app.pack_window=1ms",
            "--set",
            r#"limits.health_paths=["/block", "/download", "/boom"]"#,
            "--set",
            "worker.request_timeout=1h",
            "--set",
            "worker.min_rate_grace=1s",
            "--set",
            "worker.min_response_rate=1MiB/s",
        ],
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    // (host permits, app slot) and the health place.
    let held = |s: &Server| (held_by(s), health_held(s));
    let idle = |what: &str| {
        eventually(WAIT, what, || (held(&s) == ((0, 0), 0)).then_some(()));
        assert_eq!(s.get("/").status, 200, "after: {what}");
    };

    // Answers late, to a client that resets meanwhile: held until the app answers.
    let file = dir.path().join("reset");
    let c = send_block(&s, &file);
    assert_eq!(held(&s), ((0, 1), 1));
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    eventually(WAIT, "the reset connection gone", || {
        (s.status()["workers"][0]["connections"] == 0).then_some(())
    });
    assert_eq!(held(&s), ((0, 1), 1), "released while the app still works");
    std::fs::write(&file, "").unwrap();
    idle("the app answered the reset client's probe");

    // A client that half-closes after its probe: held while the app works, answered, back.
    let file = dir.path().join("half");
    let c = send_block(&s, &file);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(held(&s), ((0, 1), 1));
    std::fs::write(&file, "").unwrap();
    let r = crate::util::read_response(&mut std::io::BufReader::new(&c)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    idle("the half-closed client answered");

    // A client that never reads: held until it is cut and the app has sent the rest.
    never_reading_client(&s, "/download?mb=64", (0, 1));
    assert_eq!(health_held(&s), 1, "still held while the app sends");
    idle("the app sent the rest of the never-read response");

    // The app crashes under the probe: back at once (502).
    let app = serving_apps(&s, 1)[&1];
    let file = dir.path().join("crash");
    let c = send_block(&s, &file);
    assert_eq!(held(&s), ((0, 1), 1));
    kill(Pid::from_raw(app as i32), Signal::SIGKILL).unwrap();
    let r = crate::util::read_response(&mut std::io::BufReader::new(&c)).unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    serving_apps(&s, 1);
    idle("the app crashed under the probe");

    // The app closes its connection after its answer.
    assert_eq!(s.get("/boom").status, 500);
    idle("the app closed its connection after its answer");
}
