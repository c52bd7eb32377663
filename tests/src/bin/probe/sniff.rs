//! `mesh-probe sniff`: a packet capture on one interface (an AF_PACKET raw socket, like tcpdump
//! without the filter language) that answers one question: did these bytes cross the wire?
//!
//! Counts every frame and byte seen in both directions, the TCP payload per port, and the frames
//! in which the marker appears. TCP payloads are searched together with the tail of the
//! previous segment of the same flow, so a marker split over two segments is still found.
//! Prints `{"ready": true}` once the socket is bound (a test starts its traffic after that line),
//! then one JSON report when `--seconds` are up.
use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    io::{self, Write as _},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

#[derive(clap::Args)]
pub struct SniffArgs {
    /// Interface to capture on (in the caller's network namespace); `any` for all of them.
    #[arg(long)]
    pub iface: String,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Bytes to look for (as text); repeat for several markers.
    #[arg(long = "marker")]
    pub markers: Vec<String>,
    /// Stop early once this many frames were seen (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_frames: u64,
    /// Also stop (and report) as soon as stdin reaches end of file: how a test ends the capture
    /// when its traffic is done (needs a piped stdin; /dev/null would stop it at once).
    #[arg(long)]
    pub stop_on_eof: bool,
}

const ETH_P_ALL: u16 = 0x0003;
const ETH_HEADER: usize = 14;

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

fn check(ret: i32, what: &str) -> io::Result<i32> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(ret)
}

fn open_socket(iface: &str) -> io::Result<Fd> {
    let fd = Fd(check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, (ETH_P_ALL.to_be()) as i32) }, "socket(AF_PACKET)")?);
    let ifindex = if iface == "any" {
        0
    } else {
        let name = CString::new(iface).map_err(io::Error::other)?;
        let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if idx == 0 {
            return Err(io::Error::other(format!("no interface {iface}")));
        }
        idx as i32
    };
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = ifindex;
    check(
        unsafe { libc::bind(fd.0, (&addr as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) },
        "bind(AF_PACKET)",
    )?;
    // Room for bursts, so the kernel drops nothing while the report is busy searching.
    let rcvbuf: i32 = 32 << 20;
    unsafe {
        libc::setsockopt(fd.0, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&rcvbuf as *const i32).cast(), 4);
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    check(
        unsafe { libc::setsockopt(fd.0, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32) },
        "SO_RCVTIMEO",
    )?;
    Ok(fd)
}

fn drops(fd: &Fd) -> u64 {
    let mut stats = libc::tpacket_stats { tp_packets: 0, tp_drops: 0 };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as u32;
    let ret = unsafe { libc::getsockopt(fd.0, libc::SOL_PACKET, libc::PACKET_STATISTICS, (&mut stats as *mut libc::tpacket_stats).cast(), &mut len) };
    if ret < 0 { 0 } else { u64::from(stats.tp_drops) }
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.len() >= needle.len() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// (source, source port, destination, destination port)
type Flow = (Ipv4Addr, u16, Ipv4Addr, u16);

/// A TCP segment's flow and payload, if the frame is Ethernet/IPv4/TCP.
fn tcp_payload(frame: &[u8]) -> Option<(Flow, &[u8])> {
    if frame.len() < ETH_HEADER + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_HEADER..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip[9] != 6 || ihl < 20 || ip.len() < ihl + 20 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // GSO frames may carry 0 as total length; then take what was captured.
    let ip = if total >= ihl + 20 && total <= ip.len() { &ip[..total] } else { ip };
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = &ip[ihl..];
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let off = usize::from(tcp[12] >> 4) * 4;
    if off < 20 || tcp.len() < off {
        return None;
    }
    Some(((src, sport, dst, dport), &tcp[off..]))
}

pub fn run(args: SniffArgs) -> anyhow::Result<bool> {
    let fd = open_socket(&args.iface)?;
    let markers: Vec<Vec<u8>> = args.markers.iter().map(|m| m.as_bytes().to_vec()).collect();
    let keep = markers.iter().map(Vec::len).max().unwrap_or(1).saturating_sub(1);
    {
        let mut out = io::stdout().lock();
        writeln!(out, "{}", serde_json::json!({"ready": true, "iface": args.iface}))?;
        out.flush()?;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if args.stop_on_eof {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds.clamp(0.0, 600.0));
    let mut buf = vec![0u8; 256 * 1024];
    let (mut frames, mut bytes, mut truncated) = (0u64, 0u64, 0u64);
    let mut hits = vec![0u64; markers.len()];
    let mut first_hit: Vec<Option<String>> = vec![None; markers.len()];
    let mut tcp_payload_by_port: BTreeMap<u16, u64> = BTreeMap::new();
    let mut tcp_frames_by_port: BTreeMap<u16, u64> = BTreeMap::new();
    let mut tails: HashMap<Flow, Vec<u8>> = HashMap::new();
    let mut scratch = Vec::with_capacity(buf.len() + keep);
    while Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::SeqCst) && (args.max_frames == 0 || frames < args.max_frames) {
        let n = unsafe { libc::recv(fd.0, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => continue,
                _ => return Err(e.into()),
            }
        }
        let n = n as usize;
        if n > buf.len() {
            truncated += 1;
        }
        let frame = &buf[..n.min(buf.len())];
        frames += 1;
        bytes += n as u64;
        let (searched, label): (&[u8], String) = match tcp_payload(frame) {
            Some((flow, payload)) => {
                // Counted on the server port: the lower of the two (15008, 15012, 80, ...).
                let port = flow.1.min(flow.3);
                *tcp_payload_by_port.entry(port).or_default() += payload.len() as u64;
                *tcp_frames_by_port.entry(port).or_default() += 1;
                scratch.clear();
                let tail = tails.entry(flow).or_default();
                scratch.extend_from_slice(tail);
                scratch.extend_from_slice(payload);
                if !payload.is_empty() {
                    let from = scratch.len().saturating_sub(keep);
                    *tail = scratch[from..].to_vec();
                }
                (&scratch[..], format!("{}:{} -> {}:{}", flow.0, flow.1, flow.2, flow.3))
            }
            None => (frame, "non-TCP frame".to_string()),
        };
        for (i, m) in markers.iter().enumerate() {
            if find(searched, m) || find(frame, m) {
                hits[i] += 1;
                first_hit[i].get_or_insert_with(|| label.clone());
            }
        }
    }
    let report = serde_json::json!({
        "iface": args.iface,
        "frames": frames,
        "bytes": bytes,
        "truncated": truncated,
        "drops": drops(&fd),
        "tcp_payload_by_port": tcp_payload_by_port,
        "tcp_frames_by_port": tcp_frames_by_port,
        "markers": args.markers.iter().zip(&hits).zip(&first_hit).map(|((m, h), f)| serde_json::json!({"marker": m, "frames": h, "first": f})).collect::<Vec<_>>(),
        "marker_frames": hits.iter().sum::<u64>(),
    });
    println!("{report}");
    Ok(true)
}
