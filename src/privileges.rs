//! The master's side of `server.user` / `server.group` (the workers drop privileges themselves,
//! see `worker::privileges`): refusing to start when the switch is impossible, keeping the
//! user/group fixed across reloads, and handing the user the log file that workers reopen.

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

/// With `log.file` and `server.user` both set, gives the open log file (this process's stderr)
/// to the user: workers reopen it by its path on USR1, as that user (nginx does the same with
/// its logs). The file this process has open, not the path, so that a file swapped in under
/// the name meanwhile is not the one that changes owner.
pub fn give_log_file(config: &Config) -> Result<(), String> {
    if config.log.file.is_empty() {
        return Ok(());
    }
    let Some(creds) = privileges::resolve(&config.server)? else {
        return Ok(());
    };
    std::os::unix::fs::fchown(
        std::io::stderr(),
        Some(creds.uid.as_raw()),
        Some(creds.gid.as_raw()),
    )
    .map_err(|e| {
        format!(
            "cannot give the log file {} to server.user = {:?}: {e}",
            config.log.file, creds.user
        )
    })
}

/// With `log.access_file` and `server.user` both set, gives the access log file (opened, and
/// created if need be, by the master) to the user: the workers open it by its path after they
/// switch to the user, at start and again on USR1.
pub fn give_access_file(config: &Config, file: &std::fs::File) -> Result<(), String> {
    let Some(creds) = privileges::resolve(&config.server)? else {
        return Ok(());
    };
    std::os::unix::fs::fchown(file, Some(creds.uid.as_raw()), Some(creds.gid.as_raw())).map_err(
        |e| {
            format!(
                "cannot give the access log {} to server.user = {:?}: {e}",
                config.log.access_file, creds.user
            )
        },
    )
}

/// Opens (creating it if need be) the access log file for `config`, if it has one, and gives it
/// to `server.user`: a bad path is then a clear error here rather than a worker crash loop.
pub fn prepare_access_file(config: &Config) -> Result<(), String> {
    if !config.log.access || config.log.access_file.is_empty() {
        return Ok(());
    }
    let file = worker::access_log::open(&config.log.access_file).map_err(|e| e.to_string())?;
    give_access_file(config, &file)
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
