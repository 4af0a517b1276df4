//! The client edge: half-closed clients, minimum data rates, and the strict HTTP edge
//! (RFC 9110/9112), each against the built-in app and the standard-library app behind the
//! proxy.

use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use crate::util::{read_response, Response, Server};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");

/// `supervisor start -w 1 SETTINGS... -- python3 stdlib_app.py --uds {socket}`.
fn start_app(settings: &[&str]) -> Server {
    let mut args = vec!["-w", "1"];
    args.extend_from_slice(settings);
    args.extend_from_slice(&["--", "python3", APP, "--uds", "{socket}"]);
    Server::start(&args)
}

/// The built-in app with one worker.
fn start_builtin(settings: &[&str]) -> Server {
    let mut args = vec!["-w", "1"];
    args.extend_from_slice(settings);
    Server::start(&args)
}

/// Sends `raw`, closes the sending side (`shutdown(SHUT_WR)`), and reads the response.
fn half_closed(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw)?;
    s.shutdown(Shutdown::Write)?;
    read_response(&mut BufReader::new(s))
}

/// 200 requests, each sent and then half-closed: every one is answered.
fn all_half_closed_answered(s: &Server, path: &str) {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut lost = Vec::new();
    for i in 0..200 {
        match half_closed(s.addr, raw.as_bytes()) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => lost.push(format!("#{i}: {} {}", r.status, r.text())),
            Err(e) => lost.push(format!("#{i}: {e}")),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of 200 not answered; the first: {:?}",
        lost.len(),
        &lost[..lost.len().min(3)]
    );
}

#[test]
fn half_closed_clients_are_answered_by_the_builtin_app() {
    let s = start_builtin(&[]);
    all_half_closed_answered(&s, "/");
}

#[test]
fn half_closed_clients_are_answered_through_the_proxy() {
    let s = start_app(&[]);
    all_half_closed_answered(&s, "/");
}
