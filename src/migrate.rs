//! `supervisor migrate`: a gunicorn configuration, read as gunicorn reads it, written as the
//! equivalent `supervisor.toml`, with a comment on every setting it carries over, cannot carry
//! over, or makes unnecessary.
//!
//! The configuration file is Python: only Python can read it (`workers = cpu_count() * 2 + 1`,
//! `os.environ.get(...)`). So the app's Python runs `migrate/gunicorn_settings.py`, which
//! executes the file as gunicorn does, applies `GUNICORN_CMD_ARGS` and the command line after
//! it, and prints the settings as JSON (without importing gunicorn, which need not be
//! installed). Everything after that is here: which key each setting becomes, and why.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config_loader;

/// The reader run with the app's Python.
const READER: &str = include_str!("migrate/gunicorn_settings.py");

/// A gunicorn configuration as the reader printed it.
#[derive(Debug, Deserialize)]
pub struct Gunicorn {
    /// Setting name to value (the config file's, then `GUNICORN_CMD_ARGS`', then the command
    /// line's).
    settings: Map<String, Value>,
    /// Setting name to where its value came from.
    source: Map<String, Value>,
    /// Server hooks the config file defines (`post_fork`, `worker_abort`, ...).
    hooks: Vec<String>,
    /// The app (`main:app`), from the command line or `wsgi_app`.
    app: Option<String>,
    /// Options of the command line the reader does not know.
    unknown_options: Vec<String>,
    /// The Python that read it: the app's (its virtualenv's), which runs the app processes.
    python: String,
    /// CPUs where the reader ran (to recognise `2 x CPU + 1` computed there).
    cpus: u64,
    /// Which app servers that Python can import (`uvicorn`, `gunicorn`).
    #[serde(default)]
    installed: std::collections::BTreeMap<String, bool>,
}

/// What `migrate` produced.
#[derive(Debug)]
pub struct Migration {
    /// The configuration file's text.
    pub toml: String,
    /// What the user should know before starting it (an app server missing), one line each.
    pub warnings: Vec<String>,
}

/// Runs the reader with `python` over gunicorn's command line `args` (after its program name).
pub fn read(python: &str, args: &[String]) -> Result<Gunicorn, String> {
    let out = Command::new(python)
        .arg("-c")
        .arg(READER)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {python}: {e} (choose one with --python)"))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(why.trim().to_string());
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("unexpected output from {python} reading the configuration: {e}"))
}

/// gunicorn's command line as typed, without its program (`gunicorn`, `python -m gunicorn`).
pub fn without_program(command: &[String]) -> &[String] {
    let name = |s: &String| {
        Path::new(s)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
    };
    match command {
        [first, rest @ ..] if name(first).as_deref() == Some("gunicorn") => rest,
        [first, m, g, rest @ ..]
            if name(first).is_some_and(|n| n.starts_with("python"))
                && m == "-m"
                && g == "gunicorn" =>
        {
            rest
        }
        _ => command,
    }
}

/// The Python to read the configuration with and run the app: `VIRTUAL_ENV`'s, else
/// `./.venv`'s, else `python3` on `PATH`.
pub fn default_python() -> String {
    if let Ok(venv) = std::env::var("VIRTUAL_ENV") {
        let python = Path::new(&venv).join("bin/python");
        if python.exists() {
            return python.display().to_string();
        }
    }
    if Path::new(".venv/bin/python").exists() {
        if let Ok(here) = std::env::current_dir() {
            return here.join(".venv/bin/python").display().to_string();
        }
    }
    "python3".to_string()
}

/// The lines of one section of the file being written.
#[derive(Default)]
struct Section {
    lines: Vec<String>,
}

/// The file being written: sections in the reference's order, and what was not carried over.
struct Out {
    sections: Vec<(&'static str, Section)>,
    notes: Vec<String>,
}

impl Out {
    fn new() -> Out {
        let sections = ["server", "worker", "limits", "app", "log"]
            .map(|name| (name, Section::default()))
            .into_iter()
            .collect();
        Out {
            sections,
            notes: Vec::new(),
        }
    }

    /// `key = value` in `section`, with `why` as its comment.
    fn set(&mut self, section: &str, key: &str, value: toml::Value, why: &str) {
        let (_, s) = self
            .sections
            .iter_mut()
            .find(|(name, _)| *name == section)
            .expect("a known section");
        s.lines.extend(comment(why));
        s.lines.push(format!("{key} = {value}"));
    }

    /// A line for the list of what was not carried over, and why.
    fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    fn render(&self, header: &[String]) -> String {
        let mut text = String::new();
        for line in header {
            let _ = writeln!(text, "{line}");
        }
        if !self.notes.is_empty() {
            text.push_str("#\n# Not carried over, and why:\n");
            for note in &self.notes {
                for (i, line) in wrap(note, 94).into_iter().enumerate() {
                    let lead = if i == 0 { "# - " } else { "#   " };
                    let _ = writeln!(text, "{lead}{line}");
                }
            }
        }
        for (name, section) in &self.sections {
            if section.lines.is_empty() {
                continue;
            }
            let _ = writeln!(text, "\n[{name}]");
            for line in &section.lines {
                let _ = writeln!(text, "{line}");
            }
        }
        text
    }
}

fn comment(text: &str) -> Vec<String> {
    wrap(text, 96)
        .into_iter()
        .map(|l| format!("# {l}"))
        .collect()
}

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

fn string(s: impl Into<String>) -> toml::Value {
    toml::Value::String(s.into())
}

fn strings<S: AsRef<str>>(items: &[S]) -> toml::Value {
    toml::Value::Array(items.iter().map(|s| string(s.as_ref())).collect())
}

fn seconds(n: i64) -> toml::Value {
    string(format!("{n}s"))
}

/// How a gunicorn worker class runs the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// ASGI under uvicorn (UvicornWorker, UvicornH11Worker).
    Uvicorn { h11: bool },
    /// WSGI under gunicorn itself, one worker per app process: `sync` (one request at a time),
    /// `gthread` (threads), or an async class (gevent, eventlet, tornado).
    Gunicorn,
}

impl Gunicorn {
    fn value(&self, name: &str) -> Option<&Value> {
        self.settings.get(name).filter(|v| !v.is_null())
    }

    fn int(&self, name: &str) -> Option<i64> {
        match self.value(name)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    fn text(&self, name: &str) -> Option<String> {
        match self.value(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Bool(_) | Value::Number(_) => Some(self.value(name)?.to_string()),
            _ => None,
        }
    }

    /// A list setting: an array, or one string (comma-separated where gunicorn splits it).
    fn list(&self, name: &str, split: bool) -> Vec<String> {
        match self.value(name) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) if split => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        }
    }

    /// `name = value (from where)`, for a comment.
    fn said(&self, name: &str) -> String {
        let value = self.value(name).map_or("None".to_string(), |v| match v {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        });
        let from = self
            .source
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or("gunicorn's default");
        format!("gunicorn {name} = {value} ({from})")
    }

    fn kind(&self) -> (Kind, String) {
        let class = self.text("worker_class").unwrap_or_else(|| "sync".into());
        let kind = match class.as_str() {
            "uvicorn.workers.UvicornWorker" | "uvicorn_worker.UvicornWorker" => {
                Kind::Uvicorn { h11: false }
            }
            "uvicorn.workers.UvicornH11Worker" | "uvicorn_worker.UvicornH11Worker" => {
                Kind::Uvicorn { h11: true }
            }
            _ => Kind::Gunicorn,
        };
        (kind, class)
    }
}

/// The supervisor configuration for `g`, or why there is none (no app named).
pub fn migrate(g: &Gunicorn) -> Result<Migration, String> {
    let app = g.app.clone().ok_or(
        "no app named: give it as gunicorn takes it, e.g. `supervisor migrate -c \
         gunicorn_config.py main:app` (or set wsgi_app in the configuration)",
    )?;
    let mut out = Out::new();
    server(g, &mut out);
    worker(g, &mut out);
    let (kind, class) = g.kind();
    app_command(g, &app, kind, &class, &mut out);
    log(g, &mut out);
    unmapped(g, &mut out);
    let mut header = vec![
        "# supervisor.toml, written by `supervisor migrate` from a gunicorn configuration."
            .to_string(),
        "# Start it with `supervisor start` in this directory (or `supervisor start -c FILE`)."
            .to_string(),
        "# As with gunicorn, the environment wins over this file: PORT (listen on 0.0.0.0:PORT),"
            .to_string(),
        "# WEB_CONCURRENCY and WORKERS (app processes), LOG_LEVEL, FORWARDED_ALLOW_IPS."
            .to_string(),
        "# Every key and its default: supervisor.toml(5), or `supervisor check` to see them all."
            .to_string(),
    ];
    if let Some(file) = g
        .source
        .values()
        .filter_map(Value::as_str)
        .find(|s| !matches!(*s, "GUNICORN_CMD_ARGS" | "the command line"))
    {
        header.insert(1, format!("# Read from {file} with {}.", g.python));
    }
    let toml = out.render(&header);
    // What is written must load: a mapping error here is a bug, said as such.
    config_loader::check_text(&toml)
        .map_err(|e| format!("internal error: the configuration written does not load: {e}"))?;
    let server = match kind {
        Kind::Uvicorn { .. } => "uvicorn",
        Kind::Gunicorn => "gunicorn",
    };
    let mut warnings = Vec::new();
    if g.installed.get(server) == Some(&false) {
        warnings.push(format!(
            "{server} is not installed for {}, which the app processes run with: install it \
             there (pip install {server}), or run migrate again with --python naming your \
             app's Python",
            g.python
        ));
    }
    Ok(Migration { toml, warnings })
}

fn server(g: &Gunicorn, out: &mut Out) {
    let binds = g.list("bind", false);
    if binds.is_empty() {
        out.set(
            "server",
            "bind",
            strings(&["127.0.0.1:8000"]),
            "gunicorn's default address; PORT in the environment makes it 0.0.0.0:PORT, as it \
             does for gunicorn.",
        );
    } else {
        let mut kept = Vec::new();
        for b in &binds {
            if b.starts_with("fd://") {
                out.note(format!(
                    "bind {b:?}: a socket passed by file descriptor; supervisor takes systemd's \
                     socket activation instead (dist/supervisor-rs.socket)."
                ));
            } else {
                kept.push(b.clone());
            }
        }
        if !kept.is_empty() {
            let why = format!(
                "{}. PORT in the environment overrides it (0.0.0.0:PORT).",
                g.said("bind")
            );
            out.set("server", "bind", strings(&kept), &why);
        }
    }
    match g.int("workers") {
        Some(n) if n as u64 == g.cpus * 2 + 1 => out.set(
            "server",
            "workers",
            string("auto"),
            &format!(
                "{}: 2 x CPU + 1 where it was read, so \"auto\", which computes 2 x CPU + 1 at \
                 each start. The app processes; HTTP workers in front are server.http_workers. \
                 WORKERS or WEB_CONCURRENCY in the environment override it.",
                g.said("workers")
            ),
        ),
        Some(n) if n >= 1 => out.set(
            "server",
            "workers",
            toml::Value::Integer(n),
            &format!(
                "{}. The app processes; WORKERS or WEB_CONCURRENCY in the environment override it.",
                g.said("workers")
            ),
        ),
        _ => out.set(
            "server",
            "workers",
            toml::Value::Integer(1),
            "gunicorn's default: 1 app process. WORKERS or WEB_CONCURRENCY in the environment \
             override it (\"auto\" is 2 x CPU + 1).",
        ),
    }
    if let Some(n) = g.int("graceful_timeout") {
        out.set(
            "server",
            "graceful_timeout",
            seconds(n),
            &format!(
                "{}: how long a stop or a recycle lets requests in flight finish.",
                g.said("graceful_timeout")
            ),
        );
    }
    let allow = g.list("forwarded_allow_ips", true);
    if !allow.is_empty() {
        out.set(
            "server",
            "forwarded_allow_ips",
            strings(&allow),
            &format!(
                "{}: peers whose X-Forwarded-For/-Proto are believed (for the rate limit, the \
                 access log and the app, which believes supervisor's).",
                g.said("forwarded_allow_ips")
            ),
        );
    }
    for (name, key) in [("user", "user"), ("group", "group"), ("pidfile", "pidfile")] {
        if let Some(v) = g.text(name) {
            out.set("server", key, string(v), &g.said(name));
        }
    }
    if let Some(n) = g.int("backlog") {
        out.set(
            "server",
            "backlog",
            toml::Value::Integer(n),
            &g.said("backlog"),
        );
    }
}

fn worker(g: &Gunicorn, out: &mut Out) {
    if let Some(t) = g.int("timeout") {
        let why = format!(
            "{}. gunicorn kills a worker silent that long; supervisor answers a request that \
             takes longer 504 (app.kill_on_timeout = true also restarts its app process), and \
             restarts an app process that dies or hangs.",
            g.said("timeout")
        );
        let value = if t <= 0 { string("3650d") } else { seconds(t) };
        out.set("worker", "request_timeout", value, &why);
    }
    if let Some(n) = g.int("keepalive") {
        out.set(
            "worker",
            "keepalive_timeout",
            seconds(n.max(1)),
            &format!(
                "{}: how long an idle keep-alive connection waits.",
                g.said("keepalive")
            ),
        );
    }
    if let Some(n) = g.int("max_requests").filter(|&n| n > 0) {
        out.set(
            "worker",
            "max_requests",
            toml::Value::Integer(n),
            &format!(
                "{}: each app process is replaced after about this many requests, the \
                 replacement up before the old one stops (no dropped request).",
                g.said("max_requests")
            ),
        );
        if let Some(j) = g.int("max_requests_jitter").filter(|&j| j > 0) {
            out.set(
                "worker",
                "max_requests_jitter",
                toml::Value::Integer(j),
                &g.said("max_requests_jitter"),
            );
        }
    }
    if let Some(n) = g.int("limit_request_fields") {
        out.set(
            "worker",
            "max_headers",
            toml::Value::Integer(n.max(1)),
            &format!("{}: more headers get 431.", g.said("limit_request_fields")),
        );
    }
    for name in ["limit_request_line", "limit_request_field_size"] {
        if g.value(name).is_some() {
            out.note(format!(
                "{}: supervisor bounds the whole request head instead (worker.max_header_bytes, \
                 default 16KiB).",
                g.said(name)
            ));
        }
    }
}

fn app_command(g: &Gunicorn, app: &str, kind: Kind, class: &str, out: &mut Out) {
    let python = g.python.as_str();
    let mut argv: Vec<String> = Vec::new();
    let why;
    match kind {
        Kind::Uvicorn { h11 } => {
            argv.extend(
                [
                    python,
                    "-m",
                    "uvicorn",
                    app,
                    "--uds",
                    "{socket}",
                    "--no-access-log",
                ]
                .map(String::from),
            );
            if h11 {
                argv.extend(["--http", "h11"].map(String::from));
            }
            why = format!(
                "{}: each app process is one uvicorn on a private socket. Its access lines are \
                 supervisor's (log.access); uvicorn sees the real client and scheme \
                 (FORWARDED_ALLOW_IPS=* is set for it).",
                g.said("worker_class")
            );
            if g.value("worker_connections").is_some() {
                out.note(format!(
                    "{}: not used by uvicorn workers under gunicorn either.",
                    g.said("worker_connections")
                ));
            }
        }
        Kind::Gunicorn => {
            argv.extend(
                [
                    python,
                    "-m",
                    "gunicorn",
                    app,
                    "--bind",
                    "unix:{socket}",
                    "--workers",
                    "1",
                    "--worker-class",
                    class,
                    "--timeout",
                    "0",
                ]
                .map(String::from),
            );
            let threads = g.int("threads").filter(|&t| t > 1);
            if let Some(t) = threads {
                argv.extend(["--threads".to_string(), t.to_string()]);
            }
            // How many requests one such process takes at once.
            let concurrency = match class {
                "sync" => Some(threads.unwrap_or(1)),
                "gthread" => Some(threads.unwrap_or(1)),
                _ => None,
            };
            why = format!(
                "{}: each app process is gunicorn with one worker of that class on a private \
                 socket (--timeout 0: supervisor's worker.request_timeout applies instead); it \
                 sees the real client and scheme (FORWARDED_ALLOW_IPS=* is set for it).",
                g.said("worker_class")
            );
            if let Some(c) = concurrency {
                out.set(
                    "app",
                    "concurrency",
                    toml::Value::Integer(c),
                    "Requests one app process takes at once (its threads): more wait, host-wide, \
                     for the first free one.",
                );
            }
        }
    }
    if let Some(dir) = g.text("chdir") {
        out.set("app", "cwd", string(dir), &g.said("chdir"));
    }
    out.set("app", "command", strings(&argv), &why);
}

fn log(g: &Gunicorn, out: &mut Out) {
    if let Some(level) = g.text("loglevel") {
        let level = level.to_ascii_lowercase();
        if matches!(
            level.as_str(),
            "debug" | "info" | "warning" | "warn" | "error" | "critical"
        ) {
            out.set(
                "log",
                "level",
                string(level),
                &format!(
                    "{}: supervisor's own lines; LOG_LEVEL in the environment overrides it. The \
                     app's lines are logged at their own level whatever it is (log.app_level \
                     filters them).",
                    g.said("loglevel")
                ),
            );
        }
    }
    match g.text("accesslog").as_deref() {
        Some("-") => out.set(
            "log",
            "access",
            toml::Value::Boolean(true),
            &format!(
                "{}: one line per request, on standard error.",
                g.said("accesslog")
            ),
        ),
        Some(path) => {
            out.set(
                "log",
                "access",
                toml::Value::Boolean(true),
                &g.said("accesslog"),
            );
            out.set(
                "log",
                "access_file",
                string(path),
                "Reopened on USR1, after a rotation.",
            );
        }
        None => {}
    }
    match g.text("errorlog").as_deref() {
        None | Some("-") => {}
        Some(path) => out.set(
            "log",
            "file",
            string(path),
            &format!(
                "{}: supervisor's log and the app's output (reopened on USR1).",
                g.said("errorlog")
            ),
        ),
    }
    if g.value("access_log_format").is_some() {
        out.note(format!(
            "{}: the access log has two formats, combined plus the duration in µs, or JSON \
             with log.format = \"json\".",
            g.said("access_log_format")
        ));
    }
}

/// Every setting and hook that has no key, with what stands in for it.
fn unmapped(g: &Gunicorn, out: &mut Out) {
    const WHY: &[(&str, &str)] = &[
        ("preload_app", "not needed: each app process imports the app itself; supervisor never forks the app, so a reload or recycle always loads new code."),
        ("reload", "for development only: a reload (supervisor reload, or HUP) replaces the app processes with no dropped request."),
        ("daemon", "not needed: run it in the foreground under systemd (dist/supervisor-rs.service) or your platform."),
        ("capture_output", "not needed: the app's output always goes to the log, at its own levels."),
        ("logconfig", "supervisor's logging is the [log] keys; the app's own logging configuration stays the app's."),
        ("logconfig_dict", "supervisor's logging is the [log] keys; the app's own logging configuration stays the app's."),
        ("logconfig_json", "supervisor's logging is the [log] keys; the app's own logging configuration stays the app's."),
        ("statsd_host", "supervisor serves Prometheus metrics instead ([metrics] bind)."),
        ("proc_name", "not needed: processes are named by their role (supervisor status)."),
        ("certfile", "TLS is not terminated by supervisor yet: keep a TLS proxy or your platform's balancer in front."),
        ("keyfile", "TLS is not terminated by supervisor yet: keep a TLS proxy or your platform's balancer in front."),
        ("ca_certs", "TLS is not terminated by supervisor yet."),
        ("proxy_protocol", "the PROXY protocol is not read by supervisor yet."),
        ("raw_env", "set these variables in supervisor's environment: the app processes inherit it."),
        ("pythonpath", "set PYTHONPATH in supervisor's environment, or app.cwd."),
        ("umask", "not carried over: the app inherits supervisor's umask."),
        ("worker_tmp_dir", "not needed: heartbeats live in shared memory."),
        ("tmp_upload_dir", "not needed."),
        ("reuse_port", "supervisor uses SO_REUSEPORT by default (server.accept)."),
        ("initgroups", "server.user's supplementary groups are always set."),
        ("secure_scheme_headers", "supervisor sets X-Forwarded-Proto itself; see server.forwarded_allow_ips."),
        ("proxy_allow_ips", "the PROXY protocol is not read by supervisor yet."),
        ("sendfile", "not needed."),
        ("spew", "not carried over (a debugging aid)."),
        ("reload_engine", "for development only."),
        ("reload_extra_files", "for development only."),
        ("check_config", "supervisor check validates a configuration."),
        ("print_config", "supervisor check prints the configuration resolved."),
        ("ssl_version", "TLS is not terminated by supervisor yet."),
        ("cert_reqs", "TLS is not terminated by supervisor yet."),
        ("ciphers", "TLS is not terminated by supervisor yet."),
        ("suppress_ragged_eofs", "TLS is not terminated by supervisor yet."),
        ("do_handshake_on_connect", "TLS is not terminated by supervisor yet."),
        ("syslog", "supervisor logs to standard error (the journal under systemd) or log.file."),
        ("syslog_addr", "supervisor logs to standard error (the journal under systemd) or log.file."),
        ("syslog_prefix", "supervisor logs to standard error (the journal under systemd) or log.file."),
        ("syslog_facility", "supervisor logs to standard error (the journal under systemd) or log.file."),
        ("disable_redirect_access_to_syslog", "supervisor logs to standard error or log.file."),
        ("enable_stdio_inheritance", "not needed: the app's output always goes to the log."),
        ("logger_class", "supervisor's logging is the [log] keys."),
        ("statsd_prefix", "supervisor serves Prometheus metrics instead ([metrics] bind)."),
        ("dogstatsd_tags", "supervisor serves Prometheus metrics instead ([metrics] bind)."),
        ("default_proc_name", "not needed."),
        ("paste", "a Paste deployment: run it with gunicorn's --paste in app.command yourself."),
        ("raw_paste_global_conf", "a Paste deployment: run it with gunicorn's --paste in app.command yourself."),
        ("header_map", "supervisor's strict HTTP edge drops headers with underscores and never folds them into dashes."),
        ("forwarder_headers", "supervisor's strict HTTP edge drops headers with underscores and never folds them into dashes."),
        ("permit_obsolete_folding", "supervisor's strict HTTP edge follows RFC 9112 and refuses these requests with 400."),
        ("permit_unconventional_http_method", "supervisor's strict HTTP edge follows RFC 9110/9112."),
        ("permit_unconventional_http_version", "supervisor's strict HTTP edge follows RFC 9110/9112."),
        ("casefold_http_method", "supervisor's strict HTTP edge follows RFC 9110/9112."),
        ("strip_header_spaces", "supervisor's strict HTTP edge follows RFC 9112 and refuses such headers with 400."),
    ];
    for (name, why) in WHY {
        if g.value(name).is_some_and(|v| v != &Value::Bool(false)) {
            out.note(format!("{}: {why}", g.said(name)));
        }
    }
    // Any other setting of gunicorn's that the file sets: said, never dropped in silence.
    const MAPPED: &[&str] = &[
        "bind",
        "workers",
        "worker_class",
        "threads",
        "worker_connections",
        "timeout",
        "graceful_timeout",
        "keepalive",
        "max_requests",
        "max_requests_jitter",
        "loglevel",
        "accesslog",
        "errorlog",
        "access_log_format",
        "forwarded_allow_ips",
        "user",
        "group",
        "pidfile",
        "backlog",
        "limit_request_fields",
        "limit_request_line",
        "limit_request_field_size",
        "chdir",
    ];
    for name in g.settings.keys() {
        let known = MAPPED.contains(&name.as_str()) || WHY.iter().any(|(n, _)| n == name);
        if !known && g.value(name).is_some() {
            out.note(format!("{}: no equivalent in supervisor.", g.said(name)));
        }
    }
    const HOOKS: &[(&str, &str)] = &[
        ("worker_abort", "supervisor logs every hung or killed process, with the requests it had in flight."),
        ("post_fork", "do per-process setup in the app's startup (FastAPI/Starlette lifespan, or at import)."),
        ("post_worker_init", "do per-process setup in the app's startup (lifespan, or at import)."),
        ("when_ready", "the master logs `ready`, tells systemd (Type=notify) and answers /readyz on the metrics listener."),
        ("on_starting", "run it before `supervisor start` (ExecStartPre= under systemd)."),
        ("on_exit", "do clean-up in the app's shutdown (lifespan), or ExecStopPost= under systemd."),
        ("worker_exit", "do clean-up in the app's shutdown (lifespan)."),
        ("child_exit", "every exit is logged by the master with its cause."),
        ("pre_request", "use a middleware in the app."),
        ("post_request", "use a middleware in the app, or the access log."),
        ("worker_int", "a stop drains every process; the app gets SIGTERM."),
        ("on_reload", "supervisor reload (HUP) validates the new configuration before replacing anything."),
        ("pre_fork", "no equivalent: the app is never forked, it starts fresh."),
        ("pre_exec", "no equivalent: a binary upgrade is supervisor upgrade (USR2)."),
        ("nworkers_changed", "no equivalent: supervisor scale changes the count; status shows it."),
        ("ssl_context", "TLS is not terminated by supervisor yet."),
    ];
    for hook in &g.hooks {
        let why = HOOKS
            .iter()
            .find(|(h, _)| h == hook)
            .map_or("no equivalent.", |(_, w)| w);
        out.note(format!("hook {hook}(): {why}"));
    }
    if !g.unknown_options.is_empty() {
        out.note(format!(
            "command-line options not recognised, not carried over: {}",
            g.unknown_options.join(" ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gunicorn(settings: Value, hooks: &[&str], app: Option<&str>) -> Gunicorn {
        let settings: Map<String, Value> = serde_json::from_value(settings).unwrap();
        let source = settings
            .keys()
            .map(|k| (k.clone(), Value::String("gunicorn_config.py".into())))
            .collect();
        Gunicorn {
            settings,
            source,
            hooks: hooks.iter().map(|h| h.to_string()).collect(),
            app: app.map(str::to_string),
            unknown_options: Vec::new(),
            python: "/srv/app/.venv/bin/python".into(),
            cpus: 2,
            installed: [
                ("uvicorn".to_string(), true),
                ("gunicorn".to_string(), false),
            ]
            .into(),
        }
    }

    fn loaded(m: &Migration) -> worker::config::Config {
        config_loader::check_text(&m.toml).unwrap()
    }

    /// The seed's configuration (../shared/examples/gunicorn_config.py), as the reader gives it
    /// on a 2-CPU machine without PORT, WORKERS or LOG_LEVEL set.
    #[test]
    fn the_seeds_configuration_carries_over() {
        let g = gunicorn(
            serde_json::json!({
                "bind": "0.0.0.0:8000", "workers": 5,
                "worker_class": "uvicorn.workers.UvicornWorker", "timeout": 120,
                "graceful_timeout": 120, "keepalive": 5, "max_requests": 1000,
                "max_requests_jitter": 50, "loglevel": "info", "accesslog": "-",
                "errorlog": "-", "forwarded_allow_ips": "*", "preload_app": false
            }),
            &["worker_abort"],
            Some("main:app"),
        );
        let m = migrate(&g).unwrap();
        let c = loaded(&m);
        assert_eq!(c.server.bind, ["0.0.0.0:8000"]);
        assert_eq!(c.server.workers, None, "auto: 2 x CPU + 1 at each start");
        assert_eq!(
            c.server.graceful_timeout,
            std::time::Duration::from_secs(120)
        );
        assert_eq!(c.server.forwarded_allow_ips.to_list(), ["*"]);
        assert_eq!(
            c.worker.request_timeout,
            std::time::Duration::from_secs(120)
        );
        assert_eq!(
            c.worker.keepalive_timeout,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(
            (c.worker.max_requests, c.worker.max_requests_jitter),
            (1000, 50)
        );
        assert!(c.log.access);
        assert_eq!(
            c.app.command,
            [
                "/srv/app/.venv/bin/python",
                "-m",
                "uvicorn",
                "main:app",
                "--uds",
                "{socket}",
                "--no-access-log"
            ]
        );
        assert!(m
            .toml
            .contains("hook worker_abort(): supervisor logs every hung"));
        // preload_app = False needs no word; every mapped key says where it came from.
        assert!(!m.toml.contains("preload_app"));
        assert!(m
            .toml
            .contains("gunicorn timeout = 120 (gunicorn_config.py)"));
    }

    #[test]
    fn a_sync_app_runs_under_gunicorn_one_request_at_a_time() {
        let g = gunicorn(
            serde_json::json!({"workers": 3, "chdir": "/srv"}),
            &[],
            Some("app:wsgi"),
        );
        let c = loaded(&migrate(&g).unwrap());
        assert_eq!(c.server.workers, Some(3));
        assert_eq!(c.server.bind, ["127.0.0.1:8000"], "gunicorn's default");
        assert_eq!(c.app.concurrency, 1);
        assert_eq!(c.app.cwd, "/srv");
        assert_eq!(
            &c.app.command[1..5],
            ["-m", "gunicorn", "app:wsgi", "--bind"]
        );
        let threads = gunicorn(
            serde_json::json!({"worker_class": "gthread", "threads": 8}),
            &[],
            Some("app:wsgi"),
        );
        let c = loaded(&migrate(&threads).unwrap());
        assert_eq!(c.app.concurrency, 8);
        assert!(c
            .app
            .command
            .ends_with(&["--threads".to_string(), "8".to_string()]));
    }

    #[test]
    fn a_setting_with_no_rule_is_still_listed() {
        let g = gunicorn(
            serde_json::json!({"syslog": true, "initgroups": true, "made_up_setting": 3}),
            &[],
            Some("main:app"),
        );
        let toml = migrate(&g).unwrap().toml;
        assert!(toml.contains("gunicorn syslog = true"), "{toml}");
        assert!(
            toml.contains("gunicorn made_up_setting = 3 (gunicorn_config.py): no equivalent"),
            "{toml}"
        );
    }

    #[test]
    fn a_missing_app_server_is_a_warning() {
        let uvicorn = gunicorn(
            serde_json::json!({"worker_class": "uvicorn.workers.UvicornWorker"}),
            &[],
            Some("main:app"),
        );
        assert!(migrate(&uvicorn).unwrap().warnings.is_empty());
        let sync = gunicorn(serde_json::json!({}), &[], Some("app:wsgi"));
        let warnings = migrate(&sync).unwrap().warnings;
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("gunicorn is not installed for /srv/app/.venv/bin/python"));
    }

    #[test]
    fn without_an_app_there_is_nothing_to_run() {
        let err = migrate(&gunicorn(serde_json::json!({}), &[], None)).unwrap_err();
        assert!(err.contains("no app named"), "{err}");
    }

    #[test]
    fn what_has_no_key_is_listed_with_its_reason() {
        let g = gunicorn(
            serde_json::json!({"preload_app": true, "certfile": "/c.pem",
                               "access_log_format": "%(h)s", "limit_request_line": 8190}),
            &["post_fork", "made_up"],
            Some("main:app"),
        );
        let toml = migrate(&g).unwrap().toml;
        for expected in [
            "preload_app = true (gunicorn_config.py): not needed",
            "certfile",
            "access_log_format",
            "limit_request_line",
            "hook post_fork(): do per-process setup",
        ] {
            assert!(toml.contains(expected), "{expected} in {toml}");
        }
    }

    #[test]
    fn the_program_name_is_dropped_from_a_pasted_start_command() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let plain = args(&["-c", "g.py", "main:app"]);
        assert_eq!(
            without_program(&args(&["gunicorn", "-c", "g.py", "main:app"])),
            plain
        );
        assert_eq!(
            without_program(&args(&[".venv/bin/gunicorn", "main:app"])),
            args(&["main:app"])
        );
        assert_eq!(
            without_program(&args(&[
                "python3", "-m", "gunicorn", "-c", "g.py", "main:app"
            ])),
            plain
        );
        assert_eq!(without_program(&plain), plain);
    }
}
