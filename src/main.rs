//! supervisor: pre-fork process supervisor and HTTP worker manager.
//!
//! `main` does four things in order: parse the command line, resolve the configuration (exit 2
//! on any error, before anything starts), initialise logging, and hand over to the master (or,
//! in the hidden worker mode, to the worker library).

#![deny(unsafe_code)]

/// `println!` for what a command prints: a reader that went away (`supervisor status | head -1`,
/// a closed pipe) is not an error and never a panic. The output is dropped and the command goes
/// on to its own exit code (documented in man/supervisor.1). Rust ignores SIGPIPE, so such a
/// write fails with EPIPE, which `println!` would turn into a panic (exit 101).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `print!`, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!`, as [`outln!`] (standard error may be a closed pipe too: `2>&1 | true`).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod activation;
mod cli;
mod commands;
mod completions;
mod config_loader;
mod control;
mod listeners;
mod logging;
#[cfg(test)]
mod man_tests;
mod master;
mod metrics;
mod migrate;
mod notify;
mod pidfile;
mod recycle;
mod rss;
mod run_as;
mod runtime_dir;
mod spawn;
mod status;
mod sys;
mod upgrade;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, ConfigArgs};

/// Exit codes, documented in man/supervisor.1.
const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;
/// A control command found no master on the control socket.
const EXIT_NO_MASTER: u8 = 3;
/// A control command may not use the control socket.
const EXIT_DENIED: u8 = 4;

fn main() -> ExitCode {
    // First, while this is the only thread: how we were started (for a later upgrade), and a
    // handover from an upgrading master (the variable is removed so no child sees it).
    let self_exec = upgrade::SelfExec::capture();
    let handover = upgrade::take_handover();
    let cli = Cli::parse();
    match cli.command {
        Command::Start(args) => start(args, self_exec, handover),
        Command::Check(args) => check(args),
        Command::Status(args) => commands::status(args),
        Command::Reload(args) => commands::reload(args),
        Command::Stop(args) => commands::stop(args),
        Command::Scale(args) => commands::scale(args),
        Command::Upgrade(args) => commands::upgrade(args),
        Command::Completions(args) => {
            // Made in memory first: clap_complete panics on a failed write.
            let mut script = Vec::new();
            completions::write(args.shell, &mut script);
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), &script);
            ExitCode::SUCCESS
        }
        Command::Migrate(args) => migrate(args),
        Command::Worker(args) => run_worker(args),
    }
}

/// `supervisor migrate`: exit 0 with the file written, 2 when the gunicorn configuration cannot
/// be read or names no app, 1 when the output cannot be written.
fn migrate(args: cli::MigrateArgs) -> ExitCode {
    let python = args.python.unwrap_or_else(migrate::default_python);
    let mut gunicorn_args: Vec<String> = Vec::new();
    if let Some(config) = &args.config {
        gunicorn_args.extend(["-c".to_string(), config.clone()]);
    }
    gunicorn_args.extend_from_slice(migrate::without_program(&args.command));
    let read = match migrate::read(&python, &gunicorn_args) {
        Ok(read) => read,
        Err(e) => return fail(EXIT_CONFIG, &e),
    };
    let migration = match migrate::migrate(&read) {
        Ok(m) => m,
        Err(e) => return fail(EXIT_CONFIG, &e),
    };
    for warning in &migration.warnings {
        errln!("supervisor: warning: {warning}");
    }
    if args.output == "-" {
        out!("{}", migration.toml);
        return ExitCode::SUCCESS;
    }
    let path = std::path::Path::new(&args.output);
    if path.exists() && !args.force {
        return fail(
            EXIT_FAILURE,
            &format!(
                "{} exists; --force replaces it, -o - prints instead",
                path.display()
            ),
        );
    }
    if let Err(e) = std::fs::write(path, &migration.toml) {
        return fail(
            EXIT_FAILURE,
            &format!("cannot write {}: {e}", path.display()),
        );
    }
    let start = if args.output == "supervisor.toml" {
        "supervisor start".to_string()
    } else {
        format!("supervisor start -c {}", path.display())
    };
    errln!(
        "supervisor: wrote {}; start it with: {start}",
        path.display()
    );
    ExitCode::SUCCESS
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    // A config error may list several problems, one per line: each gets the prefix.
    for line in format!("{e:#}").lines() {
        errln!("supervisor: error: {line}");
    }
    ExitCode::from(code)
}

/// The configuration from its sources; `app_command` is what `start` got after `--`.
fn load_config(
    args: &ConfigArgs,
    app_command: &[String],
) -> Result<config_loader::Loaded, config_loader::ConfigError> {
    let overrides = config_loader::Overrides {
        bind: args.bind.clone(),
        workers: args.workers.clone(),
        log_level: args.log_level.clone(),
        set: args.set.clone(),
        app_command: app_command.to_vec(),
    };
    config_loader::load(args.config.as_deref(), &overrides, &|name| {
        std::env::var(name).ok()
    })
}

fn check(args: ConfigArgs) -> ExitCode {
    match load_config(&args, &[]) {
        Ok(loaded) => {
            match &loaded.source {
                Some(p) => errln!("supervisor: {} is valid", p.display()),
                None => errln!("supervisor: no config file; defaults and overrides are valid"),
            }
            // A Redis password is not printed either.
            let mut shown = loaded.config.clone();
            shown.redis.url = worker::cluster::redacted(&shown.redis.url);
            for node in &mut shown.sentinel.nodes {
                *node = worker::cluster::redacted(node);
            }
            out!("{}", config_loader::to_toml(&shown));
            errln!(
                "supervisor: control socket: {}",
                control::Location::of(&loaded.config).describe()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_CONFIG, &e),
    }
}

fn start(
    args: cli::StartArgs,
    self_exec: upgrade::SelfExec,
    handover: Result<Option<upgrade::Handover>, String>,
) -> ExitCode {
    let loaded = match load_config(&args.config, &args.command) {
        Ok(l) => l,
        Err(e) => return fail(EXIT_CONFIG, &e),
    };
    let run_as = match run_as::check_start(&loaded.config) {
        Ok(creds) => creds,
        Err(e) => return fail(EXIT_FAILURE, &e),
    };
    if !loaded.config.log.file.is_empty() {
        // Workers inherit stderr, so this sends every process's log to the file.
        if let Err(e) = run_as::log_to_file(&loaded.config) {
            return fail(EXIT_FAILURE, &e);
        }
    }
    let level = logging::init(&loaded.config.log);
    if let Some(p) = &loaded.source {
        tracing::info!(config = %p.display(), "configuration loaded");
    }
    let handover = handover.unwrap_or_else(|why| {
        tracing::warn!("{why}");
        None
    });
    if let Some(c) = &run_as {
        tracing::info!(user = %c.user, uid = %c.uid, gid = %c.gid, "workers and their apps run as server.user");
    }
    // HUP re-reads the same sources: the same file, environment and command line.
    let started = loaded.config.server.clone();
    let reload: master::Reload = Box::new(move || {
        let config = load_config(&args.config, &args.command)
            .map(|l| l.config)
            .map_err(|e| e.to_string())?;
        run_as::check_reload(&started, &config.server)?;
        Ok(config)
    });
    match master::setup(loaded.config, reload, level, self_exec, handover) {
        Ok(m) => ExitCode::from(m.run() as u8),
        // Said once, on stderr (which is the log file too when `log.file` is set).
        Err(e) => fail(EXIT_FAILURE, &e),
    }
}

fn run_worker(args: worker::protocol::Handoff) -> ExitCode {
    let config = match sys::inherited_fd(args.config_fd, "configuration")
        .map_err(anyhow::Error::from)
        .and_then(spawn::read_config)
    {
        Ok(c) => c,
        Err(e) => {
            return fail(
                EXIT_CONFIG,
                &format!("{e:#} (the worker mode is started by `supervisor start` only)"),
            )
        }
    };
    let _ = logging::init(&config.log);
    let fds = (|| -> std::io::Result<_> {
        let listeners = args
            .listen_fds
            .iter()
            .map(|&fd| sys::inherited_fd(fd, "listener"))
            .collect::<Result<Vec<_>, _>>()?;
        let ready = sys::inherited_fd(args.ready_fd, "readiness pipe")?;
        let scoreboard = sys::inherited_fd(args.scoreboard_fd, "scoreboard")?;
        let rates = sys::inherited_fd(args.rates_fd, "rate table")?;
        Ok((listeners, ready, scoreboard, rates))
    })();
    let (listeners, ready, scoreboard, rates) = match fds {
        Ok(f) => f,
        Err(e) => return fail(EXIT_FAILURE, &e),
    };
    worker::run(worker::WorkerArgs {
        id: args.id,
        slot: args.slot,
        app_host: args.app,
        master_pid: args.master_pid,
        listeners,
        ready,
        max_requests: args.max_requests,
        hold: args.hold,
        scoreboard,
        rates,
        runtime_dir: args.runtime_dir,
        config,
    })
}
