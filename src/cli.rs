//! The command line: what each subcommand accepts. Parsing only; `main` dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Pre-fork process supervisor and HTTP worker manager.
#[derive(Debug, Parser)]
#[command(name = "supervisor", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bind the listeners, start the workers and serve until stopped by a signal.
    Start(StartArgs),
    /// Validate the configuration and print it fully resolved; exit 0 if valid, 2 if not.
    Check(ConfigArgs),
    /// Show a running master's workers, their state and counters, and the limits in force.
    Status(StatusArgs),
    /// Print the completion script for a shell on standard output.
    Completions(CompletionsArgs),
    /// Re-read the configuration and replace the workers (like SIGHUP); fails if it is invalid.
    Reload(ControlArgs),
    /// Stop the master (graceful like SIGTERM, or fast like SIGQUIT) and wait until it has exited.
    Stop(StopArgs),
    /// Set the number of workers (like SIGTTIN/SIGTTOU repeated).
    Scale(ScaleArgs),
    /// Start a zero-downtime binary upgrade (like SIGUSR2).
    Upgrade(ControlArgs),
    /// Write the supervisor.toml equivalent to a gunicorn configuration and command line.
    Migrate(MigrateArgs),
    /// Internal: run one worker process. Started by the master only.
    #[command(hide = true)]
    Worker(worker::protocol::Handoff),
}

/// Options that resolve the configuration (shared by `start`, `check` and the control commands,
/// which find the master's control socket from it).
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Configuration file [default: ./supervisor.toml if it exists]
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on: HOST:PORT, [V6]:PORT or unix:PATH; repeatable; replaces server.bind
    #[arg(short = 'b', long = "bind", value_name = "ADDR")]
    pub bind: Vec<String>,
    /// Number of worker processes (app processes with an app command), or "auto" for 2 x CPU + 1
    #[arg(short = 'w', long = "workers", value_name = "N")]
    pub workers: Option<String>,
    /// Log level: error, warn, info, debug or trace (also warning, critical)
    #[arg(long = "log-level", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Set any configuration key, e.g. --set worker.max_connections=500; repeatable
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The app to run in each worker, e.g. -- uvicorn main:app --uds {socket}; sets app.command
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// How a control command finds the master: its configuration, or the socket itself.
#[derive(Debug, Args)]
pub struct ControlArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The master's control socket [default: from the configuration, see `supervisor check`]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Read the scoreboard of master PID directly instead of asking on the control socket
    #[arg(long, value_name = "PID", conflicts_with = "socket")]
    pub pid: Option<u32>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `supervisor migrate [-c GUNICORN_CONFIG] [-o FILE] [GUNICORN COMMAND LINE...]`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The gunicorn configuration file [default: ./gunicorn.conf.py if it exists]
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<String>,
    /// Where to write the supervisor configuration ("-": standard output)
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        default_value = "supervisor.toml"
    )]
    pub output: String,
    /// Replace the output file if it exists
    #[arg(long)]
    pub force: bool,
    /// The app's Python, which reads the configuration and runs the app [default: the active
    /// virtualenv's, else ./.venv's, else python3]
    #[arg(long, value_name = "PATH")]
    pub python: Option<String>,
    /// The rest of gunicorn's command line, as you start it: the app (main:app) and any
    /// options; a leading `gunicorn` is ignored
    #[arg(
        value_name = "GUNICORN_ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Fast stop (like SIGQUIT): workers get a few seconds, not server.graceful_timeout
    #[arg(long)]
    pub fast: bool,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The number of workers, 1..=1024
    #[arg(id = "count", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn start_takes_the_app_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "supervisor",
            "start",
            "-b",
            "127.0.0.1:0",
            "-w",
            "2",
            "--",
            "uvicorn",
            "--uds",
            "x",
        ])
        .unwrap();
        let Command::Start(s) = cli.command else {
            panic!("not start")
        };
        assert_eq!(s.config.bind, ["127.0.0.1:0"]);
        assert_eq!(s.command, ["uvicorn", "--uds", "x"]);
    }

    /// The man page is written by hand; this keeps it from drifting from the flags.
    #[test]
    fn man_page_documents_every_visible_subcommand_and_flag() {
        let man = include_str!("../man/supervisor.1");
        let cmd = Cli::command();
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            assert!(
                man.contains(&format!(".B supervisor {}", sub.get_name())),
                "man/supervisor.1 lacks the `{}` command",
                sub.get_name()
            );
            for arg in sub.get_arguments() {
                if let Some(long) = arg.get_long() {
                    let escaped = format!("\\-\\-{}", long.replace('-', "\\-"));
                    assert!(man.contains(&escaped), "man/supervisor.1 lacks --{long}");
                }
            }
        }
    }
}
