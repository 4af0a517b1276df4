//! The master's private runtime directory: where workers put their app sockets.
//!
//! `<base>/supervisor-<master pid>`, mode 0700, so that only the supervisor's user can reach an
//! app behind the worker's limits. The base is `server.runtime_dir`, else `$RUNTIME_DIRECTORY`
//! (systemd's `RuntimeDirectory=`), else `$XDG_RUNTIME_DIR`, else the system temporary
//! directory. Removed when the master exits.
//!
//! With `server.user`, workers and their apps run as that user, so their sockets go in a
//! subdirectory `apps` that the user owns (0700), and this directory becomes 0711: the user
//! may pass through it, nobody but root may list it or put anything else in it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use worker::config::ServerConfig;
use worker::privileges::Credentials;

/// The directory, removed (with what is left in it) on drop.
pub struct RuntimeDir {
    path: PathBuf,
    /// The `apps` subdirectory owned by `server.user`, when set.
    apps: Option<PathBuf>,
}

impl RuntimeDir {
    pub fn create(configured: &str) -> Result<RuntimeDir> {
        let base = base(configured);
        remove_stale(&base);
        let path = base.join(format!("supervisor-{}", std::process::id()));
        // A directory of that name belongs to a dead process that had our pid.
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove the stale {}", path.display()))?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create the runtime directory {}", path.display()))?;
        // The umask may have taken bits off; make it exact.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        Ok(RuntimeDir { path, apps: None })
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

/// Removes the directories of masters that are gone without cleaning up (`kill -9`, a crash):
/// `supervisor-PID` where no process PID exists. Others' directories are left alone (they are
/// not ours to remove, and removing fails anyway).
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let me = nix::unistd::getuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("supervisor-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && !crate::pidfile::alive(pid) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::debug!(path = %entry.path().display(), "removed a stale runtime directory")
                }
                Err(e) => {
                    tracing::debug!(path = %entry.path().display(), error = %e, "cannot remove a stale runtime directory")
                }
            }
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
