//! Log output: `tracing` to stderr, as text or JSON lines, for the master and its workers alike.

use std::io::IsTerminal;

use tracing_subscriber::filter::LevelFilter;
use worker::config::{LogConfig, LogFormat, LogLevel};

/// Installs the global subscriber.
pub fn init(log: &LogConfig) {
    let level = match log.level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
