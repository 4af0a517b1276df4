//! Logging to a file: every process writes its log to stderr, and `log.file` makes stderr that
//! file. Reopening (USR1, after a log rotation) points stderr at a fresh open of the path, so
//! the logging code never needs to know where its output goes.

use std::fs::{File, OpenOptions};
use std::io;

/// Opens `path` for appending (creating it if needed) and makes it this process's stderr.
/// Lines from many processes interleave whole: each is one `write` to an `O_APPEND` file.
pub fn redirect_stderr(path: &str) -> io::Result<()> {
    let file = open_append(path, "log file")?;
    nix::unistd::dup2_stderr(&file).map_err(io::Error::from)
}

/// Opens `path` for appending, creating it if needed; an error names `what` and the path.
pub fn open_append(path: &str, what: &str) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {what} {path}: {e}")))
}
