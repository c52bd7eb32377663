//! Node proxies and the CA run as their Kubernetes containers would (deploy/daemonset.yaml,
//! deploy/ca.yaml): PID 1 of their own pid namespace, their own mount namespace (cgroup2
//! read-only at /sys/fs/cgroup, the node's bpffs at /sys/fs/bpf, a /proc of their own), only
//! the capabilities and user their manifest gives them, in the node's network namespace.
//!
//! Built from util-linux rather than syscalls in a `pre_exec`:
//! `unshare --pid --fork --kill-child --mount --mount-proc --ipc -- sh -c SCRIPT`, where SCRIPT
//! joins the container's cgroup, mounts, then `exec setpriv ... -- mesh-node ...`.
//! A new pid namespace only applies to the *children* of the process that creates it, so some
//! process must fork after `unshare(CLONE_NEWPID)` and wait for the PID 1. Done in a
//! `pre_exec`, that process would be a forked copy of the multi-threaded test binary, limited to
//! async-signal-safe calls, and it would hold std's exec-error pipe open so `spawn()` would
//! block until it exits. `unshare --fork` is that process, tested and small (it stands where
//! the runtime's shim stands on a node). The mounts need a step between creating the namespace
//! and the exec (sh and mount(8)), and setpriv sets the capability sets in the order the kernel
//! requires (inheritable before ambient, bounding set last).
//!
//! The harness keeps the `unshare` process as the child it waits for and signals the inner pid
//! (the proxy itself): `unshare` blocks SIGTERM and SIGINT while it waits, and the proxy, as
//! PID 1, only sees signals it has a handler for (SIGKILL and SIGSTOP from the host always get
//! through, and kill the whole namespace or freeze the proxy).
//!
//! Nothing here needs cleaning up beyond the processes: the mounts exist only in the
//! container's private mount namespace, which goes away with its last process.
use std::{
    ffi::OsStr,
    fs,
    io::{BufRead as _, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Deserialize as _;

/// The manifests, read at build time: the harness grants what they grant, so the two cannot
/// drift (edit a manifest's capabilities and the next test run uses them).
const DAEMONSET: (&str, &str) = ("deploy/daemonset.yaml", include_str!("../../deploy/daemonset.yaml"));
const CA: (&str, &str) = ("deploy/ca.yaml", include_str!("../../deploy/ca.yaml"));

/// Capability names by bit, as in `linux/capability.h` without the `CAP_` prefix.
const CAPABILITIES: [&str; 41] = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE",
    "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL",
    "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
];

fn capability_bit(name: &str) -> Option<u32> {
    CAPABILITIES.iter().position(|c| *c == name).map(|b| b as u32)
}

/// A container's `securityContext` (with its pod's), as far as the simulated cluster applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Security {
    /// The manifest's `capabilities.add` (after `drop: [ALL]`), e.g. `["BPF", "NET_ADMIN"]`.
    pub capabilities: Vec<String>,
    pub run_as_user: u32,
    pub run_as_group: u32,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privs: bool,
}

impl Security {
    /// The node proxy container of deploy/daemonset.yaml.
    pub fn node_proxy() -> anyhow::Result<Self> {
        from_manifest(DAEMONSET, "DaemonSet", "mesh-node", "mesh-node")
    }

    /// The CA container of deploy/ca.yaml.
    pub fn ca() -> anyhow::Result<Self> {
        from_manifest(CA, "Deployment", "mesh-ca", "mesh-ca")
    }

    /// The capabilities as the bit mask `/proc/<pid>/status` shows (`CapEff:` etc.).
    pub fn mask(&self) -> u64 {
        self.capabilities.iter().filter_map(|c| capability_bit(c)).fold(0, |m, b| m | 1 << b)
    }

    /// The same with only the capabilities this (test) process can pass on, and the ones it
    /// cannot: a capability outside our own bounding set cannot be granted to a child. Warns
    /// about those, which a test machine may lack (a node's container runtime would have them).
    pub fn grantable(&self) -> anyhow::Result<(Self, Vec<String>)> {
        let own = own_bounding_set()?;
        let (granted, missing): (Vec<String>, Vec<String>) = self.capabilities.iter().cloned().partition(|c| capability_bit(c).is_some_and(|b| own & (1 << b) != 0));
        static WARNED: std::sync::Once = std::sync::Once::new();
        if !missing.is_empty() {
            WARNED.call_once(|| eprintln!("harness: this machine's bounding set lacks {missing:?} of a manifest: its containers run without them"));
        }
        Ok((Self { capabilities: granted, ..self.clone() }, missing))
    }
}

/// `CapBnd` of this process.
fn own_bounding_set() -> anyhow::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).context("no CapBnd in /proc/self/status")?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// Finds `kind`/`name`'s container `container` in a multi-document manifest and reads its
/// security settings. Fails, naming the file, on anything the harness cannot model.
fn from_manifest((file, text): (&str, &str), kind: &str, name: &str, container: &str) -> anyhow::Result<Security> {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = serde_yaml::Value::deserialize(doc).with_context(|| format!("parsing {file}"))?;
        if v["kind"].as_str() != Some(kind) || v["metadata"]["name"].as_str() != Some(name) {
            continue;
        }
        let pod = &v["spec"]["template"]["spec"];
        let c = pod["containers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|c| c["name"].as_str() == Some(container))
            .with_context(|| format!("{file}: {kind} {name} has no container {container}"))?;
        let (sc, pod_sc) = (&c["securityContext"], &pod["securityContext"]);
        let names = |v: &serde_yaml::Value| -> Vec<String> { v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_uppercase)).collect() };
        let drop = names(&sc["capabilities"]["drop"]);
        if drop != ["ALL"] {
            bail!("{file}: container {container} drops {drop:?}; the simulated cluster models `drop: [ALL]` plus `add`");
        }
        let capabilities = names(&sc["capabilities"]["add"]);
        if let Some(unknown) = capabilities.iter().find(|c| capability_bit(c).is_none()) {
            bail!("{file}: container {container} adds unknown capability {unknown:?}");
        }
        // The container's setting wins over the pod's; unset means the image's user, root.
        let id = |key: &str| -> anyhow::Result<u32> {
            match sc[key].as_u64().or(pod_sc[key].as_u64()) {
                Some(n) => Ok(u32::try_from(n).with_context(|| format!("{file}: {key} {n}"))?),
                None => Ok(0),
            }
        };
        return Ok(Security { capabilities, run_as_user: id("runAsUser")?, run_as_group: id("runAsGroup")?, no_new_privs: sc["allowPrivilegeEscalation"].as_bool() == Some(false) });
    }
    bail!("{file}: no {kind} named {name}")
}

/// How to start one container.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    /// Already limited to what can be granted ([`Security::grantable`]).
    pub security: Security,
    /// The cgroup (host path) its processes run in, as the runtime puts a container in its
    /// pod's cgroup. The `unshare` process stays outside, as a runtime's shim does.
    pub cgroup: PathBuf,
    /// A host directory on a bpffs to bind at /sys/fs/bpf (the node's bpffs), if any.
    pub bpffs: Option<PathBuf>,
}

/// Runs inside the new namespaces as PID 1, then becomes the program. $1: the container
/// cgroup's cgroup.procs (host view, still visible until /sys/fs/cgroup is replaced); $2: the
/// bpffs directory or ""; the rest: setpriv's arguments. The host's /sys/fs/cgroup tree is
/// detached (in this namespace only) and a cgroup2 mount put in its place, read-only as the
/// DaemonSet's `cgroup` volume: the same hierarchy a hostPath of the host's cgroup2 root
/// shows, and the only cgroup2 entry of the container's /proc/mounts (where the proxy looks).
/// /proc/sys is read-only, as container runtimes mount it (sysctls are the node's business).
const SCRIPT: &str = r#"set -e
echo 0 > "$1"
umount --recursive --lazy /sys/fs/cgroup
mount -t cgroup2 -o ro,nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
mount --bind -o ro /proc/sys /proc/sys
if [ -n "$2" ]; then mount --bind "$2" /sys/fs/bpf; fi
shift 2
exec setpriv "$@"
"#;

impl ContainerSpec {
    /// The command that runs `program args` in this container; enter the node's network
    /// namespace on it ([`crate::sys::EnterExt`]) before spawning.
    pub fn command(&self, program: &Path, args: &[&OsStr]) -> Command {
        let s = &self.security;
        let caps = std::iter::once("-all".to_string()).chain(s.capabilities.iter().map(|c| format!("+{}", c.to_lowercase()))).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new("unshare");
        // --kill-child: if the harness kills `unshare`, the proxy goes too.
        cmd.args(["--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc", "--", "/bin/sh", "-c", SCRIPT, "container-init"])
            .arg(self.cgroup.join("cgroup.procs"))
            .arg(self.bpffs.as_deref().unwrap_or(Path::new("")));
        // The manifest's user (the CA's), then the capability sets: after the exec root has
        // exactly these, a non-root user none whatever they say.
        if s.run_as_user != 0 || s.run_as_group != 0 {
            cmd.args(["--reuid", &s.run_as_user.to_string(), "--regid", &s.run_as_group.to_string(), "--clear-groups"]);
        }
        if s.no_new_privs {
            cmd.arg("--no-new-privs");
        }
        cmd.args(["--inh-caps", &caps, "--ambient-caps", &caps, "--bounding-set", &caps, "--"]).arg(program).args(args);
        cmd
    }
}

/// A running container: the `unshare` process the harness waits for, and the program inside
/// (its pid as the host sees it; 1 inside). Its output goes to a log file, line by line, through
/// the harness, which notes the first line containing a marker (e.g. "node proxy ready"): the
/// proxy's own pid says nothing (every proxy is pid 1), and several processes share a log.
pub struct Container {
    outer: Child,
    inner: u32,
    marked: Arc<OnceLock<String>>,
    exited: Option<ExitStatus>,
}

impl Container {
    /// Spawns `cmd` (from [`ContainerSpec::command`]) with its output appended to `log`, and
    /// waits until the program inside has a pid.
    pub fn spawn(mut cmd: Command, log: &Path, marker: &str) -> anyhow::Result<Self> {
        let (reader, writer) = std::io::pipe().context("pipe for a container's output")?;
        cmd.stdin(Stdio::null()).stdout(writer.try_clone()?).stderr(writer);
        let outer = cmd.spawn().context("starting unshare (util-linux)")?;
        // Our copies of the pipe's write end went with `cmd`'s Stdio; drop `cmd` so that only
        // the container holds it and the reader sees EOF when the container is gone.
        drop(cmd);
        let marked = Arc::new(OnceLock::new());
        copy_output(reader, log, marker, marked.clone())?;
        let mut container = Self { outer, inner: 0, marked, exited: None };
        container.inner = container.find_inner(log)?;
        Ok(container)
    }

    /// The child of `unshare`: the container's PID 1 (the same pid from sh to setpriv to the
    /// program: each execs the next).
    fn find_inner(&mut self, log: &Path) -> anyhow::Result<u32> {
        let outer = self.outer.id();
        let children = format!("/proc/{outer}/task/{outer}/children");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                return Ok(pid);
            }
            if let Some(status) = self.try_wait()? {
                bail!("the container exited at once ({status}):\n{}", fs::read_to_string(log).unwrap_or_default());
            }
            if Instant::now() > deadline {
                bail!("unshare {outer} started no container process within 5 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The program's pid as the host sees it (1 in its own namespace).
    pub fn pid(&self) -> u32 {
        self.inner
    }

    /// The first output line containing the marker given to [`Self::spawn`], ANSI colours
    /// removed.
    pub fn marked_line(&self) -> Option<&str> {
        self.marked.get().map(String::as_str)
    }

    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.outer.try_wait()?;
        }
        Ok(self.exited)
    }

    /// Sends `signal` to the program, unless the container has ended (its pid may be reused).
    pub fn signal(&mut self, signal: i32) -> anyhow::Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: plain kill(2) of a process we started and have not reaped.
        if unsafe { libc::kill(self.inner as i32, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                bail!("signal {signal} to container process {}: {e}", self.inner);
            }
        }
        Ok(())
    }

    /// Waits for the container to end: the program's exit status, as `unshare` passes it on.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("container process {} still running after {timeout:?}", self.inner);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL to the program (which ends its whole pid namespace) and to `unshare`; waits.
    pub fn kill(&mut self) {
        let _ = self.signal(libc::SIGKILL);
        let _ = self.outer.kill();
        if let Ok(status) = self.outer.wait() {
            self.exited = Some(status);
        }
    }

    /// SIGTERM, and SIGKILL if it has not ended after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let _ = self.signal(libc::SIGTERM);
        match self.wait_timeout(grace) {
            Ok(status) => Some(status),
            Err(_) => {
                self.kill();
                None
            }
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if !matches!(self.try_wait(), Ok(Some(_))) {
            self.kill();
        }
    }
}

/// Appends the container's output to `log` line by line (several containers share one log),
/// and keeps the first line containing `marker`.
fn copy_output(reader: std::io::PipeReader, log: &Path, marker: &str, marked: Arc<OnceLock<String>>) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    let marker = marker.to_string();
    std::thread::Builder::new().name("container-output".into()).spawn(move || {
        let mut reader = std::io::BufReader::new(reader);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let _ = file.write_all(&line);
            if marked.get().is_none() {
                let plain = crate::cluster::strip_ansi(&String::from_utf8_lossy(&line));
                if plain.contains(&marker) {
                    let _ = marked.set(plain.trim_end().to_string());
                }
            }
            line.clear();
        }
    })?;
    Ok(())
}

/// What `/proc/<pid>/status` and `/proc/<pid>/ns` say about a process: how a test checks that
/// a container is what it should be.
#[derive(Debug)]
pub struct ProcessView {
    /// `NSpid:` from the outermost namespace to the process's own.
    pub ns_pids: Vec<u32>,
    pub uid: u32,
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    /// Inode numbers of its namespaces.
    pub mnt_ns: u64,
    pub pid_ns: u64,
    pub net_ns: u64,
}

impl ProcessView {
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
        let field = |name: &str| -> anyhow::Result<&str> {
            status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim).with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        let hex = |name: &str| -> anyhow::Result<u64> { Ok(u64::from_str_radix(field(name)?, 16)?) };
        let ns = |kind: &str| -> anyhow::Result<u64> { Ok(fs::metadata(format!("/proc/{pid}/ns/{kind}"))?.ino()) };
        Ok(Self {
            ns_pids: field("NSpid")?.split_whitespace().map(str::parse).collect::<Result<_, _>>()?,
            uid: field("Uid")?.split_whitespace().next().context("Uid")?.parse()?,
            cap_eff: hex("CapEff")?,
            cap_prm: hex("CapPrm")?,
            cap_bnd: hex("CapBnd")?,
            cap_amb: hex("CapAmb")?,
            no_new_privs: field("NoNewPrivs")? == "1",
            mnt_ns: ns("mnt")?,
            pid_ns: ns("pid")?,
            net_ns: ns("net")?,
        })
    }

    /// Its pid inside its own pid namespace.
    pub fn own_pid(&self) -> u32 {
        self.ns_pids.last().copied().unwrap_or(0)
    }
}

/// The mount points of a process's mount namespace with their filesystem type and options
/// (`/proc/<pid>/mountinfo`), the last mount on each point (the visible one).
pub fn mounts_of(pid: u32) -> anyhow::Result<std::collections::BTreeMap<String, (String, String)>> {
    let text = fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let mut mounts = std::collections::BTreeMap::new();
    for line in text.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let (left, right) = line.split_once(" - ").with_context(|| format!("mountinfo line {line:?}"))?;
        let l: Vec<&str> = left.split_whitespace().collect();
        let fstype = right.split_whitespace().next().unwrap_or_default();
        if l.len() >= 6 {
            mounts.insert(l[4].to_string(), (fstype.to_string(), l[5].to_string()));
        }
    }
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifests_capabilities_are_read() {
        let proxy = Security::node_proxy().unwrap();
        assert!(proxy.capabilities.contains(&"BPF".to_string()) && proxy.capabilities.contains(&"NET_ADMIN".to_string()), "{proxy:?}");
        assert_eq!((proxy.run_as_user, proxy.no_new_privs), (0, false), "{proxy:?}");
        let ca = Security::ca().unwrap();
        assert_eq!(ca, Security { capabilities: vec![], run_as_user: 65532, run_as_group: 65532, no_new_privs: true });
    }

    #[test]
    fn a_manifest_the_harness_cannot_model_is_refused() {
        let yaml = "kind: DaemonSet\nmetadata: {name: x}\nspec: {template: {spec: {containers: [{name: c, securityContext: {capabilities: {add: [BPF]}}}]}}}\n";
        let err = from_manifest(("x.yaml", yaml), "DaemonSet", "x", "c").unwrap_err();
        assert!(err.to_string().contains("drops []"), "{err}");
        let yaml = "kind: DaemonSet\nmetadata: {name: x}\nspec: {template: {spec: {containers: [{name: c, securityContext: {capabilities: {drop: [ALL], add: [BFP]}}}]}}}\n";
        let err = from_manifest(("x.yaml", yaml), "DaemonSet", "x", "c").unwrap_err();
        assert!(err.to_string().contains("unknown capability \"BFP\""), "{err}");
    }

    #[test]
    fn capability_masks_match_the_kernels_bits() {
        let s = Security { capabilities: vec!["NET_ADMIN".into(), "SYS_ADMIN".into(), "PERFMON".into(), "BPF".into()], run_as_user: 0, run_as_group: 0, no_new_privs: false };
        assert_eq!(s.mask(), 0x0000_00c0_0020_1000);
    }
}
