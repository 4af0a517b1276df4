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
