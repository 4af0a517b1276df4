//! man/supervisor.1 is written by hand; these tests keep it from drifting from the code. Every
//! flag of every visible command, every signal the master acts on and every exit status is
//! described, and every flag the page describes exists. (The keys are checked against
//! man/supervisor.toml.5 and supervisor.toml in `config`.) Rendering without warnings is an
//! end-to-end test, since it runs groff.

use std::collections::BTreeSet;

use clap::CommandFactory;
use nix::sys::signal::Signal;

use crate::cli::Cli;

const MAN_1: &str = include_str!("../man/supervisor.1");

/// The body of `.SH NAME` (up to the next `.SH`).
fn section<'a>(page: &'a str, name: &str) -> &'a str {
    let header = format!("\n.SH {name}\n");
    let start = page
        .find(&header)
        .unwrap_or_else(|| panic!("man/supervisor.1 has no section {name}"))
        + header.len();
    let rest = &page[start..];
    &rest[..rest.find("\n.SH ").unwrap_or(rest.len())]
}

/// The long flags a text names, `\-\-log\-level` read as `--log-level` (without the dashes).
fn long_flags(text: &str) -> BTreeSet<String> {
    let plain = text.replace("\\-", "-");
    plain
        .split("--")
        .skip(1)
        .map(|after| {
            after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// Every long flag of the command line: global ones (`--help`, `--version`) and those of each
/// visible command.
fn real_long_flags() -> BTreeSet<String> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut flags: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        flags.extend(
            sub.get_arguments()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long().map(str::to_string)),
        );
    }
    flags
}

#[test]
fn every_flag_is_described_and_every_described_flag_exists() {
    let real = real_long_flags();
    assert!(real.contains("help") && real.contains("version") && real.contains("set"));
    let options = section(MAN_1, "OPTIONS");
    let described = long_flags(options);
    for flag in &real {
        assert!(
            described.contains(flag),
            "man/supervisor.1 OPTIONS lacks --{flag}"
        );
    }
    let synopsis = section(MAN_1, "SYNOPSIS");
    for flag in described.iter().chain(&long_flags(synopsis)) {
        assert!(
            real.contains(flag),
            "man/supervisor.1 describes --{flag}, which no command has"
        );
    }
}

#[test]
fn every_handled_signal_is_described() {
    let signals = section(MAN_1, "SIGNALS");
    for sig in crate::master::HANDLED_SIGNALS {
        let name = Signal::try_from(sig).unwrap().as_str();
        let name = name.trim_start_matches("SIG");
        // An item header: `.B TERM`, or `.BR INT ", " QUIT` for several.
        let described = signals.lines().filter(|l| l.starts_with(".B")).any(|l| {
            l.split(|c: char| !c.is_ascii_alphanumeric())
                .any(|word| word == name)
        });
        assert!(described, "man/supervisor.1 SIGNALS lacks {name}");
    }
}

/// `(name, value)` of every `const EXIT_...: u8 = N;` in the binary's sources and the worker
/// library's root: read from the files, so that a code added anywhere there is checked too.
fn exit_constants() -> Vec<(String, u8)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files: Vec<_> = std::fs::read_dir(format!("{root}/src"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    // The worker's exit statuses are part of the protocol with its master.
    files.push(format!("{root}/worker/src/protocol.rs").into());
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines() {
            let line = line.trim_start().trim_start_matches("pub ");
            let Some(rest) = line.strip_prefix("const EXIT_") else {
                continue;
            };
            // Exit statuses are u8 (`EXIT_NOW` in the protocol is a signal, not one).
            let Some((name, value)) = rest.split_once(": u8 = ") else {
                continue;
            };
            let value = value.trim_end_matches(';').parse().unwrap();
            found.push((format!("EXIT_{name}"), value));
        }
    }
    found
}

#[test]
fn every_exit_status_is_described() {
    let codes = exit_constants();
    let names: Vec<&str> = codes.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "EXIT_FAILURE",
        "EXIT_CONFIG",
        "EXIT_STARTUP",
        "EXIT_MASTER_GONE",
    ] {
        assert!(names.contains(&expected), "{expected} not found: {names:?}");
    }
    assert_eq!(crate::EXIT_CONFIG, 2);
    assert_eq!(worker::EXIT_STARTUP, 70);
    let exit = section(MAN_1, "EXIT STATUS");
    for (name, code) in codes
        .iter()
        .map(|(n, c)| (n.as_str(), *c))
        .chain([("0", 0)])
    {
        assert!(
            exit.lines().any(|l| l == format!(".B {code}")),
            "man/supervisor.1 EXIT STATUS lacks {code} ({name})"
        );
    }
}

#[test]
fn the_readers_of_this_module_work() {
    assert_eq!(
        long_flags(".BR \\-\\-log\\-level \" \" \\fILEVEL\\fR, \\-\\- cmd, --json."),
        BTreeSet::from(["log-level".to_string(), "json".to_string()])
    );
    assert!(section(MAN_1, "SIGNALS").contains(".B HUP"));
    assert!(!section(MAN_1, "SIGNALS").contains(".SH"));
}
