//! The master's private runtime directory: where workers put their app sockets.
//!
//! `<base>/supervisor-<master pid>`, mode 0700, so that only the supervisor's user can reach an
//! app behind the worker's limits. The base is `server.runtime_dir`, else `$RUNTIME_DIRECTORY`
//! (systemd's `RuntimeDirectory=`), else `$XDG_RUNTIME_DIR`, else the system temporary
//! directory. Removed when the master exits.
//!
//! Ownership is a lock, not a pid: the master holds an exclusive `flock` on `<dir>/.lock` for
//! its whole life (close-on-exec, so no worker, app or upgraded master holds it too), and a
//! master starting up removes only the directories whose lock it can take, that is, whose
//! master is gone (`kill -9`, a crash). A pid would not do: a master in another pid namespace
//! sharing the base (two containers sharing `/tmp`, both pid 1) has pids that mean nothing
//! here, and the same name; a locked directory of our name makes us take `supervisor-<pid>-<n>`.
//! Directories without a lock file (older versions, or one being made this instant) fall back
//! to the pid test; the maker checks, once it holds its lock, that its directory is still the
//! one at that path, and starts again if a sweep took it meanwhile.
//!
//! With `server.user`, workers and their apps run as that user, so their sockets go in a
//! subdirectory `apps` that the user owns (0700), and this directory becomes 0711: the user
//! may pass through it, nobody but root may list it or put anything else in it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use worker::config::ServerConfig;
use worker::privileges::Credentials;

/// The file whose lock says the directory's master is alive.
const LOCK_FILE: &str = ".lock";

/// How many times `create` starts over (a name taken, a sweep removing the directory it just
/// made) before giving up.
const CREATE_ATTEMPTS: u32 = 32;

/// The directory, removed (with what is left in it) on drop.
pub struct RuntimeDir {
    path: PathBuf,
    /// The `apps` subdirectory owned by `server.user`, when set.
    apps: Option<PathBuf>,
    /// Held until the directory is removed (`Drop` runs before the fields are dropped).
    _lock: Flock<File>,
}

impl RuntimeDir {
    pub fn create(configured: &str) -> Result<RuntimeDir> {
        let base = base(configured);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .with_context(|| format!("cannot create the runtime directory {}", base.display()))?;
        remove_stale(&base);
        let pid = std::process::id();
        let mut suffix = 0u32;
        for _ in 0..CREATE_ATTEMPTS {
            let name = match suffix {
                0 => format!("supervisor-{pid}"),
                n => format!("supervisor-{pid}-{n}"),
            };
            let path = base.join(name);
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {}
                // A live master's (another pid namespace's, or one whose lock file is not
                // there yet): never ours to take.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    suffix += 1;
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot create the runtime directory {}", path.display())
                    })
                }
            }
            let Some(lock) = lock_new(&path)? else {
                // Another master's sweep removed it before we held its lock: start again.
                continue;
            };
            // The umask may have taken bits off; make it exact.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
            return Ok(RuntimeDir {
                path,
                apps: None,
                _lock: lock,
            });
        }
        bail!(
            "cannot create a runtime directory in {}: {CREATE_ATTEMPTS} attempts found the name \
             taken or the directory removed by another master",
            base.display()
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where workers put their apps' sockets.
    pub fn apps(&self) -> &Path {
        self.apps.as_deref().unwrap_or(self.path())
    }

    /// Makes the `apps` subdirectory for `server.user`, if set (see the module's comment).
    pub fn share_with(&mut self, server: &ServerConfig) -> Result<()> {
        let creds = worker::privileges::resolve(server).map_err(anyhow::Error::msg)?;
        match creds {
            Some(creds) if !creds.uid.is_root() => self.share_with_creds(&creds),
            _ => Ok(()),
        }
    }

    fn share_with_creds(&mut self, creds: &Credentials) -> Result<()> {
        let apps = self.path.join("apps");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&apps)
            .with_context(|| format!("cannot create {}", apps.display()))?;
        std::os::unix::fs::chown(&apps, Some(creds.uid.as_raw()), Some(creds.gid.as_raw()))
            .with_context(|| {
                format!(
                    "cannot give {} to server.user = {:?}",
                    apps.display(),
                    creds.user
                )
            })?;
        std::fs::set_permissions(&apps, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", apps.display()))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("cannot set the mode of {}", self.path.display()))?;
        reachable_by(&self.path, creds)?;
        self.apps = Some(apps);
        Ok(())
    }
}

/// Checks that `creds` may pass through `dir` and every directory above it, from the mode bits
/// (ACLs are not read): otherwise the apps could not create their sockets, and every worker
/// would fail to boot with a less direct message.
fn reachable_by(dir: &Path, creds: &Credentials) -> Result<()> {
    let real =
        std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    for ancestor in real.ancestors() {
        let meta = std::fs::metadata(ancestor)
            .with_context(|| format!("cannot stat {}", ancestor.display()))?;
        let search = if meta.uid() == creds.uid.as_raw() {
            0o100
        } else if creds.groups.iter().any(|g| g.as_raw() == meta.gid()) {
            0o010
        } else {
            0o001
        };
        if meta.mode() & search == 0 {
            bail!(
                "server.user = {:?} cannot reach the runtime directory {}: {} (owner uid {}, \
                 gid {}, mode {:o}) does not let it through; set server.runtime_dir to a \
                 directory it can reach, like /run/supervisor",
                creds.user,
                dir.display(),
                ancestor.display(),
                meta.uid(),
                meta.gid(),
                meta.mode() & 0o7777
            );
        }
    }
    Ok(())
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the runtime directory");
            }
        }
    }
}

/// Makes the lock file in the new directory `dir` and locks it. `None` when a sweep removed
/// `dir` before the lock was held (the lock then belongs to a file no longer there).
fn lock_new(dir: &Path) -> Result<Option<Flock<File>>> {
    let path = dir.join(LOCK_FILE);
    // Close-on-exec (std's default): workers, apps and an upgraded master must not share it.
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    // Blocking: a sweep that took it first holds it only while it removes the directory.
    let lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::from(e))
        .with_context(|| format!("cannot lock {}", path.display()))?;
    let held = lock
        .metadata()
        .context("cannot stat the runtime directory's lock")?;
    let still_there =
        std::fs::metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == (held.dev(), held.ino()));
    Ok(still_there.then_some(lock))
}

/// Whether `name` is one `create` makes: `supervisor-PID` or `supervisor-PID-N`; the PID.
fn runtime_dir_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("supervisor-")?;
    let (pid, n) = match rest.split_once('-') {
        Some((pid, n)) => (pid, Some(n)),
        None => (rest, None),
    };
    if n.is_some_and(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    pid.parse().ok()
}

/// Removes the directories of masters that are gone without cleaning up (`kill -9`, a crash):
/// those whose lock is free (see the module's comment). Others' directories are left alone
/// (they are not ours to remove, and removing fails anyway).
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let me = nix::unistd::getuid().as_raw();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(runtime_dir_pid) else {
            continue;
        };
        // Not following a symlink: the entry itself must be our directory.
        let ours = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
        if !ours {
            continue;
        }
        let dir = entry.path();
        match File::open(dir.join(LOCK_FILE)) {
            Ok(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                // Its master is gone; the lock is held while removing, so that a master
                // making a directory of that name meanwhile waits and then sees it gone.
                Ok(_lock) => remove(&dir),
                Err((_, Errno::EWOULDBLOCK)) => {}
                Err((_, e)) => {
                    tracing::debug!(path = %dir.display(), error = %e, "cannot lock a runtime directory; leaving it")
                }
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if !crate::pidfile::alive(pid) {
                    remove(&dir);
                }
            }
            Err(e) => {
                tracing::debug!(path = %dir.display(), error = %e, "cannot open a runtime directory's lock; leaving it")
            }
        }
    }
}

fn remove(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tracing::debug!(path = %dir.display(), "removed a stale runtime directory"),
        Err(e) => {
            tracing::debug!(path = %dir.display(), error = %e, "cannot remove a stale runtime directory")
        }
    }
}

fn base(configured: &str) -> PathBuf {
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    for var in ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"] {
        if let Some(v) = std::env::var_os(var) {
            // systemd may list several, separated by ':'; the first is ours.
            let first = v
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            if first.starts_with('/') {
                return PathBuf::from(first);
            }
        }
    }
    std::env::temp_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_of_dead_masters_are_cleaned_up() {
        let base = tempfile::tempdir().unwrap();
        // No process has pid 2^22 + 1 (above Linux's pid_max limit).
        let dead = base.path().join("supervisor-4194305");
        let live = base
            .path()
            .join(format!("supervisor-{}", std::process::id()));
        let other = base.path().join("something-else");
        for d in [&dead, &other] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(dead.join("app-1-2.sock"), b"").unwrap();
        let dir = RuntimeDir::create(base.path().to_str().unwrap()).unwrap();
        assert_eq!(dir.path(), live);
        assert!(!dead.exists(), "a dead master's directory is removed");
        assert!(other.exists(), "unrelated directories stay");
    }

    #[test]
    fn a_locked_directory_of_our_name_is_left_to_its_master() {
        // Another pid namespace's master with our pid, alive: we take the next name.
        let base = tempfile::tempdir().unwrap();
        let taken = base
            .path()
            .join(format!("supervisor-{}", std::process::id()));
        std::fs::create_dir(&taken).unwrap();
        let _held = Flock::lock(
            File::create(taken.join(LOCK_FILE)).unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        let dir = RuntimeDir::create(base.path().to_str().unwrap()).unwrap();
        assert_eq!(
            dir.path(),
            base.path()
                .join(format!("supervisor-{}-1", std::process::id()))
        );
        assert!(taken.join(LOCK_FILE).exists());
        // Ours is locked in turn: a second master leaves it alone too.
        let again = RuntimeDir::create(base.path().to_str().unwrap()).unwrap();
        assert!(dir.path().exists());
        assert_eq!(
            again.path(),
            base.path()
                .join(format!("supervisor-{}-2", std::process::id()))
        );
        drop(dir);
        drop(again);
        assert!(taken.exists());
    }

    #[test]
    fn runtime_directory_names() {
        assert_eq!(runtime_dir_pid("supervisor-12"), Some(12));
        assert_eq!(runtime_dir_pid("supervisor-12-3"), Some(12));
        for other in [
            "supervisor-12-",
            "supervisor-12-x",
            "supervisor-x",
            "supervisor-ab.sock",
        ] {
            assert_eq!(runtime_dir_pid(other), None, "{other}");
        }
    }

    fn nobody() -> Credentials {
        Credentials {
            user: "nobody".to_string(),
            uid: nix::unistd::Uid::from_raw(65534),
            gid: nix::unistd::Gid::from_raw(65534),
            groups: vec![nix::unistd::Gid::from_raw(65534)],
        }
    }

    #[test]
    fn apps_get_a_directory_of_their_users_own() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root, to give a directory to another user");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut dir = RuntimeDir::create(base.path().to_str().unwrap()).unwrap();
        assert_eq!(
            dir.apps(),
            dir.path(),
            "without a user, apps share the directory"
        );
        dir.share_with_creds(&nobody()).unwrap();
        let apps = std::fs::metadata(dir.apps()).unwrap();
        assert_eq!(dir.apps(), dir.path().join("apps"));
        assert_eq!(
            (apps.uid(), apps.gid(), apps.mode() & 0o777),
            (65534, 65534, 0o700)
        );
        let top = std::fs::metadata(dir.path()).unwrap();
        assert_eq!((top.uid(), top.mode() & 0o777), (0, 0o711));
    }

    #[test]
    fn a_runtime_directory_the_user_cannot_reach_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root, to give a directory to another user");
            return;
        }
        // No way through for anyone but root.
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut dir = RuntimeDir::create(base.path().to_str().unwrap()).unwrap();
        let e = dir.share_with_creds(&nobody()).unwrap_err().to_string();
        assert!(
            e.contains("cannot reach the runtime directory")
                && e.contains(&format!("{} (owner uid 0", base.path().display()))
                && e.contains("mode 700"),
            "{e}"
        );
    }

    #[test]
    fn private_and_removed_on_drop() {
        let base = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::create(base.path().to_str().unwrap()).unwrap();
        let path = dir.path().to_path_buf();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(path.join("app.sock"), b"").unwrap();
        drop(dir);
        assert!(!path.exists());
    }
}
