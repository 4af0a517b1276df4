//! Log output: `tracing` to stderr, as text or JSON lines, for the master and its workers alike.
//! `log.file` makes stderr that file (`worker::logfile`), so the formatter never changes.

use std::io::IsTerminal;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Layer, Registry};
use worker::config::{LogConfig, LogFormat, LogLevel};

/// Changes the level of the installed subscriber (a reload may change `log.level`).
pub struct LevelHandle(reload::Handle<LevelFilter, Registry>);

impl LevelHandle {
    pub fn set(&self, level: LogLevel) {
        let _ = self.0.modify(|f| *f = filter(level));
    }
}

fn filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// Installs the global subscriber.
pub fn init(log: &LogConfig) -> LevelHandle {
    let (level, handle) = reload::Layer::new(filter(log.level));
    // Colour only for a person at a terminal, never into a file or a pipe.
    let ansi = log.file.is_empty() && std::io::stderr().is_terminal();
    let format = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    let format = match log.format {
        LogFormat::Text => format.boxed(),
        LogFormat::Json => format.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(level)
        .with(format)
        .init();
    LevelHandle(handle)
}
