//! `server.user` and `server.group`: who the workers and their apps run as. The master stays
//! root (it binds new ports on reload and signals workers); each worker drops root's privileges
//! itself, early in its startup.
//!
//! Why in the worker and not between fork and exec: finding the user's groups reads the user
//! and group databases (NSS: files, but maybe LDAP or sssd), which is not async-signal-safe, so
//! it cannot run in a forked child; the worker is a freshly exec'd, single-purpose process where
//! it can, and it can say precisely what failed in its log. It drops after the work that needs
//! root (mapping the scoreboard, reading Redis's TLS files, which may be readable by root only)
//! and before it serves a request or starts its app, so nothing that handles a request ever
//! runs as root. The drop is checked, not assumed: the real and effective ids must be the
//! user's and `setuid(0)` must fail afterwards.
//!
//! Lookups are also used by the master, to refuse an unknown user or group as a configuration
//! error before anything starts.

use std::ffi::CString;

use nix::unistd::{self, Gid, Group, Uid, User};

use crate::config::ServerConfig;

/// Who a worker runs as, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// `server.user` as written, for messages.
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Every group the worker is in: the user's supplementary groups from the group database
    /// and `gid`.
    pub groups: Vec<Gid>,
}

/// A user by name, else by number. `Ok(None)` for a number with no entry in the user database
/// (allowed: containers often run arbitrary uids), `Err` for a name that does not exist.
fn find_user(text: &str) -> Result<Option<User>, String> {
    match User::from_name(text) {
        Ok(Some(user)) => return Ok(Some(user)),
        Ok(None) => {}
        Err(e) => return Err(format!("cannot look up user {text:?}: {e}")),
    }
    match text.parse::<u32>() {
        Ok(uid) => {
            User::from_uid(Uid::from_raw(uid)).map_err(|e| format!("cannot look up uid {uid}: {e}"))
        }
        Err(_) => Err(format!("no user named {text:?}")),
    }
}

/// A group by name, else by number (which need not have an entry).
fn find_group(text: &str) -> Result<Gid, String> {
    match Group::from_name(text) {
        Ok(Some(group)) => return Ok(group.gid),
        Ok(None) => {}
        Err(e) => return Err(format!("cannot look up group {text:?}: {e}")),
    }
    text.parse::<u32>()
        .map(Gid::from_raw)
        .map_err(|_| format!("no group named {text:?}"))
}

/// `server.user` on its own: empty, an existing user's name, or a number.
pub fn check_user(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Ok(());
    }
    find_user(text).map(|_| ())
}

/// `server.group` on its own: empty, an existing group's name, or a number.
pub fn check_group(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Ok(());
    }
    find_group(text).map(|_| ())
}

/// Who workers run as: `None` when `server.user` is empty (they run as the master does).
/// An empty `server.group` means the user's primary group.
pub fn resolve(server: &ServerConfig) -> Result<Option<Credentials>, String> {
    if server.user.is_empty() {
        if !server.group.is_empty() {
            return Err(format!(
                "server.group = {:?} needs server.user: name the user too",
                server.group
            ));
        }
        return Ok(None);
    }
    let user = find_user(&server.user).map_err(|e| format!("server.user: {e}"))?;
    let uid = match &user {
        Some(u) => u.uid,
        None => Uid::from_raw(server.user.parse().expect("find_user accepted a number")),
    };
    let gid = match (&user, server.group.as_str()) {
        (_, group) if !group.is_empty() => {
            find_group(group).map_err(|e| format!("server.group: {e}"))?
        }
        (Some(u), _) => u.gid,
        (None, _) => {
            return Err(format!(
                "server.user = {:?} has no entry in the user database, so no primary group: \
                 set server.group",
                server.user
            ))
        }
    };
    let mut groups = match &user {
        Some(u) => {
            let name = CString::new(u.name.as_str())
                .map_err(|_| format!("server.user: the name {:?} contains NUL", u.name))?;
            unistd::getgrouplist(&name, gid)
                .map_err(|e| format!("cannot list the groups of user {:?}: {e}", u.name))?
        }
        None => vec![gid],
    };
    groups.sort_unstable_by_key(|g| g.as_raw());
    groups.dedup();
    Ok(Some(Credentials {
        user: server.user.clone(),
        uid,
        gid,
        groups,
    }))
}

/// Whether this process can run workers as `creds`: it is root, or already that user and group.
pub fn can_switch_to(creds: &Credentials) -> Result<(), String> {
    let (euid, egid) = (unistd::geteuid(), unistd::getegid());
    if euid.is_root() || (euid == creds.uid && egid == creds.gid) {
        return Ok(());
    }
    Err(format!(
        "server.user = {:?} (uid {}, gid {}) needs supervisor to start as root, to switch the \
         workers to it; it runs as uid {euid}, gid {egid}",
        creds.user, creds.uid, creds.gid
    ))
}

/// Makes this process (a worker) run as `server.user`/`server.group`, if set: supplementary
/// groups, then the group, then the user (the other order would leave no right to change the
/// groups), then checks that it took and cannot be undone. Changing ids clears
/// `PR_SET_PDEATHSIG`, so it is set again, and the parent checked, as at the spawn.
pub fn drop_privileges(server: &ServerConfig, master_pid: u32) -> Result<(), String> {
    let Some(creds) = resolve(server)? else {
        return Ok(());
    };
    let fail = |step: &str, e: nix::Error| {
        format!(
            "cannot switch to server.user = {:?} (uid {}, gid {}): {step}: {e}",
            creds.user, creds.uid, creds.gid
        )
    };
    if unistd::geteuid().is_root() {
        unistd::setgroups(&creds.groups).map_err(|e| fail("setgroups", e))?;
        unistd::setgid(creds.gid).map_err(|e| fail("setgid", e))?;
        unistd::setuid(creds.uid).map_err(|e| fail("setuid", e))?;
    } else {
        // The master checked that it already is that user (`can_switch_to`); nothing to drop.
        can_switch_to(&creds)?;
    }
    let now = (
        unistd::getuid(),
        unistd::geteuid(),
        unistd::getgid(),
        unistd::getegid(),
    );
    if now != (creds.uid, creds.uid, creds.gid, creds.gid) {
        return Err(format!(
            "switched to server.user = {:?}, but runs as uid {}/{} gid {}/{} (real/effective) \
             instead of {}:{}",
            creds.user, now.0, now.1, now.2, now.3, creds.uid, creds.gid
        ));
    }
    if !creds.uid.is_root() && unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(format!(
            "switched to server.user = {:?}, but could switch back to root",
            creds.user
        ));
    }
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("cannot set the parent-death signal again: {e}"))?;
    if unistd::getppid().as_raw() as u32 != master_pid {
        return Err("the master is gone".to_string());
    }
    tracing::debug!(user = %creds.user, uid = %creds.uid, gid = %creds.gid, "running as server.user");
    Ok(())
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
    fn names_and_numbers_resolve() {
        // root and its group exist on every Linux system, as uid and gid 0.
        let creds = resolve(&server("root", "")).unwrap().unwrap();
        assert_eq!((creds.uid.as_raw(), creds.gid.as_raw()), (0, 0));
        assert!(creds.groups.contains(&Gid::from_raw(0)));
        let creds = resolve(&server("0", "0")).unwrap().unwrap();
        assert_eq!((creds.uid.as_raw(), creds.gid.as_raw()), (0, 0));
        // A uid without an entry works with an explicit group, and is then in that group only.
        let creds = resolve(&server("4000000", "4000001")).unwrap().unwrap();
        assert_eq!(creds.uid.as_raw(), 4_000_000);
        assert_eq!(creds.groups, [Gid::from_raw(4_000_001)]);
        assert_eq!(resolve(&server("", "")), Ok(None));
    }

    #[test]
    fn unknown_or_incomplete_is_an_error_naming_the_key() {
        let e = resolve(&server("no-such-user-here", "")).unwrap_err();
        assert!(
            e.contains("server.user") && e.contains("no-such-user-here"),
            "{e}"
        );
        let e = resolve(&server("root", "no-such-group-here")).unwrap_err();
        assert!(
            e.contains("server.group") && e.contains("no-such-group-here"),
            "{e}"
        );
        let e = resolve(&server("", "root")).unwrap_err();
        assert!(e.contains("needs server.user"), "{e}");
        let e = resolve(&server("4000000", "")).unwrap_err();
        assert!(e.contains("set server.group"), "{e}");
        assert!(check_user("no-such-user-here").is_err());
        assert!(check_group("no-such-group-here").is_err());
        assert!(check_user("").is_ok() && check_group("12345").is_ok());
    }
}
