//! Every value `supervisor check` accepts can start, reload and stop: each number, duration and
//! size key at the least and at the most it allows, all at once, through start, HUP and TERM.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::{eventually, run, write_file, Server};

const WAIT: Duration = Duration::from_secs(30);

/// Every key of `supervisor.toml` that takes a number, a duration or a size: the least and the
/// most it allows, and a value just past the most ("" when TOML cannot write one), as TOML.
/// `server.workers` is the one exception: its most (1024) is 1024 processes, more than a shared
/// test machine should start; 3 stands in for it. (`server.http_workers` applies with
/// `app.command` only, which this configuration has not: its most starts nothing.)
const BOUNDS: &[(&str, &str, &str, &str)] = &[
    ("server.workers", "1", "3", "1025"),
    ("server.http_workers", "1", "1024", "1025"),
    ("server.backlog", "1", "65535", "65536"),
    (
        "server.graceful_timeout",
        "\"0s\"",
        "\"3650d\"",
        "\"3650d 1s\"",
    ),
    ("worker.max_connections", "1", "4294967295", "4294967296"),
    ("worker.max_concurrent", "1", "4294967295", "4294967296"),
    (
        "worker.header_timeout",
        "\"1ns\"",
        "\"3650d\"",
        "\"3650d 1s\"",
    ),
    (
        "worker.keepalive_timeout",
        "\"1ns\"",
        "\"3650d\"",
        "\"3650d 1s\"",
    ),
    (
        "worker.request_timeout",
        "\"1ns\"",
        "\"3650d\"",
        "\"3650d 1s\"",
    ),
    (
        "worker.client_timeout",
        "\"1ns\"",
        "\"3650d\"",
        "\"3650d 1s\"",
    ),
    (
        "worker.max_header_bytes",
        "\"8KiB\"",
        "\"1MiB\"",
        "\"1025KiB\"",
    ),
    ("worker.max_headers", "1", "1000", "1001"),
    (
        "worker.min_request_rate",
        "0",
        "\"1PiB/s\"",
        "1125899906842625",
    ),
    (
        "worker.min_response_rate",
        "0",
        "\"1PiB/s\"",
        "1125899906842625",
    ),
    ("worker.min_rate_grace", "\"100ms\"", "\"1h\"", "\"3601s\""),
    ("worker.max_body_bytes", "0", "\"1PiB\"", "1125899906842625"),
    ("worker.timeout", "\"2s\"", "\"3650d\"", "\"3650d 1s\""),
    ("worker.max_requests", "0", "9223372036854775807", ""),
    ("worker.max_requests_jitter", "0", "9223372036854775807", ""),
    ("worker.max_rss", "0", "\"1PiB\"", "1125899906842625"),
    ("worker.rss_interval", "\"100ms\"", "\"1h\"", "\"3601s\""),
    ("worker.rss_samples", "1", "1000", "1001"),
    (
        "worker.max_lifetime",
        "\"0s\"",
        "\"3650d\"",
        "\"18446744073709551615s\"",
    ),
    (
        "worker.max_lifetime_jitter",
        "\"0s\"",
        "\"3650d\"",
        "\"3650d 1s\"",
    ),
    ("worker.min_lifetime", "\"0s\"", "\"3650d\"", "\"3650d 1s\""),
    ("worker.max_recycling", "1", "1024", "1025"),
    (
        "limits.max_concurrent_requests",
        "1",
        "4294967295",
        "4294967296",
    ),
    (
        "limits.cluster_max_concurrent_requests",
        "0",
        "4294967295",
        "4294967296",
    ),
    ("limits.queue", "0", "100000", "100001"),
    (
        "limits.queue_timeout",
        "\"1ns\"",
        "\"3650d\"",
        "\"3650d 1s\"",
    ),
    ("limits.burst", "0", "4294967295", "4294967296"),
    ("limits.idle_ttl", "\"1ns\"", "\"31d\"", "\"32d\""),
    ("limits.max_active_instances", "1", "10000000", "10000001"),
    ("app.ready_timeout", "\"1ns\"", "\"3650d\"", "\"3650d 1s\""),
    ("app.concurrency", "0", "4294967295", "4294967296"),
    ("app.pack_window", "\"0s\"", "\"1s\"", "\"1s 1ns\""),
    (
        "app.upgrade_idle_timeout",
        "\"1ns\"",
        "\"3650d\"",
        "\"3650d 1s\"",
    ),
    ("redis.timeout", "\"1ms\"", "\"10s\"", "\"10001ms\""),
    ("redis.max_connections", "2", "4294967295", "4294967296"),
    ("redis.lease_ttl", "\"1s\"", "\"3650d\"", "\"3650d 1s\""),
];

/// Keys of the reference `supervisor.toml` whose default is a number, a duration, a size or a
/// data rate.
fn numeric_keys() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/supervisor.toml")).unwrap();
    let table: toml::Table = text.parse().unwrap();
    let quantity = |s: &str| {
        // A data rate ("240B/s") is a size per second.
        let s = s.strip_suffix("/s").unwrap_or(s);
        let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        !digits.is_empty() && digits.len() < s.len() && digits.bytes().all(|b| b.is_ascii_digit())
    };
    let mut keys = BTreeSet::new();
    for (section, values) in &table {
        for (key, value) in values.as_table().unwrap() {
            let numeric = match value {
                toml::Value::Integer(_) => true,
                toml::Value::String(s) => quantity(s) || s == "auto",
                _ => false,
            };
            if numeric {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    keys
}

#[test]
fn the_bounds_cover_every_number_duration_and_size_key() {
    let listed: BTreeSet<String> = BOUNDS.iter().map(|(k, _, _, _)| k.to_string()).collect();
    assert_eq!(listed, numeric_keys());
}

/// The configuration with every key in `BOUNDS` at its least (`most` false) or most, with the
/// built-in app, a rate (so that the burst counts), a Redis (down), and the test's own sockets and directories.
fn config(dir: &std::path::Path, most: bool) -> String {
    let mut pairs: Vec<(&str, &str)> = BOUNDS
        .iter()
        .map(|(key, least, max, _)| (*key, if most { *max } else { *least }))
        .collect();
    pairs.push(("limits.rate", if most { "\"100000/s\"" } else { "\"1/h\"" }));
    // A Redis that is down (nothing listens on port 1): the redis keys apply, degraded.
    pairs.push(("redis.url", "\"redis://127.0.0.1:1\""));
    let socket = format!("{:?}", dir.join("ctl.sock").to_str().unwrap());
    let runtime = format!("{:?}", dir.to_str().unwrap());
    pairs.push(("server.control_socket", &socket));
    pairs.push(("server.runtime_dir", &runtime));
    toml_of(&pairs)
}

fn start_reload_stop(most: bool) {
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), most);
    write_file(dir.path(), "supervisor.toml", &text);
    let (code, _, err) = run(dir.path(), &["check"], &[]);
    assert_eq!(code, 0, "check accepts it:\n{text}\n{err}");
    let mut s = Server::spawn_in(dir, &["-b", "127.0.0.1:0"]).wait_ready();
    let workers = if most { 3 } else { 1 };
    let before = s.serving_pids();
    assert_eq!(before.len(), workers);
    if most {
        assert_eq!(s.get("/").status, 200);
    }
    s.signal(Signal::SIGHUP);
    s.reloaded(1);
    eventually(WAIT, "every worker to be replaced", || {
        let now = s.serving_pids();
        (now.len() == workers && now.iter().all(|p| !before.contains(p))).then_some(())
    });
    if most {
        assert_eq!(s.get("/").status, 200);
    }
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(WAIT);
    assert!(status.success(), "{status:?}");
    assert!(
        !s.log.text().contains("panicked"),
        "nothing panicked:\n{}",
        s.log.text()
    );
}

/// The most in `BOUNDS` is the most `check` accepts: one past it is refused, naming the key and
/// what is allowed. (Before the ranges, "18446744073709551615s" passed `check` and panicked at
/// start.)
#[test]
fn one_past_the_most_is_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut pairs: Vec<(&str, &str)> = BOUNDS
        .iter()
        .filter(|b| !b.3.is_empty())
        .map(|(key, _, _, over)| (*key, *over))
        .collect();
    pairs.push(("limits.rate", "\"100000/s\""));
    write_file(dir.path(), "supervisor.toml", &toml_of(&pairs));
    let (code, _, err) = run(dir.path(), &["check"], &[]);
    assert_eq!(code, 2, "{err}");
    for (key, over) in pairs.iter().filter(|(k, _)| *k != "limits.rate") {
        let line = err
            .lines()
            .find(|l| l.contains(&format!(" {key} = ")))
            .unwrap_or_else(|| panic!("{key} = {over} is refused:\n{err}"));
        assert!(line.contains("expected"), "{line}");
    }
}

/// A TOML file setting `pairs` (`section.key`, TOML value).
fn toml_of(pairs: &[(&str, &str)]) -> String {
    let mut sections: Vec<(&str, Vec<String>)> = Vec::new();
    for (key, value) in pairs {
        let (section, name) = key.split_once('.').unwrap();
        let line = format!("{name} = {value}");
        match sections.iter_mut().find(|(s, _)| *s == section) {
            Some((_, lines)) => lines.push(line),
            None => sections.push((section, vec![line])),
        }
    }
    sections
        .iter()
        .map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n")))
        .collect()
}

#[test]
fn every_key_at_its_least_starts_reloads_and_stops() {
    start_reload_stop(false);
}

#[test]
fn every_key_at_its_most_starts_reloads_and_stops() {
    start_reload_stop(true);
}
