//! Memory of a worker: the resident set of its process and of every descendant (its app, and
//! whatever that app starts), read from /proc.
//!
//! Hand-written rather than through a process-listing crate: those refresh every process on the
//! host to answer a question about a handful, once a second per worker. Here it is two small
//! reads per process: `task/*/children` to walk the tree, `statm` for the resident pages.

use std::fs;

/// Resident bytes of `pid` and all its descendants; 0 if `pid` is gone.
pub fn tree_rss(pid: u32) -> u64 {
    let page = page_size();
    let mut total = 0;
    let mut stack = vec![pid];
    // Bounded walk: a pid reused mid-walk could at worst add a stranger's memory once.
    let mut visited = 0;
    while let Some(p) = stack.pop() {
        visited += 1;
        if visited > 10_000 {
            break;
        }
        total += resident_pages(p) * page;
        stack.extend(children(p));
    }
    total
}

fn resident_pages(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_counts_its_children() {
        let me = std::process::id();
        let alone = tree_rss(me);
        assert!(
            alone > 1 << 20,
            "this test process uses more than 1 MiB: {alone}"
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // The child's pages are counted once it exists (bounded: it is resident at once).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while resident_pages(pid) == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(children(me).contains(&pid));
        assert!(tree_rss(pid) > 0);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(tree_rss(pid), 0, "a reaped process has no memory");
    }
}
