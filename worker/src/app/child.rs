//! The worker's app process (`app.command`): starting it, knowing when it is up, passing its
//! output to the log, restarting it when it dies, and stopping it.
//!
//! Owns the app's process group and its lifecycle; the `proxy` module only asks for its health
//! (to wait for it, or fail fast while it crash-loops) and for a kill (`app.kill_on_timeout`).
//!
//! An app whose socket file is gone (removed by someone else: another supervisor sweeping its
//! runtime directory, a tmp cleaner) or refuses connections while it runs can never be reached
//! again: connects that fail so wake the supervising task (`appconn::connect_failed`), which checks the
//! socket and restarts the app, saying why.
//!
//! The app runs in its own process group, so that a stop reaches whatever it forked (an app
//! server with its own workers) and the terminal's Ctrl-C reaches the worker, which decides.
//! It gets `PR_SET_PDEATHSIG(SIGKILL)`: if its worker dies, even by `kill -9`, the kernel kills
//! the app, and since the worker has the same tie to the master, no app outlives the master.

use std::collections::VecDeque;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::app::output;
use crate::config::Upstream;
use crate::shm::scoreboard::Slot;

/// Lines of the app's output kept for the message of a failed start.
const TAIL_LINES: usize = 20;
/// A line of output longer than this is logged in pieces.
const MAX_LINE: usize = 16 * 1024;
/// An app that ran at least this long before exiting counts as healthy: the next restart is
/// immediate and the failure count starts over.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// Restart backoff: doubles from the first to the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// After this many failures in a row, requests stop waiting for the app and fail at once.
const FAILING_AFTER: u32 = 3;

/// How long an app found unreachable is given before it is checked again, and restarted if it
/// still is.
const UNREACHABLE_RECHECK: Duration = Duration::from_millis(250);

/// Why the app at `address` cannot be reached while it runs, if it cannot: its socket file is
/// gone, or nothing listens on it. (A connect that does not finish in time, a full backlog, is
/// not a reason.)
async fn unreachable(address: &Upstream) -> Option<String> {
    let Upstream::Unix(path) = address else {
        return None;
    };
    let connect = tokio::net::UnixStream::connect(path);
    match tokio::time::timeout(Duration::from_millis(100), connect)
        .await
        .ok()?
    {
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Some(format!("its socket {} is gone", path.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Some(format!(
            "nothing listens on its socket {} any more",
            path.display()
        )),
        Err(_) => None,
    }
}

/// Everything needed to start the app, placeholders already replaced.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    pub(crate) argv: Vec<String>,
    /// Where the app listens: `Unix` for `{socket}`, `Tcp` (loopback) for `{port}`.
    pub(crate) address: Upstream,
    pub(crate) worker_id: u32,
    pub(crate) ready_timeout: Duration,
    /// `app.cwd`, resolved (symlinks followed) when the app host started; `None`: inherited.
    pub(crate) cwd: Option<std::path::PathBuf>,
    /// How the app's output is logged.
    pub(crate) output: Arc<output::Writer>,
}

/// What requests should expect of the app right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Health {
    /// Starting or restarting: worth waiting for.
    Starting,
    Ready,
    /// Restarted and failed `FAILING_AFTER` times in a row (the reason, for the 503 and log);
    /// it is still being restarted, with backoff.
    Failing(Arc<str>),
    /// Stopped for good (the worker is exiting).
    Stopped,
}

/// The handle the worker keeps. Dropping it does not stop the app: `stop` does (and the app
/// dies with the worker process regardless).
pub(crate) struct AppProcess {
    health: watch::Receiver<Health>,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Shared {
    launch: Launch,
    /// This worker's scoreboard record: the app's pid and restarts are shown by `status`.
    slot: &'static Slot,
    /// Pid (= process group) of the running app, 0 when none.
    pid: AtomicU32,
    /// Ask the supervising task to stop the app for good, with this grace.
    stop: Notify,
    stop_grace: Mutex<Duration>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl AppProcess {
    /// Starts the app and its supervising task, and waits until it first accepts
    /// connections. An error says why it did not come up, with its last lines of output.
    pub(crate) async fn start(launch: Launch, slot: &'static Slot) -> Result<AppProcess, String> {
        let (health_tx, health) = watch::channel(Health::Starting);
        let shared = Arc::new(Shared {
            launch,
            slot,
            pid: AtomicU32::new(0),
            stop: Notify::new(),
            stop_grace: Mutex::new(Duration::ZERO),
            tail: Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES))),
        });
        let (boot_tx, boot_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(supervise(Arc::clone(&shared), health_tx, boot_tx));
        match boot_rx.await {
            Ok(Ok(())) => Ok(AppProcess {
                health,
                shared,
                task: Mutex::new(Some(task)),
            }),
            Ok(Err(why)) => Err(why),
            Err(_) => Err("the app's supervising task ended before the app was up".to_string()),
        }
    }

    /// What requests should expect of the app, as it changes.
    pub(crate) fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// Stops the app for good: TERM to its process group, KILL after `grace`; then removes its
    /// socket. A second call does nothing.
    pub(crate) async fn stop(&self, grace: Duration) {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(task) = task else { return };
        *self
            .shared
            .stop_grace
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = grace;
        self.shared.stop.notify_one();
        if let Err(e) = task.await {
            error!(error = %e, "the app's supervising task failed");
        }
        if let Upstream::Unix(path) = &self.shared.launch.address {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Shared {
    fn grace(&self) -> Duration {
        *self.stop_grace.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why one run of the app ended.
enum End {
    /// Exited, was killed, failed to start or never became ready: a failure if it was short.
    Exited(String),
    /// Stopped for good.
    Stopped,
}

async fn supervise(
    shared: Arc<Shared>,
    health: watch::Sender<Health>,
    boot: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let mut boot = Some(boot);
    let mut failures = 0u32;
    // The failing state is announced once per streak of failures, not once per restart.
    let mut announced = false;
    loop {
        let started = Instant::now();
        let end = run_once(&shared, &health, &mut boot).await;
        shared.pid.store(0, Ordering::Relaxed);
        shared.slot.app_pid.store(0, Ordering::Relaxed);
        let why = match end {
            End::Stopped => {
                health.send_replace(Health::Stopped);
                return;
            }
            End::Exited(why) => why,
        };
        if let Some(boot) = boot.take() {
            // It never came up: the worker cannot boot. The tail says why, usually.
            let _ = boot.send(Err(with_tail(&shared, &why)));
            health.send_replace(Health::Stopped);
            return;
        }
        if started.elapsed() >= HEALTHY_RUN {
            failures = 0;
            announced = false;
        }
        failures += 1;
        let delay = backoff(failures);
        if failures >= FAILING_AFTER {
            let reason: Arc<str> = Arc::from(format!(
                "the app keeps failing ({failures} times in a row; last: {why})"
            ));
            if !announced {
                announced = true;
                error!(
                    app.failures = failures,
                    retry_in = ?delay,
                    "the app keeps failing; requests get 503 until it is up again"
                );
            }
            health.send_replace(Health::Failing(reason));
        } else {
            health.send_replace(Health::Starting);
        }
        info!(retry_in = ?delay, "restarting the app");
        shared.slot.app_restarts.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.stop.notified() => {
                health.send_replace(Health::Stopped);
                return;
            }
        }
    }
}

/// Starts the app once and follows it until it ends.
async fn run_once(
    shared: &Shared,
    health: &watch::Sender<Health>,
    boot: &mut Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
) -> End {
    let launch = &shared.launch;
    if let Upstream::Unix(path) = &launch.address {
        // A socket file left by a crashed run would make the app's bind fail.
        match std::fs::remove_file(path) {
            Ok(()) => debug!(path = %path.display(), "removed a stale app socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %path.display(), error = %e, "cannot remove a stale app socket"),
        }
    }
    let mut child = match spawn(launch) {
        Ok(child) => child,
        Err(e) => return End::Exited(format!("cannot start {:?}: {e}", launch.argv[0])),
    };
    let pid = child.id().unwrap_or(0);
    shared.pid.store(pid, Ordering::Relaxed);
    shared.slot.app_pid.store(pid, Ordering::Relaxed);
    info!(app.pid = pid, "app started");
    for (stream, name) in [
        (child.stdout.take().map(|s| Box::new(s) as Output), "stdout"),
        (child.stderr.take().map(|s| Box::new(s) as Output), "stderr"),
    ] {
        if let Some(stream) = stream {
            tokio::spawn(forward_output(
                stream,
                name,
                Arc::clone(&shared.tail),
                Arc::clone(&launch.output),
                pid,
            ));
        }
    }

    // Up when it accepts a connection, within `ready_timeout`.
    let deadline = tokio::time::sleep(launch.ready_timeout);
    tokio::pin!(deadline);
    tokio::select! {
        _ = wait_accepting(&launch.address) => {}
        status = child.wait() => {
            return End::Exited(format!(
                "it exited before accepting connections ({})",
                describe(status)
            ));
        }
        _ = &mut deadline => {
            kill_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            return End::Exited(format!(
                "it did not accept connections on {} within app.ready_timeout ({:?})",
                launch.address,
                launch.ready_timeout
            ));
        }
        _ = shared.stop.notified() => {
            stop_child(&mut child, pid, shared.grace()).await;
            return End::Stopped;
        }
    }
    info!(app.pid = pid, address = %launch.address, "app ready");
    health.send_replace(Health::Ready);
    if let Some(boot) = boot.take() {
        let _ = boot.send(Ok(()));
    }

    loop {
        tokio::select! {
            status = child.wait() => {
                // Whatever it forked goes with it, so that the restart starts clean.
                kill_group(pid, Signal::SIGKILL);
                let status = describe(status);
                error!(app.pid = pid, status = %status, "the app exited; its requests in flight get 502");
                // Not `Ready` any more; `supervise` says what it is now.
                health.send_replace(Health::Starting);
                return End::Exited(format!("exited ({status})"));
            }
            _ = crate::app::appconn::a_connect_failed() => {
                // Restarted only if it still cannot be reached a moment later: a refused
                // connect can pass (seen once under CI load with an app that was up and then
                // served), and a healthy app must not be killed for it.
                if unreachable(&launch.address).await.is_none() {
                    continue;
                }
                tokio::time::sleep(UNREACHABLE_RECHECK).await;
                // It exited meanwhile: that is what to say (the loop's `wait` has its status).
                if !matches!(child.try_wait(), Ok(None)) {
                    continue;
                }
                let Some(why) = unreachable(&launch.address).await else { continue };
                error!(app.pid = pid, "the app cannot be reached: {why}; restarting it");
                health.send_replace(Health::Starting);
                kill_group(pid, Signal::SIGKILL);
                let _ = child.wait().await;
                return End::Exited(why);
            }
            _ = shared.stop.notified() => {
                stop_child(&mut child, pid, shared.grace()).await;
                return End::Stopped;
            }
        }
    }
}

type Output = Box<dyn AsyncRead + Unpin + Send>;

/// Logs the app's output one event per line (tagged with the worker id by the worker's span)
/// and keeps the last lines for the message of a failed start.
/// Logs what the app writes on one of its streams (see `output`), and keeps its last lines for
/// the message of a failed start.
async fn forward_output(
    stream: Output,
    name: &'static str,
    tail: Arc<Mutex<VecDeque<String>>>,
    writer: Arc<output::Writer>,
    pid: u32,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(256);
    let mut pending: Option<output::Event> = None;
    // Whether the next line came in the same write as the one before it.
    let mut together = false;
    loop {
        let room = (MAX_LINE - line.len()) as u64;
        let mut limited = (&mut reader).take(room);
        let read = limited.read_until(b'\n', &mut line);
        // A pending event waits `QUIET` for more of its lines; what was read of a line so far
        // stays in `line` (`read_until` is cancel-safe).
        let read = match &pending {
            Some(_) => match tokio::time::timeout(output::QUIET, read).await {
                Ok(read) => read,
                Err(_) => {
                    write_event(&writer, pending.take(), name, pid);
                    together = false;
                    continue;
                }
            },
            None => read.await,
        };
        // The end of the stream; a last line without its newline (or the part of one read
        // before a wait ran out) is still logged.
        let ended = matches!(read, Ok(0) | Err(_));
        if ended && line.is_empty() {
            write_event(&writer, pending.take(), name, pid);
            return;
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        line.clear();
        {
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text.clone());
        }
        if writer.raw {
            write_raw(text);
        } else {
            match &mut pending {
                Some(event) if event.takes(&text, together) => event.push(text),
                _ => {
                    write_event(&writer, pending.take(), name, pid);
                    // A blank line on its own says nothing.
                    if !text.trim().is_empty() {
                        pending = Some(output::Event::new(text));
                    }
                }
            }
        }
        if ended {
            write_event(&writer, pending.take(), name, pid);
            return;
        }
        together = !reader.buffer().is_empty();
    }
}

fn write_event(writer: &output::Writer, event: Option<output::Event>, stream: &str, pid: u32) {
    if let Some(record) =
        event.and_then(|e| writer.render(&e, stream, pid, std::time::SystemTime::now()))
    {
        write_log(record.as_bytes());
    }
}

/// `log.app_output = "raw"`: the line as the app wrote it.
fn write_raw(mut line: String) {
    line.push('\n');
    write_log(line.as_bytes());
}

/// One write to the log (standard error, or the file `log.file` made it), so that lines from
/// several processes never mix; a log that cannot be written loses the line, as `tracing` does.
fn write_log(record: &[u8]) {
    use std::io::Write as _;
    let _ = std::io::stderr().lock().write_all(record);
}

fn with_tail(shared: &Shared, why: &str) -> String {
    let tail = shared.tail.lock().unwrap_or_else(|e| e.into_inner());
    if tail.is_empty() {
        format!("the app did not come up: {why}; it printed nothing")
    } else {
        let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!(
            "the app did not come up: {why}; its last lines of output:\n  {}",
            lines.join("\n  ")
        )
    }
}

/// Polls until something accepts a connection at `address` (the app listens).
async fn wait_accepting(address: &Upstream) {
    let mut pause = Duration::from_millis(5);
    while crate::app::appconn::AppStream::connect(address)
        .await
        .is_err()
    {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// TERM to the app's group; KILL to the group if the app has not exited after `timeout`, and
/// in any case once it has (whatever it forked and left behind goes too).
async fn stop_child(child: &mut Child, pid: u32, timeout: Duration) {
    info!(app.pid = pid, "stopping the app (SIGTERM)");
    kill_group(pid, Signal::SIGTERM);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => info!(app.pid = pid, status = %describe(status), "app stopped"),
        Err(_) => {
            warn!(
                app.pid = pid,
                grace = ?timeout,
                "the app did not exit after SIGTERM within server.graceful_timeout; killing it"
            );
            kill_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }
    kill_group(pid, Signal::SIGKILL);
}

pub(crate) fn kill_group(pid: u32, signal: Signal) {
    if pid == 0 {
        return;
    }
    match killpg(Pid::from_raw(pid as i32), signal) {
        Ok(()) => {}
        // The group is already empty.
        Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => {
            warn!(app.pid = pid, signal = %signal, error = %e, "cannot signal the app's process group")
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    (BACKOFF_FIRST * (1u32 << shift)).min(BACKOFF_CAP)
}

fn describe(status: io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(sig) => format!("killed by {sig}"),
                Err(_) => format!("killed by signal {sig}"),
            },
            _ => s.to_string(),
        },
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

/// Starts the app in its own process group, tied to this worker's life, with the worker's fds
/// kept out of it.
#[allow(unsafe_code)]
fn spawn(launch: &Launch) -> io::Result<Child> {
    let mut cmd = Command::new(&launch.argv[0]);
    cmd.args(&launch.argv[1..])
        .env("SUPERVISOR_WORKER_ID", launch.worker_id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // The worker kills the group itself; this is the backstop if the handle is dropped.
        .kill_on_drop(false);
    if let Some(cwd) = &launch.cwd {
        cmd.current_dir(cwd);
    }
    // On its private socket the app's only peer is supervisor, whose X-Forwarded-For and
    // -Proto are the truth (it drops what untrusted clients sent): uvicorn and gunicorn, which
    // read this variable, then report the real client and scheme with no setting of their own.
    // A `{port}` app is left to its own default (loopback), as other local processes can
    // reach its port.
    if matches!(launch.address, Upstream::Unix(_)) {
        cmd.env("FORWARDED_ALLOW_IPS", "*");
    }
    // The app gets none of the worker's fds (its listeners and pipe to the master are already
    // close-on-exec since the worker adopted them; the hook also covers anything else), and
    // dies with the worker.
    let hook = crate::exec::child_hook(Vec::new(), std::process::id(), &[]);
    // SAFETY: the hook only makes async-signal-safe syscalls and does not allocate.
    unsafe {
        cmd.pre_exec(hook);
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(30), BACKOFF_CAP);
    }
}
