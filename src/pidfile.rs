//! `server.pidfile`: the master's pid in a file, for init scripts and monitoring.
//!
//! Written once the listeners are bound, atomically (a temporary file in the same directory,
//! renamed over the path), and removed at exit only if it still holds our pid: after an upgrade
//! it belongs to the new master. A start refuses when the file names a live supervisor master,
//! and replaces it otherwise (a pid left by a crash, maybe reused by another program since).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tracing::warn;

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next()),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}

/// The pid in `path`, if it holds one.
pub fn read(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Fails if `path` names a running supervisor master other than us.
pub fn refuse_if_live(path: &Path) -> Result<()> {
    let Some(pid) = read(path) else {
        return Ok(());
    };
    if pid != std::process::id() && is_master(pid) {
        bail!(
            "the pidfile {} names a running supervisor master (pid {pid}); stop it first, or \
             give this instance its own server.pidfile",
            path.display()
        );
    }
    Ok(())
}

/// Whether `pid` runs this program's `start` (a master). Its executable is compared by name, so
/// that a master started from an older binary (since replaced on disk) still counts.
pub fn is_master(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if !args.iter().skip(1).any(|a| *a == b"start") {
        return false;
    }
    let name = |p: &Path| p.file_name().map(|n| n.to_os_string());
    let ours = std::env::current_exe().ok().and_then(|p| name(&p));
    let theirs = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| {
            // A replaced binary reads "/path/supervisor (deleted)".
            let s = p.to_string_lossy();
            PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s).to_string())
        })
        .or_else(|| {
            let argv0 = String::from_utf8_lossy(args.first()?).into_owned();
            Some(PathBuf::from(argv0))
        });
    ours.is_some() && ours == theirs.and_then(|p| name(&p))
}

/// Writes `pid` to `path`: a temporary file beside it, renamed over it.
pub fn write(path: &Path, pid: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("the pidfile {} is not a file path", path.display()))?;
    let temp = dir.join(format!(".{}.{pid}.tmp", name.to_string_lossy()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&temp)?;
        writeln!(f, "{pid}")?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e).with_context(|| format!("cannot write the pidfile {}", path.display()));
    }
    Ok(())
}

/// Removes `path` if it holds `pid`; says whether it did.
pub fn remove_if_ours(path: &Path, pid: u32) -> bool {
    if read(path) != Some(pid) {
        return false;
    }
    match std::fs::remove_file(path) {
        Ok(()) => true,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot remove the pidfile");
            false
        }
    }
}

/// The master's pidfile, removed on drop if still ours.
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    pub fn create(path: &Path) -> Result<PidFile> {
        let pid = std::process::id();
        write(path, pid)?;
        Ok(PidFile {
            path: path.to_path_buf(),
            pid,
        })
    }

    /// After a failed binary upgrade: the new master may have written its pid here before it
    /// died (and removed the file). Writes ours again if the file does not hold it; says whether
    /// it had to.
    pub fn restore(&self) -> Result<bool> {
        if read(&self.path) == Some(self.pid) {
            return Ok(false);
        }
        write(&self.path, self.pid)?;
        Ok(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        remove_if_ours(&self.path, self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_read_and_removed_only_when_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sv.pid");
        write(&path, 1234).unwrap();
        assert_eq!(read(&path), Some(1234));
        assert!(!remove_if_ours(&path, 99), "another's pid stays");
        assert!(path.exists());
        assert!(remove_if_ours(&path, 1234));
        assert!(!path.exists());
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_stale_or_foreign_pid_is_no_obstacle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sv.pid");
        refuse_if_live(&path).unwrap(); // none
        write(&path, 4_194_305).unwrap(); // above pid_max: nobody
        refuse_if_live(&path).unwrap();
        write(&path, 1).unwrap(); // init is no supervisor master
        refuse_if_live(&path).unwrap();
        std::fs::write(&path, "garbage").unwrap();
        refuse_if_live(&path).unwrap();
        let _guard = PidFile::create(&path).unwrap();
        assert_eq!(read(&path), Some(std::process::id()));
    }
}
