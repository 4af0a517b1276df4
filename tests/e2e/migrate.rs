//! `supervisor migrate`: the seed's gunicorn setup (examples/fastapi with its gunicorn_config.py,
//! started as `gunicorn -c gunicorn_config.py main:app`), migrated, then started the way a PaaS
//! starts it; and the errors a gunicorn user can meet on the way.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;

use crate::util::{eventually, exchange, get, run, Server};

const FASTAPI: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fastapi");
/// The tests' virtualenv, which has the example's requirements (tests/requirements.txt).
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/.venv/bin/python");
const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A copy of the example's app and gunicorn configuration in a directory of the test's.
fn seed_app() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["main.py", "gunicorn_config.py"] {
        std::fs::copy(Path::new(FASTAPI).join(file), dir.path().join(file)).unwrap();
    }
    dir
}

#[test]
fn the_seeds_gunicorn_setup_migrates_and_serves_as_a_paas_starts_it() {
    let dir = seed_app();
    // The start command pasted as it is.
    let (code, _, err) = run(
        dir.path(),
        &[
            "migrate",
            "--python",
            PYTHON,
            "gunicorn",
            "-c",
            "gunicorn_config.py",
            "main:app",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("wrote supervisor.toml; start it with: supervisor start"),
        "{err}"
    );
    let toml = std::fs::read_to_string(dir.path().join("supervisor.toml")).unwrap();
    for carried in [
        "workers = \"auto\"",
        "request_timeout = \"120s\"",
        "max_requests = 1000",
        "graceful_timeout = \"120s\"",
        "hook worker_abort():",
    ] {
        assert!(toml.contains(carried), "{carried} in:\n{toml}");
    }
    // Started as Render starts it: PORT, WEB_CONCURRENCY and LOG_LEVEL in the environment.
    let s = Server::start_at_env(
        dir.path(),
        &[],
        &[
            ("PORT", "0"),
            ("WEB_CONCURRENCY", "2"),
            ("LOG_LEVEL", "warning"),
        ],
    );
    // PORT listens on every address (0.0.0.0); the test talks to loopback only.
    let addr = SocketAddr::from(([127, 0, 0, 1], s.addr.port()));
    assert!(s.addr.ip().is_unspecified(), "PORT's 0.0.0.0: {}", s.addr);
    let r = eventually(WAIT, "the app to answer", || {
        let r = get(addr, "/");
        (r.status == 200).then_some(r)
    });
    let body: Value = serde_json::from_str(&r.text()).expect("the app's JSON");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(
        s.status()["apps"].as_array().unwrap().len(),
        2,
        "WEB_CONCURRENCY app processes"
    );
    assert_eq!(get(addr, "/healthz").status, 200);
    // An exception in the app (a message body that is not JSON): its traceback is one event at
    // error level, whole, under LOG_LEVEL=warning.
    let session = exchange(
        addr,
        b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let sid: Value = serde_json::from_str(&session.text()).unwrap();
    let sid = sid["session"].as_str().expect("a session id").to_string();
    let bad = format!(
        "POST /sessions/{sid}/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 8\r\nConnection: close\r\n\r\nnot json"
    );
    assert_eq!(exchange(addr, bad.as_bytes()).unwrap().status, 500);
    let header = s
        .log
        .wait_for(WAIT, |l| l.contains("Exception in ASGI application"))
        .expect("the app's exception in the log");
    assert!(
        header.contains(" ERROR app{app.id="),
        "at error level: {header}"
    );
    // The event's lines follow its header; the next record starts with a timestamp. Wait for
    // the exception line that ends it.
    let event = eventually(WAIT, "the whole traceback", || {
        let lines = s.log.lines();
        let at = lines.iter().position(|l| *l == header)?;
        let rest: Vec<&String> = lines[at + 1..]
            .iter()
            .take_while(|l| !l.starts_with("20"))
            .collect();
        rest.iter()
            .any(|l| l.starts_with("json.decoder.JSONDecodeError"))
            .then(|| rest.iter().map(|l| l.to_string()).collect::<Vec<_>>())
    });
    assert!(
        event
            .iter()
            .any(|l| l == "Traceback (most recent call last):"),
        "{event:#?}"
    );
    // Once: no record of its own holds a piece of it.
    let split: Vec<String> = s
        .log
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("20") && (l.contains("Traceback") || l.contains("File \"")))
        .collect();
    assert!(split.is_empty(), "{split:#?}");
    // LOG_LEVEL=warning: none of supervisor's own info lines.
    let info: Vec<String> = s
        .log
        .lines()
        .into_iter()
        .filter(|l| l.contains(" INFO ") && !l.contains("app{app.id="))
        .collect();
    assert!(info.is_empty(), "{info:#?}");
}

#[test]
fn migrate_says_what_is_wrong_and_never_overwrites_unasked() {
    let dir = seed_app();
    let migrate = |extra: &[&str]| {
        let args = [&["migrate", "--python", PYTHON][..], extra].concat();
        run(dir.path(), &args, &[])
    };
    // No app named: nothing to run (exit 2).
    let (code, _, err) = migrate(&["-c", "gunicorn_config.py"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no app named"), "{err}");
    // A configuration that fails when run, and one that is not there.
    std::fs::write(dir.path().join("broken.py"), "workers = 1 / 0\n").unwrap();
    let (code, _, err) = migrate(&["-c", "broken.py", "main:app"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ZeroDivisionError"), "{err}");
    let (code, _, err) = migrate(&["-c", "nowhere.py", "main:app"]);
    assert_eq!((code, err.contains("nowhere.py")), (2, true), "{err}");
    // An existing file is kept unless --force; -o - prints.
    std::fs::write(dir.path().join("supervisor.toml"), "# mine\n").unwrap();
    let (code, _, err) = migrate(&["-c", "gunicorn_config.py", "main:app"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--force"), "{err}");
    let kept = std::fs::read_to_string(dir.path().join("supervisor.toml")).unwrap();
    assert_eq!(kept, "# mine\n");
    let (code, out, err) = migrate(&["-o", "-", "-c", "gunicorn_config.py", "main:app"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[app]"), "{out}");
    // Read with a Python that lacks the app server (the system's, without uvicorn): said.
    let has_uvicorn = std::process::Command::new("python3")
        .args(["-c", "import uvicorn"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    let args = [
        "migrate",
        "--python",
        "python3",
        "-o",
        "-",
        "-c",
        "gunicorn_config.py",
        "main:app",
    ];
    let (code, _, err) = run(dir.path(), &args, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err.contains("warning: uvicorn is not installed for "),
        !has_uvicorn,
        "{err}"
    );
    // A gunicorn configuration given to start: a pointer to migrate, not a TOML parse error.
    let (code, _, err) = run(dir.path(), &["check", "-c", "gunicorn_config.py"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("supervisor migrate -c gunicorn_config.py"),
        "{err}"
    );
}
