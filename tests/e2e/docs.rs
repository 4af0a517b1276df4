//! The man pages render without a single groff warning, and the shell completions are usable.

use std::process::Command;

use crate::util::{run, write_file};

const PAGES: [&str; 2] = ["man/supervisor.1", "man/supervisor.toml.5"];

/// `groff -man -ww -z -Tutf8 PAGE`: every warning enabled, output discarded. (tests/run installs
/// groff; a machine without it fails here rather than skipping the check.)
fn groff_warnings(page: &str) -> String {
    let out = Command::new("groff")
        .args(["-man", "-ww", "-z", "-Tutf8", page])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run groff (Debian package groff-base)");
    assert!(out.status.success(), "groff failed on {page}: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn man_pages_render_without_warnings() {
    for page in PAGES {
        let warnings = groff_warnings(page);
        assert!(warnings.is_empty(), "{page}:\n{warnings}");
    }
}

/// The check above would pass on a groff that ignores the page: a broken page must warn.
#[test]
fn groff_warns_about_a_broken_page() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("broken.1");
    std::fs::write(
        &page,
        ".TH X 1\n.SH NAME\nx \\- y\n.NOSUCHMACRO\n\\fBbold\n",
    )
    .unwrap();
    let warnings = groff_warnings(page.to_str().unwrap());
    assert!(warnings.contains("NOSUCHMACRO"), "{warnings}");
}

/// `supervisor completions SHELL` and its stdout, stderr and exit code.
fn completions(shell: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &["completions", shell], &[])
}

#[test]
fn bash_completion_script_is_valid_and_completes_commands_and_flags() {
    let (code, script, _) = completions("bash");
    assert_eq!(code, 0);
    for command in ["start", "check", "status", "completions"] {
        assert!(script.contains(command), "no {command} in:\n{script}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "supervisor.bash", &script);
    let file = file.to_str().unwrap();
    let syntax = Command::new("bash").args(["-n", file]).output().unwrap();
    assert!(syntax.status.success(), "bash -n: {syntax:?}");
    // Loaded the way bash-completion loads it, then asked what `supervisor st<TAB>` and
    // `supervisor start --lo<TAB>` complete to.
    let ask = format!(
        "source {file}
         COMP_WORDS=(supervisor st); COMP_CWORD=1; _supervisor supervisor st supervisor
         echo \"${{COMPREPLY[*]}}\"
         COMP_WORDS=(supervisor start --lo); COMP_CWORD=2; _supervisor supervisor --lo start
         echo \"${{COMPREPLY[*]}}\""
    );
    let out = Command::new("bash").args(["-c", &ask]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out, "start status stop\n--log-level\n");
}

#[test]
fn every_shell_gets_a_script_and_an_unknown_shell_is_a_usage_error() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, script, _) = completions(shell);
        assert_eq!(code, 0, "{shell}");
        assert!(script.contains("log-level"), "{shell}: {script}");
    }
    let (code, out, err) = completions("tcsh");
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("invalid value 'tcsh'"), "{err}");
    assert!(err.contains("bash, elvish, fish, powershell, zsh"), "{err}");
}
