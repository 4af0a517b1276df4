//! The master's private runtime directory: where workers put their app sockets.
//!
//! `<base>/supervisor-<master pid>`, mode 0700, so that only the supervisor's user can reach an
//! app behind the worker's limits. The base is `server.runtime_dir`, else `$RUNTIME_DIRECTORY`
//! (systemd's `RuntimeDirectory=`), else `$XDG_RUNTIME_DIR`, else the system temporary
//! directory. Removed when the master exits.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The directory, removed (with what is left in it) on drop.
pub struct RuntimeDir {
    path: PathBuf,
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
        Ok(RuntimeDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
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
        let ours = entry.metadata().is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.is_dir() && m.uid() == me
        });
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
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
    chosen_base(configured).unwrap_or_else(std::env::temp_dir)
}

/// `server.runtime_dir`, else `$RUNTIME_DIRECTORY`, else `$XDG_RUNTIME_DIR`; `None` when none
/// is set. Shared with the control socket's default location (`control::Location`).
pub(crate) fn chosen_base(configured: &str) -> Option<PathBuf> {
    if !configured.is_empty() {
        return Some(PathBuf::from(configured));
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
                return Some(PathBuf::from(first));
            }
        }
    }
    None
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
