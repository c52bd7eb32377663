//! A starting proxy announces itself to the proxy it is about to replace, so that readiness
//! answered during the overlap is never a false "ready".
//!
//! During a restart both proxies listen on the readiness port (SO_REUSEPORT), so kubelet's
//! probe of the *new* pod may be answered by the *old* proxy. If the old one said "ready", the
//! new pod would count as ready before it has taken the capture over, the rollout would stop
//! the old proxy, and that one, finding no successor on the links, would detach the capture.
//! So a proxy holds an announcement from the moment it starts until it is ready, and every
//! proxy of the same node answers "not ready" while another one's announcement is held.
//!
//! The announcement is an abstract unix socket named after the node's pin directory, rather
//! than a marker file: bpffs (where the pin directory is) cannot hold regular files, and the
//! proxies run in different pods, so in different pid namespaces: a pid written by one cannot
//! be checked for liveness by the other. An abstract socket lives in the network namespace
//! (the node's, both pods use hostNetwork), disappears with the process however it ends (no
//! stale marker after a crash), and other sockets of the namespace are listed in
//! `/proc/net/unix`.
use std::{
    io,
    os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram},
    path::Path,
};

use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("announcing this proxy as starting (abstract unix socket @{name}): {error}")]
    Bind { name: String, error: io::Error },
}

/// Socket name prefix; the full name is `<prefix><scope>.<pid>.<nonce>`.
const PREFIX: &str = "mesh-node.starting.";

/// Names the announcements of the proxies sharing one pin directory (one node): FNV-1a of
/// the path, stable across releases (an old proxy must recognise a new one's announcement).
fn scope(pin_dir: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::os::unix::ffi::OsStrExt::as_bytes(pin_dir.as_os_str()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{PREFIX}{h:016x}.")
}

/// Held by a proxy from its start until it is ready; dropping it withdraws the announcement.
#[derive(Debug)]
pub struct Announcement {
    _socket: UnixDatagram,
    name: String,
}

impl Announcement {
    /// Announces this process as a starting proxy of the node whose capture is pinned in
    /// `pin_dir`.
    pub fn new(pin_dir: &Path) -> Result<Self, AnnounceError> {
        // The pid alone is not unique across pid namespaces (both pods' proxies may be pid 1):
        // the nonce keeps two names apart.
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let name = format!("{}{}.{nonce:08x}", scope(pin_dir), std::process::id());
        let bind = || -> io::Result<UnixDatagram> {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            UnixDatagram::bind_addr(&addr)
        };
        let socket = bind().map_err(|error| AnnounceError::Bind { name: name.clone(), error })?;
        debug!(name = %name, "announced as a starting proxy");
        Ok(Self { _socket: socket, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Finds the announcements of other starting proxies of the same node.
#[derive(Clone, Debug)]
pub struct Successors {
    scope: String,
    /// Our own announcement's name prefix (`<scope><pid>.`), never counted.
    own: String,
}

impl Successors {
    pub fn new(pin_dir: &Path) -> Self {
        let scope = scope(pin_dir);
        let own = format!("{scope}{}.", std::process::id());
        Self { scope, own }
    }

    /// The pids (as seen in their own pid namespace) of the other proxies of this node that
    /// are starting and not ready yet. Reads `/proc/net/unix` of our network namespace; if it
    /// cannot be read, none (the probe then answers as before this check existed).
    pub fn starting(&self) -> Vec<u32> {
        match std::fs::read_to_string("/proc/self/net/unix") {
            Ok(text) => starting_in(&text, &self.scope, &self.own),
            Err(e) => {
                debug!("reading /proc/self/net/unix: {e}");
                Vec::new()
            }
        }
    }
}

/// The pids in the announcements listed in a `/proc/net/unix` text (abstract names show as
/// `@name`, the last column).
fn starting_in(proc_net_unix: &str, scope: &str, own: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = proc_net_unix
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(7))
        .filter_map(|path| path.strip_prefix('@'))
        .filter(|name| !name.starts_with(own))
        .filter_map(|name| name.strip_prefix(scope))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_proxies_announcements_of_the_same_node_are_found() {
        let scope = scope(Path::new("/sys/fs/bpf/mesh"));
        let other_node = super::scope(Path::new("/sys/fs/bpf/mesh-b"));
        assert_ne!(scope, other_node);
        let own = format!("{scope}7.");
        let text = format!(
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
             0000000000000000: 00000002 00000000 00000000 0002 01 1001 @{scope}1234.0000abcd\n\
             0000000000000000: 00000002 00000000 00000000 0002 01 1002 @{scope}7.00000001\n\
             0000000000000000: 00000002 00000000 00000000 0002 01 1003 @{other_node}99.00000001\n\
             0000000000000000: 00000002 00000000 00000000 0001 01 1004 /run/systemd/notify\n\
             0000000000000000: 00000002 00000000 00000000 0001 01 1005\n\
             0000000000000000: 00000002 00000000 00000000 0002 01 1006 @{scope}1.00000002\n"
        );
        assert_eq!(starting_in(&text, &scope, &own), vec![1, 1234], "ours (7) and another node's (99) are not counted");
    }

    #[test]
    fn an_announcement_is_visible_while_held_and_gone_once_dropped() {
        let dir = std::env::temp_dir().join(format!("mesh-announce-test-{}", std::process::id()));
        let held = Announcement::new(&dir).expect("abstract sockets are available");
        let scope = scope(&dir);
        // Seen from another process of the node (not ourselves: use a foreign `own`).
        let from_other = || starting_in(&std::fs::read_to_string("/proc/self/net/unix").unwrap(), &scope, &format!("{scope}0."));
        assert_eq!(from_other(), vec![std::process::id()], "{}", held.name());
        assert!(Successors::new(&dir).starting().is_empty(), "a proxy does not wait for itself");
        drop(held);
        assert!(from_other().is_empty());
    }
}
