//! SIGUSR1 reopens `log.file`, and never kills the worker. Signals go to a whole process, so the
//! worker under test is a child process: this test binary started again to run only `child`,
//! which calls `run` the way the binary's worker mode does.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::field::{Field, Visit};
use tracing::span;

use crate::shm::scoreboard::Scoreboard;
use crate::{run, WorkerArgs};

/// Tells `child` which directory it works in; without it, `child` does nothing.
const CHILD_DIR_ENV: &str = "WORKER_TEST_LOG_REOPEN_DIR";
/// Tells `child` whether to set `log.file` (to `DIR/worker.log`).
const CHILD_LOG_FILE_ENV: &str = "WORKER_TEST_LOG_REOPEN_FILE";

#[test]
#[ignore = "the worker process of the log_reopen tests; they run it"]
fn child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let log = dir.join("worker.log");
    let mut config = crate::config::Config::default();
    config.server.graceful_timeout = Duration::from_secs(2);
    if std::env::var_os(CHILD_LOG_FILE_ENV).is_some() {
        config.log.file = log.to_str().unwrap().to_string();
    }
    // What the binary does before it calls `run`: stderr is the log, one line per event.
    crate::logfile::redirect_stderr(log.to_str().unwrap()).unwrap();
    tracing::subscriber::set_global_default(Lines).unwrap();

    let listener = UnixListener::bind(dir.join("sock")).unwrap();
    let (_board, scoreboard) = Scoreboard::create(1, 10).unwrap();
    let (_master, ready) = std::io::pipe().unwrap();
    let code = run(WorkerArgs {
        id: 1,
        slot: 0,
        app_host: false,
        master_pid: nix::unistd::getppid().as_raw() as u32,
        listeners: vec![listener.into()],
        ready: ready.into(),
        max_requests: 0,
        hold: false,
        scoreboard,
        rates: crate::shm::ratelimit::RateTable::create(8).unwrap().1,
        runtime_dir: None,
        config,
    });
    assert_eq!(code, ExitCode::SUCCESS);
}

#[test]
fn usr1_reopens_the_log_file_and_survives_a_failure() {
    let mut w = Worker::start("reopen", true);
    let log = w.dir.join("worker.log");
    w.wait_for_log(&log, "worker serving");

    // A rotation: the file is renamed, USR1 makes the worker write to a new one.
    let rotated = w.dir.join("worker.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    w.signal(Signal::SIGUSR1);
    w.wait_for_log(&log, "SIGUSR1: log file reopened");
    assert!(!read(&rotated).contains("reopened"), "{}", read(&rotated));
    assert_eq!(w.get(), 200, "still serving");

    // The path cannot be opened: the error goes to the current file and the worker carries on.
    let kept = w.dir.join("worker.log.2");
    std::fs::rename(&log, &kept).unwrap();
    std::fs::create_dir(&log).unwrap();
    w.signal(Signal::SIGUSR1);
    w.wait_for_log(&kept, "SIGUSR1: cannot reopen the log file");
    assert_eq!(w.get(), 200, "still serving");
    std::fs::remove_dir(&log).unwrap();

    w.stop();
    assert!(read(&kept).contains("SIGTERM: draining"), "{}", read(&kept));
}

#[test]
fn usr1_without_a_log_file_is_ignored() {
    let mut w = Worker::start("ignore", false);
    let log = w.dir.join("worker.log");
    w.wait_for_log(&log, "worker serving");
    w.signal(Signal::SIGUSR1);
    w.wait_for_log(&log, "no log file to reopen; ignored");
    assert_eq!(w.get(), 200, "still serving");
    w.stop();
}

/// A worker process running `child`, killed if the test fails before it stops it.
struct Worker {
    dir: PathBuf,
    process: Child,
}

impl Worker {
    fn start(name: &str, log_file: bool) -> Worker {
        let dir =
            std::env::temp_dir().join(format!("worker-log-reopen-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "tests::log_reopen::child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        if log_file {
            cmd.env(CHILD_LOG_FILE_ENV, "1");
        }
        let process = cmd.spawn().unwrap();
        Worker { dir, process }
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.process.id() as i32), signal).unwrap();
    }

    /// `GET /` over the worker's Unix socket: the status.
    fn get(&self) -> u16 {
        let mut s = UnixStream::connect(self.dir.join("sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply.split(' ').nth(1).unwrap().parse().unwrap()
    }

    /// Polls until `file` contains `text`; fails if the worker exits first or after 10 s,
    /// showing what the worker logged.
    fn wait_for_log(&mut self, file: &Path, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !read(file).contains(text) {
            if let Some(status) = self.process.try_wait().unwrap() {
                panic!(
                    "worker exited ({status}) before {} contained {text:?}; logs: {}",
                    file.display(),
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} never contained {text:?}; logs: {}",
                file.display(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let _ = write!(
                all,
                "\n== {}\n{}",
                entry.path().display(),
                read(&entry.path())
            );
        }
        all
    }

    /// SIGTERM; the worker drains and its test passes (exit 0) within 10 s.
    fn stop(&mut self) {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "worker still running after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success(), "{status}; logs: {}", self.logs());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.process.try_wait().ok().flatten().is_none() {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read(file: &Path) -> String {
    std::fs::read_to_string(file).unwrap_or_default()
}

/// The smallest subscriber that logs like the binary: one line per event on stderr (so that
/// where stderr points is where the log goes).
struct Lines;

impl tracing::Subscriber for Lines {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl Visit for Fields {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
            fn record_str(&mut self, field: &Field, value: &str) {
                let _ = write!(self.0, " {}={value}", field.name());
            }
        }
        let mut line = Fields(event.metadata().level().to_string());
        event.record(&mut line);
        line.0.push('\n');
        let _ = std::io::stderr().write_all(line.0.as_bytes());
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}
