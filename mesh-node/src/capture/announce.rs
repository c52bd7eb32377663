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
    sync::OnceLock,
};

use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("announcing this proxy as starting (abstract unix socket @{name}): {error}")]
    Bind { name: String, error: io::Error },
}

/// Socket name prefix; the full name is `<prefix><scope>.<pid>.<instance>`. Releases before
/// the instance id put a nonce where the instance is now and read only the pid, so they still
/// recognise this release's announcements.
const PREFIX: &str = "mesh-node.starting.";

/// This process's instance id: 16 hex digits from the kernel's random pool, drawn once.
///
/// What tells two proxies of a node apart. Not the pid: in a DaemonSet every proxy is pid 1
/// of its own pid namespace, the old and the new one of a surge upgrade alike. Not the clock:
/// two proxies started in the same instant would collide. Shown with the pid in logs,
/// `/status` and readiness answers (`x-mesh-instance`).
pub fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| format!("{:016x}", random_u64()))
}

/// 64 random bits: getrandom(2), else /dev/urandom, else (no entropy source at all, which a
/// Linux that runs eBPF does not lack) the clock mixed with the pid.
fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        return u64::from_ne_bytes(buf);
    }
    if std::fs::File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut buf)).is_ok() {
        return u64::from_ne_bytes(buf);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

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

/// The announcement name of the proxy `pid`/`instance` of the node whose pins are in `scope`.
fn name_of(scope: &str, pid: u32, instance: &str) -> String {
    format!("{scope}{pid}.{instance}")
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
        let name = name_of(&scope(pin_dir), std::process::id(), instance_id());
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

/// A starting proxy of this node, as its announcement names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Starting {
    /// In its own pid namespace (1 in a DaemonSet pod): for humans, not unique.
    pub pid: u32,
    /// Its [`instance_id`]: unique.
    pub instance: String,
}

impl std::fmt::Display for Starting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} instance {}", self.pid, self.instance)
    }
}

/// Finds the announcements of other starting proxies of the same node.
#[derive(Clone, Debug)]
pub struct Successors {
    scope: String,
    /// Our own announcement's full name, never counted. The full name, not `<scope><pid>.`:
    /// a successor in another pid namespace may have our pid (both are pid 1 in pods).
    own: String,
}

impl Successors {
    pub fn new(pin_dir: &Path) -> Self {
        let scope = scope(pin_dir);
        let own = name_of(&scope, std::process::id(), instance_id());
        Self { scope, own }
    }

    /// The other proxies of this node that are starting and not ready yet. Reads
    /// `/proc/net/unix` of our network namespace; if it cannot be read, none (the probe then
    /// answers as before this check existed).
    pub fn starting(&self) -> Vec<Starting> {
        match std::fs::read_to_string("/proc/self/net/unix") {
            Ok(text) => starting_in(&text, &self.scope, &self.own),
            Err(e) => {
                debug!("reading /proc/self/net/unix: {e}");
                Vec::new()
            }
        }
    }
}

/// The announcements listed in a `/proc/net/unix` text (abstract names show as `@name`, the
/// last column), except `own`.
fn starting_in(proc_net_unix: &str, scope: &str, own: &str) -> Vec<Starting> {
    let mut found: Vec<Starting> = proc_net_unix
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(7))
        .filter_map(|path| path.strip_prefix('@'))
        .filter(|name| *name != own)
        .filter_map(|name| name.strip_prefix(scope))
        .filter_map(|rest| {
            let (pid, instance) = rest.split_once('.')?;
            Some(Starting { pid: pid.parse().ok()?, instance: instance.to_string() })
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix_line(inode: u32, name: &str) -> String {
        format!("0000000000000000: 00000002 00000000 00000000 0002 01 {inode} @{name}\n")
    }

    fn starting(pid: u32, instance: &str) -> Starting {
        Starting { pid, instance: instance.into() }
    }

    #[test]
    fn other_proxies_announcements_of_the_same_node_are_found() {
        let scope = scope(Path::new("/sys/fs/bpf/mesh"));
        let other_node = super::scope(Path::new("/sys/fs/bpf/mesh-b"));
        assert_ne!(scope, other_node);
        let own = name_of(&scope, 7, "00000001");
        let text = format!(
            "Num       RefCount Protocol Flags    Type St Inode Path\n{}{}{}\
             0000000000000000: 00000002 00000000 00000000 0001 01 1004 /run/systemd/notify\n\
             0000000000000000: 00000002 00000000 00000000 0001 01 1005\n{}",
            unix_line(1001, &format!("{scope}1234.0000abcd")),
            unix_line(1002, &own),
            unix_line(1003, &format!("{other_node}99.00000001")),
            unix_line(1006, &format!("{scope}1.00000002")),
        );
        assert_eq!(starting_in(&text, &scope, &own), vec![starting(1, "00000002"), starting(1234, "0000abcd")], "ours (7) and another node's (99) are not counted");
    }

    /// In a DaemonSet the old and the new proxy are both pid 1 (one pid namespace per pod):
    /// the old one must still see its successor, and each must still ignore itself.
    #[test]
    fn a_successor_with_our_pid_is_found_and_we_are_not() {
        let scope = scope(Path::new("/sys/fs/bpf/mesh"));
        let (old, new) = (name_of(&scope, 1, "1111111111111111"), name_of(&scope, 1, "2222222222222222"));
        let text = format!("Num       RefCount Protocol Flags    Type St Inode Path\n{}{}", unix_line(1, &old), unix_line(2, &new));
        assert_eq!(starting_in(&text, &scope, &old), vec![starting(1, "2222222222222222")], "the old proxy sees its successor");
        assert_eq!(starting_in(&text, &scope, &new), vec![starting(1, "1111111111111111")], "and the successor the old one's (were it announced)");
        assert_eq!(starting_in(&format!("Num\n{}", unix_line(1, &old)), &scope, &old), vec![], "a proxy never waits for itself");
    }

    #[test]
    fn instance_ids_are_random_and_stable_per_process() {
        assert_eq!(instance_id(), instance_id(), "drawn once per process");
        assert_eq!(instance_id().len(), 16);
        // Two draws colliding would take 2^32 tries on average.
        let draws: std::collections::BTreeSet<u64> = (0..64).map(|_| random_u64()).collect();
        assert_eq!(draws.len(), 64);
    }

    #[test]
    fn an_announcement_is_visible_while_held_and_gone_once_dropped() {
        let dir = std::env::temp_dir().join(format!("mesh-announce-test-{}", std::process::id()));
        let held = Announcement::new(&dir).expect("abstract sockets are available");
        let scope = scope(&dir);
        // Seen from another process of the node with our pid (a foreign `own` of the same pid).
        let from_other = || starting_in(&std::fs::read_to_string("/proc/self/net/unix").unwrap(), &scope, &name_of(&scope, std::process::id(), "other"));
        assert_eq!(from_other(), vec![starting(std::process::id(), instance_id())], "{}", held.name());
        assert!(Successors::new(&dir).starting().is_empty(), "a proxy does not wait for itself");
        drop(held);
        assert!(from_other().is_empty());
    }
}
