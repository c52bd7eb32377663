//! Thin wrappers over the host tools and kernel files the simulated cluster is made of:
//! `ip` for namespaces and links, cgroupfs for cgroups, setns for entering a namespace.
use std::{
    ffi::CString,
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Runs `ip` with arguments, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `ip` inside a named network namespace.
pub fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    ip(&full)
}

/// Sets a sysctl inside a namespace by entering it in a short-lived child.
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("echo {value} > {path}"))
        .enter(Some(netns), None)?
        .status()
        .context("sysctl")?;
    if !status.success() {
        bail!("sysctl {key}={value} in {netns} failed");
    }
    Ok(())
}

pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 filesystem mounted")
}

/// Kills every process in a cgroup subtree and removes it, deepest first.
pub fn remove_cgroup_tree(root: &Path) {
    if !root.exists() {
        return;
    }
    let _ = fs::write(root.join("cgroup.kill"), "1");
    let mut dirs = Vec::new();
    collect_dirs(root, &mut dirs);
    for _ in 0..100 {
        // Processes take a moment to leave a killed cgroup.
        let mut left = false;
        for dir in dirs.iter().rev() {
            if dir.exists() && fs::remove_dir(dir).is_err() {
                left = true;
            }
        }
        if !left {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("harness: could not remove cgroup {}", root.display());
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Mounts a bpf filesystem of its own at `dir` (an empty directory).
pub fn mount_bpffs(dir: &Path) -> anyhow::Result<()> {
    let target = CString::new(dir.to_string_lossy().into_owned())?;
    let (src, fstype) = (CString::new("bpf")?, CString::new("bpf")?);
    // SAFETY: NUL-terminated strings that outlive the call; no mount data.
    if unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) } != 0 {
        bail!("mounting a bpffs at {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes every pin under a bpffs mount (unpinned links detach) and unmounts it.
pub fn unmount_bpffs(dir: &Path) {
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    for d in dirs.iter().rev() {
        if let Ok(entries) = fs::read_dir(d) {
            for e in entries.flatten().filter(|e| !e.file_type().is_ok_and(|t| t.is_dir())) {
                let _ = fs::remove_file(e.path());
            }
        }
        if d != dir {
            let _ = fs::remove_dir(d);
        }
    }
    let Ok(target) = CString::new(dir.to_string_lossy().into_owned()) else { return };
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        eprintln!("harness: unmounting {}: {}", dir.display(), std::io::Error::last_os_error());
    }
}

/// Starts a command inside a network namespace and a cgroup, without `ip netns exec` (which
/// remounts /sys and would hide cgroupfs from the child).
pub trait EnterExt {
    fn enter(&mut self, netns: Option<&str>, cgroup: Option<&Path>) -> anyhow::Result<&mut Self>;
}

impl EnterExt for Command {
    fn enter(&mut self, netns: Option<&str>, cgroup: Option<&Path>) -> anyhow::Result<&mut Self> {
        let ns_fd = match netns {
            Some(name) => {
                let path = CString::new(format!("/run/netns/{name}"))?;
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                if fd < 0 {
                    bail!("opening network namespace {name}: {}", std::io::Error::last_os_error());
                }
                // Owned by the pre_exec closure, so it closes when the Command is dropped.
                Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
            }
            None => None,
        };
        let procs = match cgroup {
            Some(dir) => Some(CString::new(dir.join("cgroup.procs").to_string_lossy().into_owned())?),
            None => None,
        };
        // Only async-signal-safe calls between fork and exec.
        unsafe {
            self.pre_exec(move || {
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 || libc::write(fd, b"0\n".as_ptr().cast(), 2) != 2 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                if let Some(fd) = &ns_fd
                    && libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(self)
    }
}
