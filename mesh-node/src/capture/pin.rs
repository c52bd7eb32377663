//! The capture's pins in bpffs, so that it outlives the process that attached it.
//!
//! Layout of a pin directory (`--bpf-pin-dir`, one per node):
//! - `links/<program>`: the bpf_link attaching each program to the pod cgroup. A pinned link
//!   stays attached after its process exits; a new proxy *updates* it to its own program
//!   (`BPF_LINK_UPDATE`, atomic: no connect ever runs without a capture program).
//! - `maps_v<N>/<MAP>`: the maps the programs share with the proxy, above all `ORIG_DST`. A new
//!   proxy loads its programs against these same maps, so a connection redirected by the old
//!   program just before the switch is still found by whichever proxy accepts it. `N` is
//!   [`mesh_common::MAP_LAYOUT`]: a release that changes a map's layout starts new maps instead
//!   of reading the old bytes wrongly.
//!
//! Whoever changes the pins holds an exclusive `flock` on the directory, so a starting proxy,
//! a stopping one and `mesh-node uninstall` never interleave.
//!
//! aya's link types own their file descriptors privately and cannot update a link, so the few
//! link commands are issued here directly.
use std::{
    ffi::CString,
    fs,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("bpf pin directory {path}: {error}")]
    Dir { path: PathBuf, error: io::Error },
    #[error(
        "bpf pin directory {0} is not on a bpf filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`; in a pod, mount the host's /sys/fs/bpf) or pass another --bpf-pin-dir"
    )]
    NotBpffs(PathBuf),
    #[error("{call} on {path}: {error}")]
    Syscall { call: &'static str, path: PathBuf, error: io::Error },
    #[error("pinned link {path} is not a cgroup link (type {link_type}); remove it or run `mesh-node uninstall`")]
    NotCgroupLink { path: PathBuf, link_type: u32 },
}

/// Subdirectory of pinned links.
const LINKS: &str = "links";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

// bpf(2) commands and constants used here (include/uapi/linux/bpf.h).
const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_LINK_DETACH: u32 = 34;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// Cgroup attach types (`enum bpf_attach_type`) of the capture's programs.
pub const BPF_CGROUP_INET_INGRESS: u32 = 0;
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;

#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` with its cgroup member, and room for the rest of the
/// union (the kernel accepts a larger buffer whose tail is zero).
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 25],
}

fn bpf<T>(cmd: u32, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, properly laid out bpf_attr member of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd() as u32
}

/// What the kernel says about a pinned link.
#[derive(Clone, Copy, Debug)]
pub struct LinkState {
    pub id: u32,
    pub prog_id: u32,
    /// 0 when the cgroup it was attached to is gone (the link is defunct).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

fn link_info(fd: BorrowedFd<'_>, path: &Path) -> Result<LinkState, PinError> {
    let mut info = RawLinkInfo::default();
    let mut attr = InfoAttr { bpf_fd: fd_u32(fd), info_len: std::mem::size_of::<RawLinkInfo>() as u32, info: &mut info as *mut RawLinkInfo as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map_err(|error| PinError::Syscall { call: "BPF_OBJ_GET_INFO_BY_FD", path: path.into(), error })?;
    if info.link_type != BPF_LINK_TYPE_CGROUP {
        return Err(PinError::NotCgroupLink { path: path.into(), link_type: info.link_type });
    }
    Ok(LinkState { id: info.id, prog_id: info.prog_id, cgroup_id: info.cgroup_id, attach_type: info.attach_type })
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: fd_u32(fd), file_flags: 0 };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Attaches a program to a cgroup with a new bpf_link (multi-attach: the host's and the CNI's
/// programs on the same cgroup keep running).
fn link_create(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr { prog_fd: fd_u32(prog), target_fd: fd_u32(cgroup), attach_type, flags: 0 };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches a link now, whoever else holds it open.
fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr { link_fd: fd_u32(link) };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// The capture's pin directory, locked for as long as this value lives.
pub struct PinDir {
    path: PathBuf,
    /// Holds the flock.
    _lock: fs::File,
}

/// How a program's link was set up by [`PinDir::install_link`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkSetup {
    /// No pinned link: attached and pinned anew.
    Created,
    /// A pinned link existed (a previous proxy's): now runs our program. The value is the
    /// program it ran before.
    TookOver { previous_prog: u32 },
}

impl PinDir {
    /// Creates the directory if needed and takes its lock (waiting for another proxy or an
    /// uninstall to finish).
    pub fn lock(path: &Path) -> Result<Self, PinError> {
        let dir_err = |error| PinError::Dir { path: path.into(), error };
        loop {
            fs::create_dir_all(path).map_err(dir_err)?;
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            let c = c_path(path).map_err(dir_err)?;
            // SAFETY: a NUL-terminated path and a statfs buffer we own.
            if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
                return Err(dir_err(io::Error::last_os_error()));
            }
            if st.f_type as i64 != BPF_FS_MAGIC {
                return Err(PinError::NotBpffs(path.into()));
            }
            let lock = fs::File::open(path).map_err(dir_err)?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(dir_err(io::Error::last_os_error()));
            }
            // An uninstall may have removed the directory while we waited for its lock: then
            // we hold the lock of a deleted directory, and start over on a fresh one.
            let same = fs::metadata(path).is_ok_and(|m| lock.metadata().is_ok_and(|l| l.ino() == m.ino()));
            if same {
                return Ok(Self { path: path.into(), _lock: lock });
            }
            debug!(dir = %path.display(), "pin directory was replaced while waiting for its lock; retrying");
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where this build's maps are pinned (created if missing).
    pub fn maps_dir(&self) -> Result<PathBuf, PinError> {
        let dir = self.path.join(format!("maps_v{}", mesh_common::MAP_LAYOUT));
        fs::create_dir_all(&dir).map_err(|error| PinError::Dir { path: dir.clone(), error })?;
        Ok(dir)
    }

    fn link_path(&self, program: &str) -> PathBuf {
        self.path.join(LINKS).join(program)
    }

    /// Makes the pinned link of `program` run `prog` on `cgroup`: updates the link a previous
    /// proxy pinned, or attaches and pins a new one. A pinned link to another cgroup (the node's
    /// pod cgroup moved) or to a cgroup that is gone is detached and replaced.
    pub fn install_link(&self, program: &str, prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, cgroup_id: u64, attach_type: u32) -> Result<(OwnedFd, LinkSetup), PinError> {
        let path = self.link_path(program);
        let links_dir = self.path.join(LINKS);
        fs::create_dir_all(&links_dir).map_err(|error| PinError::Dir { path: links_dir, error })?;
        match obj_get(&path) {
            Ok(link) => {
                let state = link_info(link.as_fd(), &path)?;
                if state.cgroup_id == cgroup_id && state.attach_type == attach_type {
                    let mut attr = LinkUpdateAttr { link_fd: fd_u32(link.as_fd()), new_prog_fd: fd_u32(prog), flags: 0, old_prog_fd: 0 };
                    bpf(BPF_LINK_UPDATE, &mut attr).map_err(|error| PinError::Syscall { call: "BPF_LINK_UPDATE", path: path.clone(), error })?;
                    return Ok((link, LinkSetup::TookOver { previous_prog: state.prog_id }));
                }
                warn!(
                    link = %path.display(),
                    pinned_cgroup_id = state.cgroup_id,
                    cgroup_id,
                    "pinned link is attached elsewhere (or its cgroup is gone); replacing it"
                );
                let _ = link_detach(link.as_fd());
                fs::remove_file(&path).map_err(|error| PinError::Dir { path: path.clone(), error })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(PinError::Syscall { call: "BPF_OBJ_GET", path, error }),
        }
        let link = link_create(prog, cgroup, attach_type).map_err(|error| PinError::Syscall { call: "BPF_LINK_CREATE", path: path.clone(), error })?;
        obj_pin(link.as_fd(), &path).map_err(|error| PinError::Syscall { call: "BPF_OBJ_PIN", path, error })?;
        Ok((link, LinkSetup::Created))
    }

    /// Points the pinned link of `program` back at the program with kernel id `prog_id` (the
    /// previous proxy's, when our start failed after taking over), if that program still exists.
    pub fn restore_link(&self, program: &str, prog_id: u32) -> Result<(), PinError> {
        let path = self.link_path(program);
        let link = obj_get(&path).map_err(|error| PinError::Syscall { call: "BPF_OBJ_GET", path: path.clone(), error })?;
        let mut attr = GetFdByIdAttr { id: prog_id, next_id: 0, open_flags: 0 };
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map_err(|error| PinError::Syscall { call: "BPF_PROG_GET_FD_BY_ID", path: path.clone(), error })?;
        // SAFETY: BPF_PROG_GET_FD_BY_ID returned a new file descriptor that nothing else owns.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut attr = LinkUpdateAttr { link_fd: fd_u32(link.as_fd()), new_prog_fd: fd_u32(prog.as_fd()), flags: 0, old_prog_fd: 0 };
        bpf(BPF_LINK_UPDATE, &mut attr).map_err(|error| PinError::Syscall { call: "BPF_LINK_UPDATE", path, error })?;
        Ok(())
    }

    /// Detaches the pinned link of `program` and removes its pin; `false` when there was none.
    pub fn remove_link(&self, program: &str) -> Result<bool, PinError> {
        let path = self.link_path(program);
        let link = match obj_get(&path) {
            Ok(link) => link,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(PinError::Syscall { call: "BPF_OBJ_GET", path, error }),
        };
        link_detach(link.as_fd()).map_err(|error| PinError::Syscall { call: "BPF_LINK_DETACH", path: path.clone(), error })?;
        fs::remove_file(&path).map_err(|error| PinError::Dir { path, error })?;
        Ok(true)
    }

    /// The pinned links, by program name, with what the kernel says about each.
    pub fn links(&self) -> Vec<(String, Result<LinkState, PinError>)> {
        let dir = self.path.join(LINKS);
        let Ok(entries) = fs::read_dir(&dir) else { return Vec::new() };
        let mut out: Vec<_> = entries
            .flatten()
            .map(|e| {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let state = obj_get(&path)
                    .map_err(|error| PinError::Syscall { call: "BPF_OBJ_GET", path: path.clone(), error })
                    .and_then(|fd| link_info(fd.as_fd(), &path));
                (name, state)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Map pin directories of other map layouts (left by an older release): no program of
    /// this release uses them once it has taken over, so their pins can go.
    pub fn remove_stale_maps(&self) {
        let ours = format!("maps_v{}", mesh_common::MAP_LAYOUT);
        for dir in self.map_dirs().into_iter().filter(|d| d.file_name().is_some_and(|n| n != ours.as_str())) {
            info!(dir = %dir.display(), "removing maps pinned by an older map layout");
            remove_pins(&dir);
        }
    }

    fn map_dirs(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.path) else { return Vec::new() };
        entries.flatten().map(|e| e.path()).filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("maps_v"))).collect()
    }

    /// Detaches every pinned link now and removes every pin and the directory itself: what
    /// uninstall means. Returns (links detached, maps unpinned).
    pub fn remove_all(self) -> Result<(usize, usize), PinError> {
        let mut links = 0;
        let links_dir = self.path.join(LINKS);
        if let Ok(entries) = fs::read_dir(&links_dir) {
            for e in entries.flatten() {
                let path = e.path();
                match obj_get(&path) {
                    Ok(fd) => {
                        if let Err(e) = link_detach(fd.as_fd()) {
                            warn!(link = %path.display(), "detaching: {e}");
                        }
                    }
                    Err(e) => warn!(link = %path.display(), "opening pinned link: {e}"),
                }
                fs::remove_file(&path).map_err(|error| PinError::Dir { path: path.clone(), error })?;
                links += 1;
            }
            let _ = fs::remove_dir(&links_dir);
        }
        let mut maps = 0;
        for dir in self.map_dirs() {
            maps += remove_pins(&dir);
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            warn!(dir = %self.path.display(), "removing the pin directory: {e} (something else is pinned there)");
        }
        Ok((links, maps))
    }
}

/// Removes the pinned objects in a directory and the directory; returns how many.
fn remove_pins(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            match fs::remove_file(e.path()) {
                Ok(()) => n += 1,
                Err(err) => warn!(pin = %e.path().display(), "unpinning: {err}"),
            }
        }
    }
    let _ = fs::remove_dir(dir);
    n
}

/// `mesh-node uninstall`: detaches the capture pinned in `dir` and removes its pins. Nothing
/// pinned is not an error (uninstall twice is fine).
pub fn uninstall(dir: &Path) -> Result<(usize, usize), PinError> {
    if !dir.exists() {
        return Ok((0, 0));
    }
    PinDir::lock(dir)?.remove_all()
}
