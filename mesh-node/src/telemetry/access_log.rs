//! Access logs on stdout, one line per HTTP request or TCP connection, in Envoy's (Istio's)
//! default text layout or as JSON with Istio's JSON field names.
use std::{
    io::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    #[default]
    Off,
    Text,
    Json,
}

impl std::str::FromStr for AccessLogFormat {
    type Err = super::TelemetryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(super::TelemetryError::AccessLogFormat(s.to_string())),
        }
    }
}

/// One line's fields. `None` prints as Envoy's "-".
#[derive(Serialize)]
pub struct AccessEntry<'a> {
    pub start_time: String,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub protocol: &'a str,
    pub response_code: u16,
    pub response_flags: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Milliseconds.
    pub duration: u64,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub upstream_host: Option<String>,
    pub upstream_cluster: Option<&'a str>,
    pub downstream_remote_address: String,
    pub source_workload: String,
    pub source_principal: &'a str,
    pub destination_workload: String,
    pub destination_principal: &'a str,
    pub reporter: &'a str,
    pub trace_id: Option<String>,
}

impl AccessEntry<'_> {
    fn text(&self) -> String {
        let d = |v: Option<&str>| v.unwrap_or("-").to_string();
        format!(
            "[{}] \"{} {} {}\" {} {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" {} {} src={} {} dst={} {} reporter={} trace={}\n",
            self.start_time,
            d(self.method),
            d(self.path),
            self.protocol,
            self.response_code,
            self.response_flags,
            self.bytes_received,
            self.bytes_sent,
            self.duration,
            d(self.user_agent),
            d(self.request_id),
            d(self.authority),
            d(self.upstream_host.as_deref()),
            d(self.upstream_cluster),
            self.downstream_remote_address,
            self.source_workload,
            self.source_principal,
            self.destination_workload,
            self.destination_principal,
            self.reporter,
            d(self.trace_id.as_deref()),
        )
    }
}

/// Lines are buffered and written in batches: a write per request would cost a system call
/// per request. The buffer is flushed when it fills and at least every [`FLUSH`].
const FLUSH: Duration = Duration::from_millis(100);
const BUFFER: usize = 64 * 1024;

pub struct AccessLog {
    format: AccessLogFormat,
    buffer: Arc<Mutex<Vec<u8>>>,
}

fn flush(buffer: &Mutex<Vec<u8>>) {
    let mut b = buffer.lock().unwrap_or_else(|e| e.into_inner());
    if !b.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&b);
        let _ = out.flush();
        b.clear();
    }
}

impl AccessLog {
    /// With a format other than off, starts the flush task (inside a Tokio runtime).
    pub fn new(format: AccessLogFormat) -> Self {
        let buffer = Arc::new(Mutex::new(Vec::with_capacity(BUFFER)));
        if format != AccessLogFormat::Off {
            let weak = Arc::downgrade(&buffer);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(FLUSH);
                loop {
                    tick.tick().await;
                    let Some(buffer) = weak.upgrade() else { return };
                    flush(&buffer);
                }
            });
        }
        Self { format, buffer }
    }

    pub fn enabled(&self) -> bool {
        self.format != AccessLogFormat::Off
    }

    pub fn write(&self, entry: &AccessEntry) {
        let line = match self.format {
            AccessLogFormat::Off => return,
            AccessLogFormat::Text => entry.text(),
            AccessLogFormat::Json => {
                let mut s = serde_json::to_string(entry).unwrap_or_default();
                s.push('\n');
                s
            }
        };
        let full = {
            let mut b = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
            b.extend_from_slice(line.as_bytes());
            b.len() >= BUFFER
        };
        if full {
            flush(&self.buffer);
        }
    }
}

impl AccessLog {
    /// Writes out buffered lines now (at shutdown).
    pub fn flush(&self) {
        flush(&self.buffer);
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        flush(&self.buffer);
    }
}

/// `2024-05-01T12:00:00.123Z`, as Envoy's %START_TIME%.
pub fn rfc3339(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}
