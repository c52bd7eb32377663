//! Finding cgroups: the cgroup2 mount, the attach point, and the cgroups that belong to a pod.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::CaptureError;

/// The cgroup2 mount point, read from /proc/mounts (it is /sys/fs/cgroup on unified hosts and
/// /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CaptureError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|e| CaptureError::Cgroup {
        path: "/proc/mounts".into(),
        reason: e.to_string(),
    })?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or(CaptureError::NoCgroup2)
}

/// Resolves the configured attach cgroup: an absolute path inside the cgroup2 mount, or a path
/// relative to it.
pub fn resolve(cgroup: &Path) -> Result<PathBuf, CaptureError> {
    let path = if cgroup.is_absolute() { cgroup.to_path_buf() } else { cgroup2_mount()?.join(cgroup) };
    let md = fs::metadata(&path).map_err(|e| CaptureError::Cgroup {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if !md.is_dir() || !path.join("cgroup.procs").exists() {
        return Err(CaptureError::Cgroup { path, reason: "not a cgroup directory".into() });
    }
    Ok(path)
}

/// The cgroup id the kernel reports from `bpf_get_current_cgroup_id()`: the inode number of the
/// cgroup's directory in cgroupfs.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// All cgroups below `root` that belong to the pod with this uid, with their descendants (a
/// pod's processes live in per-container child cgroups). Kubelet names pod cgroups
/// `pod<uid>` (cgroupfs driver) or `...-pod<uid with _>.slice` (systemd driver).
pub fn pod_cgroups(root: &Path, uid: &str) -> Vec<u64> {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(&dashed)
                || name.contains(&format!("{underscored}."))
                || name.ends_with(&underscored)
            {
                collect_subtree(&path, &mut found);
            } else {
                stack.push(path);
            }
        }
    }
    found
}

fn collect_subtree(dir: &Path, out: &mut Vec<u64>) {
    if let Ok(id) = cgroup_id(dir) {
        out.push(id);
    }
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_subtree(&entry.path(), out);
        }
    }
}
