//! The app's output as the app wrote it: each line (or each traceback, whole) becomes one log
//! event at the level the app gave it, kept or dropped by `log.app_level` (not by supervisor's
//! own `log.level`), and a JSON line stays a JSON object in `log.format = "json"`.
//!
//! Why by hand and not through `tracing`: its events have a level fixed where they are written
//! and values that are numbers or strings, so an app's JSON object could only be logged as a
//! string, and every line went through supervisor's level filter (with `LOG_LEVEL=warn`, an
//! app's errors vanished). The app host writes these events itself, in the layout `tracing`
//! gives its own lines (same timestamp, level column and `app{app.id=N}` span), one `write` each
//! so that lines from many processes never interleave.
//!
//! The level, where a line says it (see `level_of`): a JSON object's `level`, `levelname`,
//! `severity` or `log.level` (names, or pino's numbers); else an upper-case level name among the
//! first words, as Python's logging (`ERROR:root:...`), uvicorn (`ERROR:    ...`), gunicorn
//! (`[...] [12] [ERROR] ...`) and most formats write it; else `level=` (logfmt). A line that
//! says nothing is `info`.
//!
//! Events of several lines (see `Event::takes`): a Python traceback, from `Traceback (most recent
//! call last):` through its frames to the exception line, chained tracebacks included; and lines
//! that begin with white space, or a traceback, written together with the line before them (one
//! `logger.exception` call). An event ends when the next line starts another one, when nothing
//! more comes for `QUIET`, or at `MAX_LINES` / `MAX_BYTES`.

use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::config::{LogFormat, LogLevel};

/// How long a pending event waits for more of its lines.
pub(crate) const QUIET: std::time::Duration = std::time::Duration::from_millis(50);
/// The most lines one event holds (a longer traceback goes on in a second event).
const MAX_LINES: usize = 500;
/// The most bytes one event holds.
const MAX_BYTES: usize = 256 * 1024;

const TRACEBACK: &str = "Traceback (most recent call last):";
/// The lines between two chained tracebacks (`raise ... from`, an exception while handling one).
const CHAINS: [&str; 2] = [
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
];

/// Where a traceback being read stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Traceback {
    /// None in this event (or not yet).
    No,
    /// Its frames (indented lines) until the exception line.
    Frames,
    /// Its exception line came: a blank line or a chain sentence may follow.
    Ended,
    /// A chain sentence came: the next traceback belongs to this event.
    Chained,
}

/// One log event of the app's, being put together.
#[derive(Debug)]
pub(crate) struct Event {
    lines: Vec<String>,
    bytes: usize,
    level: Option<LogLevel>,
    traceback: Traceback,
}

impl Event {
    pub(crate) fn new(line: String) -> Event {
        let mut event = Event {
            bytes: line.len(),
            level: level_of(&line),
            traceback: Traceback::No,
            lines: Vec::with_capacity(1),
        };
        if line.starts_with(TRACEBACK) {
            event.traceback = Traceback::Frames;
        }
        event.lines.push(line);
        event
    }

    /// Whether `line` is part of this event: `together` when it came in the same write as the
    /// line before it (nothing was waited for in between).
    pub(crate) fn takes(&self, line: &str, together: bool) -> bool {
        if self.lines.len() >= MAX_LINES || self.bytes + line.len() > MAX_BYTES {
            return false;
        }
        let blank = line.trim().is_empty();
        let indented = line.starts_with([' ', '\t']);
        match self.traceback {
            // Frames are indented; the first line that is not is the exception's.
            Traceback::Frames => true,
            Traceback::Ended => {
                blank || CHAINS.contains(&line.trim()) || line.starts_with(TRACEBACK)
            }
            Traceback::Chained => blank || line.starts_with(TRACEBACK),
            Traceback::No => together && !blank && (indented || line.starts_with(TRACEBACK)),
        }
    }

    /// Adds a line `takes` accepted.
    pub(crate) fn push(&mut self, line: String) {
        let trimmed = line.trim();
        self.traceback = match self.traceback {
            _ if line.starts_with(TRACEBACK) => Traceback::Frames,
            Traceback::Frames if !line.starts_with([' ', '\t']) && !trimmed.is_empty() => {
                Traceback::Ended
            }
            Traceback::Ended | Traceback::Chained if CHAINS.contains(&trimmed) => {
                Traceback::Chained
            }
            other => other,
        };
        self.bytes += line.len() + 1;
        self.lines.push(line);
    }

    /// Its level: the one its first line gives; else `error` for a traceback, `info` for the
    /// rest.
    pub(crate) fn level(&self) -> LogLevel {
        match self.level {
            Some(level) => level,
            None if self.traceback != Traceback::No => LogLevel::Error,
            None => LogLevel::Info,
        }
    }

    /// Its text, without the blank lines it may end with.
    fn text(&self) -> String {
        let mut end = self.lines.len();
        while end > 1 && self.lines[end - 1].trim().is_empty() {
            end -= 1;
        }
        self.lines[..end].join("\n")
    }
}

/// How the app's events are written: to standard error (the log), as `log.format` says.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) format: LogFormat,
    /// `log.app_level`: the least severe level written.
    pub(crate) min: LogLevel,
    /// `log.app_output = "raw"`: each line as the app wrote it (no level, nothing dropped).
    pub(crate) raw: bool,
    /// The app process's number (`app.id`), as in the host's own lines.
    pub(crate) app_id: u32,
}

impl Writer {
    /// The event as one log record (ending in a newline), or `None` when its level is below
    /// `log.app_level`.
    pub(crate) fn render(
        &self,
        event: &Event,
        stream: &str,
        pid: u32,
        now: SystemTime,
    ) -> Option<String> {
        let level = event.level();
        if !keeps(self.min, level) {
            return None;
        }
        let time = humantime::format_rfc3339_micros(now);
        let name = level.as_str().to_ascii_uppercase();
        let text = event.text();
        Some(match self.format {
            LogFormat::Text => format!("{time} {name:>5} app{{app.id={}}}: {text}\n", self.app_id),
            LogFormat::Json => {
                let mut record = Map::new();
                record.insert("timestamp".into(), Value::String(time.to_string()));
                record.insert("level".into(), Value::String(name));
                // The app's own JSON, as an object; anything else, as text.
                match json_object(&text) {
                    Some(object) if event.lines.len() == 1 => {
                        record.insert("app_log".into(), Value::Object(object))
                    }
                    _ => record.insert("message".into(), Value::String(text)),
                };
                record.insert("stream".into(), Value::String(stream.to_string()));
                record.insert("app.pid".into(), Value::from(pid));
                let span = serde_json::json!({ "app.id": self.app_id, "name": "app" });
                record.insert("span".into(), span);
                let mut line = Value::Object(record).to_string();
                line.push('\n');
                line
            }
        })
    }
}

/// Whether an event at `level` is written when `min` is the least severe level kept.
fn keeps(min: LogLevel, level: LogLevel) -> bool {
    severity(level) >= severity(min)
}

fn severity(level: LogLevel) -> u8 {
    match level {
        LogLevel::Trace => 0,
        LogLevel::Debug => 1,
        LogLevel::Info => 2,
        LogLevel::Warn => 3,
        LogLevel::Error => 4,
    }
}

fn json_object(line: &str) -> Option<Map<String, Value>> {
    let line = line.trim();
    if !line.starts_with('{') {
        return None;
    }
    match serde_json::from_str(line) {
        Ok(Value::Object(object)) => Some(object),
        _ => None,
    }
}

/// The level a line gives itself, if it says one (see the module's documentation).
pub(crate) fn level_of(line: &str) -> Option<LogLevel> {
    if let Some(object) = json_object(line) {
        let field = ["level", "levelname", "severity"]
            .iter()
            .find_map(|k| object.get(*k))
            .or_else(|| object.get("log").and_then(|log| log.get("level")));
        return match field? {
            Value::String(name) => level_named(&name.to_ascii_uppercase()),
            // pino and bunyan: 10 trace, 20 debug, 30 info, 40 warn, 50 error, 60 fatal.
            Value::Number(n) => Some(match n.as_u64()? {
                0..=19 => LogLevel::Trace,
                20..=29 => LogLevel::Debug,
                30..=39 => LogLevel::Info,
                40..=49 => LogLevel::Warn,
                _ => LogLevel::Error,
            }),
            _ => None,
        };
    }
    for word in line.split_whitespace().take(6) {
        // `[ERROR]`, `ERROR:`, `ERROR:root:message`, `<ERROR>`, `(ERROR)`.
        let word = word.trim_start_matches(['[', '(', '<']);
        let word = word.split(':').next().unwrap_or(word);
        let word = word.trim_end_matches([']', ')', '>', ',']);
        if let Some(level) = level_named(word) {
            return Some(level);
        }
    }
    line.split_whitespace().find_map(|word| {
        let (key, value) = word.split_once('=')?;
        matches!(key, "level" | "lvl" | "severity")
            .then(|| level_named(&value.trim_matches('"').to_ascii_uppercase()))
            .flatten()
    })
}

/// An upper-case level name (Python's, syslog's and the usual short forms).
fn level_named(name: &str) -> Option<LogLevel> {
    Some(match name {
        "TRACE" => LogLevel::Trace,
        "DEBUG" => LogLevel::Debug,
        "INFO" | "NOTICE" => LogLevel::Info,
        "WARN" | "WARNING" => LogLevel::Warn,
        "ERROR" | "ERR" | "CRITICAL" | "CRIT" | "FATAL" | "ALERT" | "EMERG" | "EMERGENCY" => {
            LogLevel::Error
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events `lines` make, each `(line, together)`, as (level, text).
    fn events(lines: &[(&str, bool)]) -> Vec<(LogLevel, String)> {
        let mut out = Vec::new();
        let mut pending: Option<Event> = None;
        for (line, together) in lines {
            match &mut pending {
                Some(event) if event.takes(line, *together) => event.push(line.to_string()),
                _ => {
                    if let Some(done) = pending.take() {
                        out.push((done.level(), done.text()));
                    }
                    pending = Some(Event::new(line.to_string()));
                }
            }
        }
        out.extend(pending.map(|e| (e.level(), e.text())));
        out
    }

    #[test]
    fn levels_are_read_where_the_usual_formats_write_them() {
        let cases = [
            ("ERROR:root:boom", Some(LogLevel::Error)),
            ("WARNING:app.db:slow query", Some(LogLevel::Warn)),
            (
                "INFO:     127.0.0.1:5000 - \"GET / HTTP/1.1\" 200 OK",
                Some(LogLevel::Info),
            ),
            (
                "ERROR:    Exception in ASGI application",
                Some(LogLevel::Error),
            ),
            (
                "[2026-12-08 01:00:00 +0000] [12] [CRITICAL] WORKER TIMEOUT",
                Some(LogLevel::Error),
            ),
            (
                "2026-12-08 01:00:00,123 DEBUG [sqlalchemy] select 1",
                Some(LogLevel::Debug),
            ),
            (
                "time=2026-12-08 level=warn msg=\"disk\"",
                Some(LogLevel::Warn),
            ),
            (r#"{"level":"error","msg":"x"}"#, Some(LogLevel::Error)),
            (
                r#"{"levelname":"WARNING","message":"x"}"#,
                Some(LogLevel::Warn),
            ),
            (r#"{"severity":"DEBUG"}"#, Some(LogLevel::Debug)),
            (r#"{"log":{"level":"critical"}}"#, Some(LogLevel::Error)),
            (r#"{"level":30,"msg":"pino"}"#, Some(LogLevel::Info)),
            (r#"{"level":60}"#, Some(LogLevel::Error)),
            (r#"{"msg":"no level"}"#, None),
            ("Application startup complete.", None),
            // Prose that mentions a level is not one, nor a path.
            ("the error was handled", None),
            ("GET /ERROR 200", None),
        ];
        for (line, level) in cases {
            assert_eq!(level_of(line), level, "{line}");
        }
    }

    #[test]
    fn a_logged_exception_and_its_traceback_are_one_event_at_its_level() {
        let got = events(&[
            ("ERROR:    Exception in ASGI application", false),
            ("Traceback (most recent call last):", true),
            ("  File \"/app/main.py\", line 9, in handler", true),
            ("    raise ValueError(\"boom\")", true),
            ("ValueError: boom", true),
            ("INFO:     127.0.0.1 - \"GET / HTTP/1.1\" 200 OK", false),
        ]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, LogLevel::Error);
        assert!(got[0]
            .1
            .starts_with("ERROR:    Exception in ASGI application\nTraceback"));
        assert!(got[0].1.ends_with("\nValueError: boom"));
        assert_eq!(got[1].0, LogLevel::Info);
    }

    #[test]
    fn a_bare_traceback_with_chained_exceptions_is_one_error() {
        let got = events(&[
            ("Traceback (most recent call last):", false),
            ("  File \"a.py\", line 1, in <module>", false),
            ("KeyError: 'x'", false),
            ("", false),
            (CHAINS[0], false),
            ("", false),
            ("Traceback (most recent call last):", false),
            ("  File \"a.py\", line 3, in <module>", false),
            ("RuntimeError: again", false),
            ("", false),
            ("next line", false),
        ]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, LogLevel::Error);
        assert!(got[0].1.ends_with("RuntimeError: again"), "{}", got[0].1);
        assert_eq!(got[1].1, "next line");
    }

    #[test]
    fn an_indented_line_joins_the_line_before_only_when_written_with_it() {
        let got = events(&[
            ("WARNING: settings", false),
            ("  debug = true", true),
            ("  port = 80", false),
        ]);
        assert_eq!(
            got,
            vec![
                (
                    LogLevel::Warn,
                    "WARNING: settings\n  debug = true".to_string()
                ),
                (LogLevel::Info, "  port = 80".to_string()),
            ]
        );
    }

    #[test]
    fn an_event_stops_growing_at_its_bounds() {
        let mut event = Event::new(TRACEBACK.to_string());
        for _ in 1..MAX_LINES {
            assert!(event.takes("  frame", true));
            event.push("  frame".to_string());
        }
        assert!(!event.takes("  frame", true));
        let big = "x".repeat(MAX_BYTES);
        assert!(!Event::new("  a".into()).takes(&big, true));
    }

    #[test]
    fn records_keep_json_as_an_object_and_drop_below_the_app_level() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_500_000);
        let json = Writer {
            format: LogFormat::Json,
            min: LogLevel::Warn,
            raw: false,
            app_id: 3,
        };
        let line = r#"{"level":"error","msg":"db down","retry":2}"#;
        let out = json
            .render(&Event::new(line.into()), "stdout", 77, now)
            .unwrap();
        let record: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(record["level"], "ERROR");
        assert_eq!(record["app_log"]["retry"], 2);
        assert_eq!(record["app_log"]["msg"], "db down");
        assert_eq!(record["span"]["app.id"], 3);
        assert_eq!(record["app.pid"], 77);
        assert_eq!(record["timestamp"], "1970-01-01T00:00:01.500000Z");
        assert!(json
            .render(&Event::new("INFO: hi".into()), "stdout", 77, now)
            .is_none());

        let text = Writer {
            format: LogFormat::Text,
            min: LogLevel::Trace,
            raw: false,
            app_id: 2,
        };
        let mut event = Event::new("Traceback (most recent call last):".into());
        event.push("  File \"x\"".into());
        event.push("E: e".into());
        assert_eq!(
            text.render(&event, "stderr", 1, now).unwrap(),
            "1970-01-01T00:00:01.500000Z ERROR app{app.id=2}: \
             Traceback (most recent call last):\n  File \"x\"\nE: e\n"
        );
    }
}
