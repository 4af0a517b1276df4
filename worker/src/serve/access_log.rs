//! The access log (`log.access`): one line per answered request, in the combined log format or
//! as JSON (`log.format = "json"`), written by the worker that answered it.
//!
//! Owns what a line holds (captured when the request arrives, written when its response is
//! done), the two formats, and where lines go: stderr, or `log.access_file`, opened `O_APPEND`
//! by each worker and reopened on USR1. Each line is one `write(2)`: lines of different workers
//! never interleave, and no lock is shared between processes (the mutex here is this process's
//! own, taken once per line, never contended on a single-threaded worker). Formatting reuses one
//! buffer per thread and caches the timestamp per second.
//!
//! It decides nothing about requests: `request` captures an [`Entry`] and hands it back with the
//! status, the body bytes sent and the duration.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use humantime_serde::re::humantime;
use hyper::header::{HeaderMap, HeaderValue, REFERER, USER_AGENT};
use hyper::{Method, Uri, Version};

use crate::config::{LogConfig, LogFormat, Trusted};

/// Where lines go.
enum Sink {
    Stderr,
    /// `log.access_file`, reopened by [`AccessLog::reopen`].
    File {
        path: String,
        file: Mutex<File>,
    },
}

pub(crate) struct AccessLog {
    json: bool,
    sink: Sink,
    trusted: Trusted,
    worker_id: u32,
}

/// What a line says about the request, taken when it arrives. The values are cheap clones of
/// hyper's (reference-counted bytes), and the whole entry is only built when the log is on.
pub(crate) struct Entry {
    method: Method,
    uri: Uri,
    version: Version,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    client: Option<IpAddr>,
}

/// Opens `path` for appending, creating it if needed.
pub fn open(path: &str) -> io::Result<File> {
    crate::logfile::open_append(path, "access log")
}

impl AccessLog {
    /// The access log `log` asks for, or `None` when it is off. `trusted` is
    /// `server.forwarded_allow_ips`, to name the client behind a proxy.
    pub(crate) fn new(
        log: &LogConfig,
        trusted: Trusted,
        worker_id: u32,
    ) -> io::Result<Option<AccessLog>> {
        if !log.access {
            return Ok(None);
        }
        let sink = if log.access_file.is_empty() {
            Sink::Stderr
        } else {
            Sink::File {
                path: log.access_file.clone(),
                file: Mutex::new(open(&log.access_file)?),
            }
        };
        Ok(Some(AccessLog {
            json: log.format == LogFormat::Json,
            sink,
            trusted,
            worker_id,
        }))
    }

    /// Captures what the line will say about a request that just arrived from `peer`.
    pub(crate) fn entry(
        &self,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Box<Entry> {
        Box::new(Entry {
            method: method.clone(),
            uri: uri.clone(),
            version,
            referer: headers.get(REFERER).cloned(),
            user_agent: headers.get(USER_AGENT).cloned(),
            client: crate::serve::client_rate::client_ip(&self.trusted, headers, peer),
        })
    }

    /// Writes the line of a request answered with `status`, `bytes` of body, after `took`.
    pub(crate) fn write(&self, entry: &Entry, status: u16, bytes: u64, took: Duration) {
        thread_local! {
            static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
        }
        // The time the request arrived, as in Apache's and nginx's logs.
        let started = SystemTime::now()
            .checked_sub(took)
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            if self.json {
                self.json_line(&mut line, entry, status, bytes, took, started);
            } else {
                combined_line(&mut line, entry, status, bytes, took, started);
            }
            line.push(b'\n');
            // One write per line; a failure (disk full) is not worth failing a request over.
            let _ = match &self.sink {
                Sink::Stderr => io::stderr().write_all(&line),
                Sink::File { file, .. } => match file.lock() {
                    Ok(mut f) => f.write_all(&line),
                    Err(_) => Ok(()),
                },
            };
        });
    }

    /// USR1: reopens `log.access_file` (after a rotation). `Ok(None)` when the log goes to
    /// stderr (nothing to reopen); on error the old file stays in use.
    pub(crate) fn reopen(&self) -> io::Result<Option<&str>> {
        let Sink::File { path, file } = &self.sink else {
            return Ok(None);
        };
        let fresh = open(path)?;
        if let Ok(mut f) = file.lock() {
            *f = fresh;
        }
        Ok(Some(path))
    }

    fn json_line(
        &self,
        line: &mut Vec<u8>,
        e: &Entry,
        status: u16,
        bytes: u64,
        took: Duration,
        started: Duration,
    ) {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            time: &'a str,
            client: Option<IpAddr>,
            method: &'a str,
            path: &'a str,
            protocol: &'a str,
            status: u16,
            bytes: u64,
            referer: Option<std::borrow::Cow<'a, str>>,
            user_agent: Option<std::borrow::Cow<'a, str>>,
            duration_us: u64,
            worker: u32,
        }
        let time = rfc3339(started);
        let target = target(&e.uri);
        let _ = serde_json::to_writer(
            &mut *line,
            &Line {
                time: &time,
                client: e.client,
                method: e.method.as_str(),
                path: &target,
                protocol: protocol(e.version),
                status,
                bytes,
                referer: e
                    .referer
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v.as_bytes())),
                user_agent: e
                    .user_agent
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v.as_bytes())),
                duration_us: took.as_micros() as u64,
                worker: self.worker_id,
            },
        );
    }
}

/// `client - - [time] "METHOD target PROTO" status bytes "referer" "user-agent" duration_us`:
/// the combined log format plus the request's duration in µs (fields a combined-format parser
/// does not expect come last, where they are commonly ignored).
fn combined_line(
    line: &mut Vec<u8>,
    e: &Entry,
    status: u16,
    bytes: u64,
    took: Duration,
    started: Duration,
) {
    match e.client {
        Some(ip) => {
            let _ = write!(line, "{ip}");
        }
        None => line.push(b'-'),
    }
    line.extend_from_slice(b" - - [");
    clf_time(line, started.as_secs());
    line.extend_from_slice(b"] \"");
    escaped(line, e.method.as_str().as_bytes());
    line.push(b' ');
    escaped(line, target(&e.uri).as_bytes());
    line.push(b' ');
    line.extend_from_slice(protocol(e.version).as_bytes());
    let _ = write!(line, "\" {status} {bytes} \"");
    quoted_header(line, e.referer.as_ref());
    line.extend_from_slice(b"\" \"");
    quoted_header(line, e.user_agent.as_ref());
    let _ = write!(line, "\" {}", took.as_micros());
}

/// The request's path and query (HTTP/2 requests and absolute-form targets carry a scheme and
/// authority too, which a log line does not repeat); the whole target when it has no path
/// (`CONNECT host:port`).
fn target(uri: &Uri) -> std::borrow::Cow<'_, str> {
    match uri.path_and_query() {
        Some(pq) => pq.as_str().into(),
        None => uri.to_string().into(),
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// A header's value inside quotes, or `-` when absent.
fn quoted_header(line: &mut Vec<u8>, value: Option<&HeaderValue>) {
    match value {
        Some(v) => escaped(line, v.as_bytes()),
        None => line.push(b'-'),
    }
}

/// Copies `bytes`, writing `"`, `\`, control and non-ASCII bytes as `\xHH` (as nginx does), so
/// that a client cannot forge a line or break its quoting.
fn escaped(line: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(line, "\\x{b:02X}");
        } else {
            line.push(b);
        }
    }
}

/// `27/Nov/2026:06:00:00 +0000` (always UTC), cached for the second.
fn clf_time(line: &mut Vec<u8>, secs: u64) {
    thread_local! {
        static CACHE: RefCell<(u64, [u8; 26])> = const { RefCell::new((u64::MAX, [0; 26])) };
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let mut buf = [0u8; 26];
            buf.copy_from_slice(clf(secs).as_bytes());
            *c = (secs, buf);
        }
        line.extend_from_slice(&c.1);
    });
}

/// The date and time of `secs` after the Unix epoch in the common log format, rearranged from
/// humantime's RFC 3339 (`2026-11-27T06:00:00Z`).
fn clf(secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    let month: usize = t[5..7].parse().unwrap_or(1);
    format!(
        "{}/{}/{}:{} +0000",
        &t[8..10],
        MONTHS[month.clamp(1, 12) - 1],
        &t[0..4],
        &t[11..19]
    )
}

/// `2026-11-27T06:00:00.123Z`: `t` after the Unix epoch.
fn rfc3339(t: Duration) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ua: Option<&str>) -> Entry {
        Entry {
            method: Method::GET,
            uri: "/a/b?c=1".parse().unwrap(),
            version: Version::HTTP_11,
            referer: None,
            user_agent: ua.map(|u| HeaderValue::from_str(u).unwrap()),
            client: Some("192.0.2.7".parse().unwrap()),
        }
    }

    #[test]
    fn targets_are_logged_as_path_and_query() {
        let t = |s: &str| target(&s.parse().unwrap()).into_owned();
        assert_eq!(t("/a?b=1"), "/a?b=1");
        assert_eq!(t("http://example.test/a?b=1"), "/a?b=1");
        assert_eq!(t("example.test:443"), "example.test:443");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(clf(0), "01/Jan/1970:00:00:00 +0000");
        // 2026-11-27T06:00:00Z
        assert_eq!(clf(1_795_759_200), "27/Nov/2026:06:00:00 +0000");
        // A leap day.
        assert_eq!(clf(951_782_400), "29/Feb/2000:00:00:00 +0000");
        assert_eq!(
            rfc3339(Duration::from_millis(1_795_759_200_123)),
            "2026-11-27T06:00:00.123Z"
        );
    }

    #[test]
    fn combined_lines_quote_and_escape() {
        let mut line = Vec::new();
        combined_line(
            &mut line,
            &entry(Some("curl/8 \"x\"")),
            404,
            12,
            Duration::from_micros(1500),
            Duration::from_secs(1_795_759_200),
        );
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "192.0.2.7 - - [27/Nov/2026:06:00:00 +0000] \"GET /a/b?c=1 HTTP/1.1\" 404 12 \
             \"-\" \"curl/8 \\x22x\\x22\" 1500"
        );
    }
}
