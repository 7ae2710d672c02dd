//! What the test process has left behind: zombie children, open descriptors, process groups.

use std::fs;

fn stat_fields(pid: &str) -> Option<(char, u32, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: parse after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

fn all_pids() -> Vec<String> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default()
}

/// Zombie processes whose parent is this process.
pub fn zombie_children() -> usize {
    let me = std::process::id();
    all_pids()
        .iter()
        .filter_map(|p| stat_fields(p))
        .filter(|&(state, ppid, _)| state == 'Z' && ppid == me)
        .count()
}

/// Live (not zombie) processes in process group `pgid`.
pub fn live_in_group(pgid: u32) -> usize {
    all_pids()
        .iter()
        .filter_map(|p| stat_fields(p))
        .filter(|&(state, _, pgrp)| pgrp == pgid && state != 'Z')
        .count()
}

/// Descriptors this process has open.
pub fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Reads a pid a process writes into `path`, waiting up to `limit` for it to appear.
pub async fn read_pid_file(path: &str, limit: std::time::Duration) -> u32 {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(pid) = fs::read_to_string(path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} not written within {limit:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
