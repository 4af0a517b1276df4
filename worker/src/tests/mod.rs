//! Tests of the serving core over real sockets: a `Server` on `127.0.0.1:0` with a real
//! scoreboard, driven by clients written here (raw HTTP/1.1 over TCP, and hyper's HTTP/2 client
//! for h2c). Counters are read through a second, read-only mapping of the scoreboard, the way
//! the master reads them, and the pipe to the master is read the way the master reads it. Waits
//! are bounded polls (`eventually`), never bare sleeps.

use std::io::{PipeReader, Read};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Config;
use crate::listener::Listener;
use crate::protocol::MasterPipe;
use crate::serve::server::{DrainSummary, Server};
use crate::serve::state::Worker;
use crate::shm::scoreboard::{Scoreboard, Slot};

mod app_choice;
mod builtin_routes;
mod client;
mod drain;
mod idle_app_connections;
mod log_reopen;
mod request_limits;
mod timeouts;
mod worker_life;

/// The record the server under test writes (not 0, to catch index mix-ups).
const SLOT: usize = 1;
/// The worker id under test.
const ID: u32 = 7;

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    /// The master's view of the scoreboard.
    pub(crate) view: Scoreboard,
    /// The master's end of the worker's pipe (non-blocking).
    pub(crate) master: PipeReader,
    /// The worker's own state, for tests that run worker-side pieces (the heartbeat) beside it.
    pub(crate) worker: &'static Worker,
    server: Option<Server>,
}

/// A worker core under test, however it listens.
pub(crate) struct Built {
    pub(crate) view: Scoreboard,
    pub(crate) master: PipeReader,
    pub(crate) worker: &'static Worker,
    pub(crate) server: Server,
}

/// Starts a worker core on a fresh loopback port, with a host-wide cap of `host_cap` and the
/// default config changed by `tweak`.
pub(crate) fn start(host_cap: u32, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    let built = build(OwnedFd::from(std_listener), host_cap, tweak);
    TestServer {
        addr,
        view: built.view,
        master: built.master,
        worker: built.worker,
        server: Some(built.server),
    }
}

/// Starts a worker core on an inherited listening socket of any kind. The worker's
/// `max_requests` is `worker.max_requests` of the config (as if its jitter were 0).
pub(crate) fn build(listener: OwnedFd, host_cap: u32, tweak: impl FnOnce(&mut Config)) -> Built {
    let mut config = Config::default();
    config.limits.max_concurrent_requests = host_cap;
    tweak(&mut config);
    let (board, memfd) = Scoreboard::create(2, host_cap).unwrap();
    let view = Scoreboard::open(&memfd, false).unwrap();
    let listener = Listener::from_fd(listener, config.server.backlog).unwrap();
    let (master, pipe) = master_pipe();
    let max_requests = config.worker.max_requests;
    let worker = Worker::new(
        &config,
        ID,
        board,
        SLOT,
        pipe,
        max_requests,
        Default::default(),
    );
    Built {
        view,
        master,
        worker,
        server: Server::start(worker, vec![listener]),
    }
}

/// A pipe as the master creates it: its (non-blocking) read end, and the worker's write end.
pub(crate) fn master_pipe() -> (PipeReader, MasterPipe) {
    let (read, write) = std::io::pipe().unwrap();
    nix::fcntl::fcntl(
        &read,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    (read, MasterPipe::new(OwnedFd::from(write)).unwrap())
}

/// Everything the worker has written to the pipe and the master has not read yet.
pub(crate) fn read_pipe(mut master: &PipeReader) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match master.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return got,
            Err(e) => panic!("reading the pipe: {e}"),
        }
    }
}

impl TestServer {
    /// Everything the worker has sent the master since the last call.
    pub(crate) fn pipe(&self) -> Vec<u8> {
        read_pipe(&self.master)
    }

    pub(crate) fn requests(&self) -> u64 {
        self.slot().requests.load(Ordering::Relaxed)
    }

    /// The described requests in flight, as the master reads them.
    pub(crate) fn in_flight(&self) -> Vec<String> {
        let mut seen: Vec<String> = self
            .slot()
            .requests_in_flight()
            .into_iter()
            .map(|(_, text)| text)
            .collect();
        seen.sort();
        seen
    }

    pub(crate) fn slot(&self) -> &Slot {
        self.view.slot(SLOT)
    }

    pub(crate) fn global_inflight(&self) -> u32 {
        self.view.header().global_inflight.load(Ordering::Relaxed)
    }

    pub(crate) fn inflight(&self) -> u32 {
        self.slot().inflight.load(Ordering::Relaxed)
    }

    pub(crate) fn connections(&self) -> u32 {
        self.slot().connections.load(Ordering::Relaxed)
    }

    /// Starts a graceful drain in the background.
    pub(crate) fn drain(&mut self, timeout: Duration) -> JoinHandle<DrainSummary> {
        let server = self.server.take().expect("drained once");
        tokio::spawn(server.drain(timeout))
    }

    /// Waits until nothing is held any more: no request in flight here, no host-wide permit.
    pub(crate) async fn assert_settles_to_zero(&self) {
        eventually(
            Duration::from_secs(3),
            "permits and counters back to 0",
            || {
                self.inflight() == 0
                    && self.global_inflight() == 0
                    && self.slot().held_global.load(Ordering::Relaxed) == 0
            },
        )
        .await;
    }
}

/// Polls `cond` every few milliseconds until it holds; fails the test after `limit`.
pub(crate) async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

mod process {
    use std::os::fd::OwnedFd;
    use std::process::ExitCode;

    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use crate::serve::state::Worker;
    use crate::shm::scoreboard::{monotonic_ms, Scoreboard};
    use crate::{run, WorkerArgs, EXIT_STARTUP, HEARTBEAT_INTERVAL};

    fn args(scoreboard: OwnedFd, slot: usize) -> WorkerArgs {
        let (_read, ready) = std::io::pipe().unwrap();
        WorkerArgs {
            id: 1,
            slot,
            app_host: false,
            master_pid: std::process::id(),
            listeners: Vec::new(),
            ready: OwnedFd::from(ready),
            max_requests: 0,
            hold: false,
            scoreboard,
            rates: crate::shm::ratelimit::RateTable::create(8).unwrap().1,
            runtime_dir: None,
            config: Default::default(),
        }
    }

    #[test]
    fn run_refuses_a_bad_scoreboard_or_record() {
        let (_read, not_a_board) = std::io::pipe().unwrap();
        assert_eq!(
            run(args(OwnedFd::from(not_a_board), 0)),
            ExitCode::from(EXIT_STARTUP)
        );
        let (_board, fd) = Scoreboard::create(2, 5).unwrap();
        assert_eq!(run(args(fd, 2)), ExitCode::from(EXIT_STARTUP));
    }

    #[tokio::test]
    async fn heartbeat_beats_from_the_event_loop() {
        let (board, fd) = Scoreboard::create(2, 5).unwrap();
        let view = Scoreboard::open(&fd, false).unwrap();
        let (_master, pipe) = super::master_pipe();
        let worker = Worker::new(
            &Default::default(),
            1,
            board,
            1,
            pipe,
            0,
            Default::default(),
        );
        let beat = || view.slot(1).heartbeat_ms.load(Ordering::Relaxed);

        let before = monotonic_ms();
        let task = crate::process::spawn_heartbeat(worker.admission.slot());
        let first = beat();
        assert!(first >= before, "stamped at once");
        super::eventually(HEARTBEAT_INTERVAL * 3, "a second beat", || {
            beat() >= first + 900
        })
        .await;

        // A blocked event loop stops it: that is what the master's hang detection sees.
        let stalled = beat();
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(beat(), stalled);
        task.abort();
    }
}
