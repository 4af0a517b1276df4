//! The commands that talk to a running master over its control socket: `status`, `reload`,
//! `stop`, `scale` and `upgrade`. Each finds the socket from the same configuration as `start`
//! (or `--socket`), sends one request, and turns the answer into output and an exit code
//! (documented in man/supervisor.1): 0 done, 1 the master refused or failed, 2 the
//! configuration is invalid, 3 no master answers there, 4 permission denied.

use std::io::{ErrorKind, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cli::{ControlArgs, ScaleArgs, StatusArgs, StopArgs};
use crate::control::{self, Location, Reply, Request};
use crate::pidfile::alive;
use crate::{fail, status, EXIT_CONFIG, EXIT_DENIED, EXIT_FAILURE, EXIT_NO_MASTER};

/// How long a command waits for an answer (a reload re-reads and validates the configuration
/// and may bind new sockets: quick, but not instant).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// After the master closed the connection at its exit, how long until its pid is gone.
const GONE_GRACE: Duration = Duration::from_secs(10);

pub fn status(args: StatusArgs) -> ExitCode {
    if let Some(pid) = args.pid {
        return match status::read(Some(pid)) {
            Ok(s) => {
                status::print(&s, args.json);
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_FAILURE, &e),
        };
    }
    match call(&args.control, &Request::Status) {
        Ok((reply, _, _)) => match reply.status {
            Some(s) => {
                status::print(&s, args.json);
                ExitCode::SUCCESS
            }
            None => fail(EXIT_FAILURE, &"the master sent no status"),
        },
        Err(code) => code,
    }
}

pub fn reload(args: ControlArgs) -> ExitCode {
    simple(&args, &Request::Reload)
}

/// Asks for the upgrade, then waits for its outcome: the new master answering on its control
/// socket (it takes the socket over once every one of its workers is ready), or the new master
/// gone (it failed; the old one keeps serving), within the time the old master gives it.
pub fn upgrade(args: ControlArgs) -> ExitCode {
    let (reply, _, _) = match call(&args, &Request::Upgrade) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let old = reply.master_pid;
    outln!(
        "master {old}: {}",
        reply.message.as_deref().unwrap_or("upgrading")
    );
    let (Some(new), Some(socket)) = (reply.new_master, reply.new_socket) else {
        return fail(
            EXIT_FAILURE,
            &"the master did not say which new master it started",
        );
    };
    let deadline = Instant::now() + Duration::from_millis(reply.wait_ms.unwrap_or(0)) + GONE_GRACE;
    loop {
        if matches!(control::probe(&socket), Ok(Some(pid)) if pid == new) {
            outln!("master {new}: took over; master {old} drains its workers and exits");
            return ExitCode::SUCCESS;
        }
        // The old master exits only after handing over (a new configuration may have moved
        // the control socket where `socket` does not see it).
        if !alive(old) && alive(new) {
            outln!("master {new}: took over; master {old} has exited");
            return ExitCode::SUCCESS;
        }
        if !alive(new) {
            return fail(
                EXIT_FAILURE,
                &format!(
                    "upgrade failed: the new master {new} exited before it was ready; master \
                     {old} keeps serving (the log says why)"
                ),
            );
        }
        if Instant::now() >= deadline {
            return fail(
                EXIT_FAILURE,
                &format!("upgrade failed: the new master {new} was not ready in time"),
            );
        }
        // Polling another process's progress, bounded by the deadline above.
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn scale(args: ScaleArgs) -> ExitCode {
    simple(
        &args.control,
        &Request::Scale {
            workers: args.workers,
        },
    )
}

pub fn stop(args: StopArgs) -> ExitCode {
    let (reply, mut stream, path) = match call(&args.control, &Request::Stop { fast: args.fast }) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let pid = reply.master_pid;
    outln!(
        "master {pid}: {}",
        reply.message.as_deref().unwrap_or("stopping")
    );
    // The master keeps this connection open until it exits: its end closes with the process.
    let wait = Duration::from_millis(reply.wait_ms.unwrap_or(0)) + GONE_GRACE;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return fail(
                EXIT_FAILURE,
                &format!(
                    "master {pid} is still running {}s after the stop request",
                    wait.as_secs()
                ),
            );
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break, // reset: gone as well
        }
    }
    // Closed: the process is on its way out; see it gone.
    let gone = Instant::now() + GONE_GRACE;
    while alive(pid) {
        if Instant::now() >= gone {
            return fail(
                EXIT_FAILURE,
                &format!(
                    "master {pid} closed {} but is still running",
                    path.display()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    outln!("master {pid}: stopped");
    ExitCode::SUCCESS
}

/// One request whose answer is a message.
fn simple(args: &ControlArgs, request: &Request) -> ExitCode {
    match call(args, request) {
        Ok((reply, _, _)) => {
            outln!(
                "master {}: {}",
                reply.master_pid,
                reply.message.as_deref().unwrap_or("done")
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Connects, sends `request` and reads the answer; a failure is reported here and comes back as
/// the exit code to use.
fn call(args: &ControlArgs, request: &Request) -> Result<(Reply, UnixStream, PathBuf), ExitCode> {
    let path = socket_path(args)?;
    let mut stream = connect(&path)?;
    let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
    let _ = stream.set_write_timeout(Some(ANSWER_TIMEOUT));
    let reply = control::exchange(&mut stream, request).map_err(|e| {
        // A read timeout on a socket shows as EAGAIN ("Resource temporarily unavailable").
        let why = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "none within {}s (is the master stopped or stuck?)",
                ANSWER_TIMEOUT.as_secs()
            ),
            _ => e.to_string(),
        };
        fail(
            EXIT_FAILURE,
            &format!("no answer from the master on {}: {why}", path.display()),
        )
    })?;
    if reply.denied {
        return Err(fail(
            EXIT_DENIED,
            &format!(
                "{} (control socket {})",
                reply.error.as_deref().unwrap_or("permission denied"),
                path.display()
            ),
        ));
    }
    if !reply.ok {
        let error = reply.error.as_deref().unwrap_or("failed, no reason given");
        return Err(fail(
            EXIT_FAILURE,
            &format!("master {}: {error}", reply.master_pid),
        ));
    }
    Ok((reply, stream, path))
}

fn socket_path(args: &ControlArgs) -> Result<PathBuf, ExitCode> {
    if let Some(p) = &args.socket {
        return Ok(p.clone());
    }
    let loaded = crate::load_config(&args.config, &[]).map_err(|e| {
        let code = fail(EXIT_CONFIG, &e);
        errln!("supervisor: (the control socket is found from the configuration; --socket PATH names it directly)");
        code
    })?;
    Location::of(&loaded.config)
        .find()
        .map_err(|e| fail(EXIT_NO_MASTER, &e))
}

fn connect(path: &Path) -> Result<UnixStream, ExitCode> {
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => fail(
            EXIT_NO_MASTER,
            &format!(
                "no supervisor master is listening on {} ({e}); is it running, with the same \
                 configuration?",
                path.display()
            ),
        ),
        ErrorKind::PermissionDenied => {
            let owner = std::fs::metadata(path)
                .map(|m| format!(" (it belongs to uid {})", m.uid()))
                .unwrap_or_default();
            fail(
                EXIT_DENIED,
                &format!(
                    "permission denied on the control socket {}{owner}: only the master's user \
                     and root may use it",
                    path.display()
                ),
            )
        }
        _ => fail(
            EXIT_FAILURE,
            &format!("cannot connect to {}: {e}", path.display()),
        ),
    })?;
    // Whoever answers must be the master we mean to reach: our user (or root), not a program
    // that took the path first (in a shared directory like /tmp).
    let me = nix::unistd::geteuid().as_raw();
    match control::peer_uid(&stream) {
        Ok((uid, _)) if uid == me || uid == 0 || me == 0 => Ok(stream),
        Ok((uid, pid)) => Err(fail(
            EXIT_DENIED,
            &format!(
                "{} is served by uid {uid} (pid {pid}), not by us or root; not talking to it",
                path.display()
            ),
        )),
        Err(e) => Err(fail(
            EXIT_FAILURE,
            &format!("cannot identify who serves {}: {e}", path.display()),
        )),
    }
}
