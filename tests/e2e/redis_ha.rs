//! Redis over TLS (`rediss://`, with a certificate authority and a client certificate of the
//! test's own) and Redis found through Sentinel, across failovers, each with real
//! `redis-server` processes (one in Sentinel mode) the test starts on loopback ports.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster_limits::{all_connected, redis_states};
use crate::util::*;

const WAIT: Duration = Duration::from_secs(20);

/// `N` distinct loopback ports nobody listens on right now (all bound at once, so that none
/// is handed out twice).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// `redis-cli` with `conn` (how to reach the server) then `args`; its output, trimmed ("" if
/// it failed).
fn cli(conn: &[String], args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(conn)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn tcp(port: u16) -> Vec<String> {
    vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ]
}

/// Starts `program args...` and waits until `redis-cli conn PING` answers.
fn start_redis(program: &str, args: &[String], conn: &[String]) -> KillOnDrop {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} (Debian package redis-server): {e}"));
    let child = KillOnDrop(child);
    eventually(WAIT, &format!("{program} to answer"), || {
        (cli(conn, &["PING"]) == "PONG").then_some(())
    });
    child
}

fn redis_args(port: u16, dir: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        .map(String::from)
        .to_vec();
    a.extend(["--port".into(), port.to_string()]);
    a.extend(["--dir".into(), dir.display().to_string()]);
    a
}

/// Runs `openssl args...` in `dir`; panics with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl) must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority, a server certificate for 127.0.0.1 and a client certificate, all
/// signed by it, in `dir`: ca.crt, server.{crt,key}, client.{crt,key}.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=supervisor test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        let (key, csr, crt, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.crt"),
            format!("{who}.ext"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={who}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &crt,
                "-extfile",
                &ext,
            ],
        );
    }
}

/// Holds a request for a while (so that it holds a lease) in the background.
fn hold(s: &Server, ms: u32) -> std::thread::JoinHandle<std::io::Result<Response>> {
    let addr = s.addr;
    let path = format!("/sleep?ms={ms}");
    std::thread::spawn(move || try_get(addr, &path))
}

#[test]
fn rediss_with_the_configured_authority_and_client_certificate_holds_the_cluster_cap() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);
    let [port] = free_ports();
    let path = |f: &str| d.join(f).display().to_string();
    let mut args = redis_args(0, d);
    args.extend([
        "--tls-port".into(),
        port.to_string(),
        "--tls-cert-file".into(),
        path("server.crt"),
        "--tls-key-file".into(),
        path("server.key"),
        "--tls-ca-cert-file".into(),
        path("ca.crt"),
        // The default: a client without a certificate from ca.crt is turned away.
        "--tls-auth-clients".into(),
        "yes".into(),
    ]);
    let conn: Vec<String> = vec![
        "--tls".into(),
        "--cacert".into(),
        path("ca.crt"),
        "--cert".into(),
        path("client.crt"),
        "--key".into(),
        path("client.key"),
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ];
    let _redis = start_redis("redis-server", &args, &conn);

    let url = format!("redis.url=rediss://127.0.0.1:{port}");
    let ca = format!("redis.tls_ca_file={}", path("ca.crt"));
    let cert = format!("redis.tls_cert_file={}", path("client.crt"));
    let key = format!("redis.tls_key_file={}", path("client.key"));
    let cap = "limits.cluster_max_concurrent_requests=5";
    let s = Server::start(&[
        "-w", "2", "--set", &url, "--set", &ca, "--set", &cert, "--set", &key, "--set", cap,
    ]);
    eventually(WAIT, "both workers connected over TLS", || {
        all_connected(&s)
    });
    let held = hold(&s, 1500);
    eventually(WAIT, "the request's lease in redis", || {
        (cli(&conn, &["ZCARD", "supervisor:leases"]) == "1").then_some(())
    });
    assert_eq!(held.join().unwrap().unwrap().status, 200);
    eventually(WAIT, "the lease given back", || {
        (cli(&conn, &["ZCARD", "supervisor:leases"]) == "0").then_some(())
    });
    drop(s);

    // Without the authority, the server's certificate is not trusted: the workers serve,
    // degraded, and the log says why.
    let s = Server::start(&[
        "-w", "1", "--set", &url, "--set", &cert, "--set", &key, "--set", cap,
    ]);
    assert_eq!(s.get("/").status, 200);
    assert_eq!(redis_states(&s), ["degraded"]);
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("redis is not answering"))
        .expect("the breaker's warning");
    assert!(
        line.to_lowercase().contains("certificate") || line.contains("UnknownIssuer"),
        "the warning should name the certificate problem: {line}"
    );
}

#[test]
fn tls_files_without_rediss_are_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_file(dir.path(), "ca.crt", "not used");
    let ca = format!("redis.tls_ca_file={}", ca.display());
    let (code, _, err) = run(
        dir.path(),
        &[
            "check",
            "--set",
            "redis.url=redis://127.0.0.1:1",
            "--set",
            &ca,
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not rediss://"), "{err}");
    let (code, _, err) = run(
        dir.path(),
        &["check", "--set", "redis.tls_ca_file=/nonexistent/ca.crt"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("redis.tls_ca_file") && err.contains("/nonexistent/ca.crt"),
        "{err}"
    );
    for (nodes, says) in [
        ("[\"unix:///run/s.sock\"]", "reached over TCP"),
        (
            "[\"redis://127.0.0.1:26379\", \"rediss://127.0.0.1:26380\"]",
            "mixes redis:// and rediss://",
        ),
        ("[]", "needs sentinel.nodes"),
    ] {
        let nodes = format!("sentinel.nodes={nodes}");
        let (code, _, err) = run(
            dir.path(),
            &["check", "--set", "sentinel.master=main", "--set", &nodes],
            &[],
        );
        assert_eq!(code, 2, "{nodes}: {err}");
        assert!(err.contains(says), "{nodes}: {err}");
    }
}

/// A master, its replica and one Sentinel watching them, on loopback ports.
struct Sentinel {
    _dir: tempfile::TempDir,
    ports: [u16; 2],
    servers: [Option<KillOnDrop>; 2],
    _sentinel: KillOnDrop,
    sentinel_port: u16,
}

impl Sentinel {
    fn start() -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let [first, second, sentinel_port] = free_ports();
        let ports = [first, second];
        let mut servers = [None, None];
        for (i, port) in ports.iter().enumerate() {
            let d = dir.path().join(format!("r{i}"));
            std::fs::create_dir(&d).unwrap();
            let mut args = redis_args(*port, &d);
            if i == 1 {
                args.extend([
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    ports[0].to_string(),
                ]);
            }
            servers[i] = Some(start_redis("redis-server", &args, &tcp(*port)));
        }
        eventually(WAIT, "the replica in sync", || {
            cli(&tcp(ports[1]), &["INFO", "replication"])
                .contains("master_link_status:up")
                .then_some(())
        });
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\nport {sentinel_port}\ndir {}\n\
                 sentinel monitor main 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds main 500\n\
                 sentinel failover-timeout main 5000\n",
                dir.path().display(),
                ports[0]
            ),
        )
        .unwrap();
        // redis-server in Sentinel mode: the same binary, no other package.
        let sentinel = start_redis(
            "redis-server",
            &[conf.display().to_string(), "--sentinel".to_string()],
            &tcp(sentinel_port),
        );
        let s = Sentinel {
            _dir: dir,
            ports,
            servers,
            _sentinel: sentinel,
            sentinel_port,
        };
        eventually(WAIT, "the sentinel to know the replica", || {
            s.sentinel(&["SENTINEL", "REPLICAS", "main"])
                .contains(&ports[1].to_string())
                .then_some(())
        });
        s
    }

    fn sentinel(&self, args: &[&str]) -> String {
        cli(&tcp(self.sentinel_port), args)
    }

    /// The master's port, as the Sentinel says.
    fn master(&self) -> u16 {
        let out = self.sentinel(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "main"]);
        out.lines()
            .nth(1)
            .unwrap_or("0")
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// The members of the lease set on the server at `port`.
    fn leases_on(&self, port: u16) -> Vec<String> {
        cli(&tcp(port), &["ZRANGE", "supervisor:leases", "0", "-1"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).unwrap();
        drop(self.servers[i].take());
    }
}

/// Whether a request held for a while takes its lease on the server at `port` (retried: a
/// worker still on a demoted master finds out on its next call). Only a new member counts:
/// leases whose release the failover cut off are still there, replicated.
fn leases_go_to(s: &Server, sentinel: &Sentinel, port: u16) {
    eventually(
        WAIT,
        &format!("a request's lease on the master at {port}"),
        || {
            let before = sentinel.leases_on(port);
            let held = hold(s, 400);
            let until = Instant::now() + Duration::from_millis(350);
            let mut seen = false;
            while !seen && Instant::now() < until {
                seen = sentinel.leases_on(port).iter().any(|m| !before.contains(m));
            }
            assert_eq!(held.join().unwrap().unwrap().status, 200);
            seen.then_some(())
        },
    );
}

/// Sends `GET /` one after the other until `done` says so (at most `WAIT`): each must succeed.
/// Returns the slowest one's time.
fn serve_until(s: &Server, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while !done() {
        assert!(started.elapsed() < WAIT, "gave up waiting");
        let one = Instant::now();
        let r = s.get("/");
        assert_eq!(r.status, 200, "{}", r.text());
        slowest = slowest.max(one.elapsed());
    }
    slowest
}

#[test]
fn through_sentinel_the_cluster_cap_follows_the_master_across_failovers() {
    let mut sentinel = Sentinel::start();
    let first = sentinel.ports[0];
    let second = sentinel.ports[1];
    let nodes = format!(
        "sentinel.nodes=[\"redis://127.0.0.1:{}\"]",
        sentinel.sentinel_port
    );
    let s = Server::start(&[
        "-w",
        "2",
        "--set",
        "sentinel.master=main",
        "--set",
        &nodes,
        "--set",
        "limits.cluster_max_concurrent_requests=5",
    ]);
    eventually(WAIT, "both workers connected", || all_connected(&s));
    leases_go_to(&s, &sentinel, first);

    // A failover on request: the old master stays up as a replica and answers writes with
    // READONLY; the workers go to the new one.
    assert_eq!(sentinel.sentinel(&["SENTINEL", "FAILOVER", "main"]), "OK");
    let slowest = serve_until(&s, || sentinel.master() == second);
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    leases_go_to(&s, &sentinel, second);
    eventually(WAIT, "both workers connected", || all_connected(&s));

    // The new master dies: Sentinel promotes the first one again; meanwhile requests are
    // served under local limits.
    eventually(WAIT, "the first server a replica in sync", || {
        cli(&tcp(first), &["INFO", "replication"])
            .contains("master_link_status:up")
            .then_some(())
    });
    sentinel.kill(second);
    let slowest = serve_until(&s, || sentinel.master() == first);
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    leases_go_to(&s, &sentinel, first);
    eventually(WAIT, "both workers connected", || all_connected(&s));
}

#[test]
fn a_server_demoted_to_replica_leaves_limits_local_until_it_is_master_again() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b] = free_ports();
    let _servers: Vec<KillOnDrop> = [a, b]
        .iter()
        .map(|port| {
            let d = dir.path().join(port.to_string());
            std::fs::create_dir(&d).unwrap();
            start_redis("redis-server", &redis_args(*port, &d), &tcp(*port))
        })
        .collect();
    let url = format!("redis.url=redis://127.0.0.1:{a}");
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        &url,
        "--set",
        "limits.cluster_max_concurrent_requests=5",
    ]);
    eventually(WAIT, "the worker connected", || all_connected(&s));

    // Now a replica: it still answers, but every lease it is asked for is READONLY.
    assert_eq!(
        cli(&tcp(a), &["REPLICAOF", "127.0.0.1", &b.to_string()]),
        "OK"
    );
    let slowest = serve_until(&s, || redis_states(&s) == ["degraded"]);
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("redis is not answering"))
        .expect("the breaker's warning");
    assert!(line.contains("read only replica"), "{line}");
    // Idle, the worker probes once a second, and each probe fails: no flapping back to
    // "connected" meanwhile (watched for a while, without requests).
    let since = Instant::now();
    while since.elapsed() < Duration::from_millis(3500) {
        assert_eq!(redis_states(&s), ["degraded"]);
    }
    assert_eq!(s.get("/").status, 200);
    assert!(!s.log.text().contains("redis answers again"));

    assert_eq!(cli(&tcp(a), &["REPLICAOF", "NO", "ONE"]), "OK");
    // Back without a request: the worker's own probe.
    eventually(WAIT, "the worker connected again", || all_connected(&s));
    let held = hold(&s, 1000);
    eventually(WAIT, "the request's lease in redis", || {
        (cli(&tcp(a), &["ZCARD", "supervisor:leases"]) == "1").then_some(())
    });
    assert_eq!(held.join().unwrap().unwrap().status, 200);
}
