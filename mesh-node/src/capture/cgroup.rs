//! Finding cgroups: the cgroup2 mount, the attach point, and the cgroups that belong to a pod.
use std::{
    collections::HashMap,
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

/// Where kubelets run, relative to the cgroup2 mount: k3s servers and agents (the kubelet is
/// part of the k3s process), and a kubelet of its own under systemd.
pub const KUBELET_CGROUPS: [&str; 3] = ["system.slice/k3s.service", "system.slice/k3s-agent.service", "system.slice/kubelet.service"];

/// The kubelet's cgroup and its id: as configured (`none`: no kubelet), else the first of
/// [`KUBELET_CGROUPS`] that exists.
pub fn kubelet(configured: Option<&Path>) -> Result<Option<(PathBuf, u64)>, CaptureError> {
    let path = match configured {
        Some(p) if p == Path::new("none") => return Ok(None),
        Some(p) => resolve(p)?,
        None => {
            let mount = cgroup2_mount()?;
            match KUBELET_CGROUPS.iter().map(|c| mount.join(c)).find(|p| p.join("cgroup.procs").exists()) {
                Some(p) => p,
                None => return Ok(None),
            }
        }
    };
    let id = cgroup_id(&path).map_err(|e| CaptureError::Cgroup { path: path.clone(), reason: e.to_string() })?;
    Ok(Some((path, id)))
}

/// The cgroup id the kernel reports from `bpf_get_current_cgroup_id()`: the inode number of the
/// cgroup's directory in cgroupfs.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// A pod's processes live in per-container child cgroups of its pod cgroup, so each pod maps
/// to its pod cgroup and every descendant.
/// Every pod cgroup below `root`, by pod uid, found in one walk of the tree (the capture
/// re-syncs every second; one walk per pod would not scale with the node's pod count).
pub fn pods_cgroups(root: &Path) -> HashMap<String, Vec<u64>> {
    let mut found: HashMap<String, Vec<u64>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            match pod_uid(&entry.file_name().to_string_lossy()) {
                Some(uid) => collect_subtree(&path, found.entry(uid).or_default()),
                None => stack.push(path),
            }
        }
    }
    found
}

/// The pod uid a cgroup directory name carries: `pod<uid>` (cgroupfs) or
/// `kubepods-<qos>-pod<uid with _>.slice` (systemd).
fn pod_uid(name: &str) -> Option<String> {
    let name = name.strip_suffix(".slice").unwrap_or(name);
    let at = name.rfind("pod")?;
    let uid = &name[at + 3..];
    let uuid_like = uid.len() >= 32 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    (uuid_like && (at == 0 || name[..at].ends_with('-'))).then(|| uid.replace('_', "-"))
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const UID: &str = "6f1c2d3e-1111-4222-8333-944455556666";
    const OTHER: &str = "6f1c2d3e-1111-4222-8333-944455556667";

    /// Creates `paths` under a temporary root; returns the root and the cgroup ids (inodes) of
    /// the directories whose path contains `marker`, with their descendants.
    fn tree(paths: &[&str], marker: &str) -> (tempfile::TempDir, BTreeSet<u64>) {
        let root = tempfile::tempdir().unwrap();
        let mut want = BTreeSet::new();
        for p in paths {
            fs::create_dir_all(root.path().join(p)).unwrap();
        }
        for p in paths {
            let mut dir = root.path().to_path_buf();
            let mut inside = false;
            for part in Path::new(p).components() {
                dir.push(part);
                inside |= part.as_os_str().to_string_lossy().contains(marker);
                if inside {
                    want.insert(cgroup_id(&dir).unwrap());
                }
            }
        }
        (root, want)
    }

    fn found(root: &Path, uid: &str) -> BTreeSet<u64> {
        pods_cgroups(root).remove(uid).unwrap_or_default().into_iter().collect()
    }

    #[test]
    fn cgroupfs_driver_pods_and_their_containers() {
        let (root, want) = tree(
            &[
                &format!("kubepods/burstable/pod{UID}/0123abcd"),
                &format!("kubepods/burstable/pod{UID}/4567ef01"),
                &format!("kubepods/besteffort/pod{OTHER}/89ab"),
                "kubepods/besteffort",
            ],
            &format!("pod{UID}"),
        );
        assert_eq!(want.len(), 3);
        assert_eq!(found(root.path(), UID), want);
    }

    #[test]
    fn systemd_driver_slices_with_underscored_uids() {
        let u = UID.replace('-', "_");
        let o = OTHER.replace('-', "_");
        let (root, want) = tree(
            &[
                &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-0123.scope"),
                &format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{o}.slice/cri-containerd-4567.scope"),
            ],
            &format!("pod{u}"),
        );
        assert_eq!(want.len(), 2);
        assert_eq!(found(root.path(), UID), want);
    }

    #[test]
    fn k3s_layouts_and_guaranteed_pods_directly_under_kubepods() {
        // k3s with cgroup v2 and its default cgroupfs driver: /kubepods/<qos>/pod<uid>/<ctr>;
        // Guaranteed pods sit directly under kubepods.
        let (root, want) = tree(
            &[
                &format!("kubepods/pod{UID}/c0ffee"),
                &format!("kubepods/besteffort/pod{OTHER}/bead"),
                "system.slice/k3s.service",
            ],
            &format!("pod{UID}"),
        );
        assert_eq!(want.len(), 2);
        assert_eq!(found(root.path(), UID), want);
        assert!(found(root.path(), "not-a-pod").is_empty());
    }

    #[test]
    fn a_uid_that_extends_another_does_not_match_it() {
        let longer = format!("{UID}0");
        let (root, _) = tree(&[&format!("kubepods/burstable/pod{longer}/x")], "never");
        assert!(found(root.path(), UID).is_empty());
    }
}
