//! The master's side of `server.user` / `server.group` (the workers drop privileges themselves,
//! see `worker::privileges`): refusing to start when the switch is impossible, keeping the
//! user/group fixed across reloads, and handing the user the log files that workers open.

use worker::config::{Config, ServerConfig};
use worker::privileges::{self, Credentials};

/// Who workers will run as, or why they cannot: the master must be root (or already them).
pub fn check_start(config: &Config) -> Result<Option<Credentials>, String> {
    let Some(creds) = privileges::resolve(&config.server)? else {
        return Ok(None);
    };
    privileges::can_switch_to(&creds)?;
    Ok(Some(creds))
}

/// A reload keeps the user and group: the runtime directory and the log file were handed to
/// them at start, and workers of the old and the new user would overlap during the surge.
pub fn check_reload(started: &ServerConfig, new: &ServerConfig) -> Result<(), String> {
    if (&started.user, &started.group) == (&new.user, &new.group) {
        return Ok(());
    }
    Err(format!(
        "server.user/server.group changed from {:?}/{:?} to {:?}/{:?}: that takes a restart",
        started.user, started.group, new.user, new.group
    ))
}

/// `log.file`: makes it this process's stderr (which the workers inherit) and, with
/// `server.user`, gives it to the user: workers reopen it by its path on USR1, as that user
/// (nginx does the same with its logs).
pub fn log_to_file(config: &Config) -> Result<(), String> {
    worker::logfile::redirect_stderr(&config.log.file).map_err(|e| e.to_string())?;
    give(config, &config.log.file, std::io::stderr())
}

/// With `log.access_file`: opens it (creating it if need be), so that a bad path is a clear
/// error here rather than a worker crash loop, and gives it to `server.user`, as whom the
/// workers open it by its path, at start and again on USR1.
pub fn prepare_access_file(config: &Config) -> Result<(), String> {
    if !config.log.access || config.log.access_file.is_empty() {
        return Ok(());
    }
    let file = worker::access_log::open(&config.log.access_file).map_err(|e| e.to_string())?;
    give(config, &config.log.access_file, &file)
}

/// Gives the open `file` (at `path`) to `server.user`, if set. The file this process has open,
/// not the path, so that a file swapped in under the name meanwhile is not the one that changes
/// owner.
fn give(config: &Config, path: &str, file: impl std::os::fd::AsFd) -> Result<(), String> {
    let Some(creds) = privileges::resolve(&config.server)? else {
        return Ok(());
    };
    std::os::unix::fs::fchown(file, Some(creds.uid.as_raw()), Some(creds.gid.as_raw()))
        .map_err(|e| format!("cannot give {path} to server.user = {:?}: {e}", creds.user))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(user: &str, group: &str) -> ServerConfig {
        ServerConfig {
            user: user.to_string(),
            group: group.to_string(),
            ..ServerConfig::default()
        }
    }

    #[test]
    fn a_reload_keeps_the_user_and_group() {
        assert!(check_reload(&server("nobody", ""), &server("nobody", "")).is_ok());
        let e = check_reload(&server("nobody", ""), &server("daemon", "")).unwrap_err();
        assert!(e.contains("takes a restart") && e.contains("daemon"), "{e}");
        assert!(check_reload(&server("", ""), &server("nobody", "")).is_err());
        assert!(check_reload(&server("nobody", ""), &server("nobody", "nogroup")).is_err());
    }
}
