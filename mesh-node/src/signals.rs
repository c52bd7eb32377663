//! SIGTERM and SIGINT handlers, installed before anything else a command does.
//!
//! In a pod the process is PID 1 of its own pid namespace, and the kernel gives PID 1 no
//! default signal action: a SIGTERM or SIGINT it has no handler for is discarded, whether it
//! comes from inside the pod or from the container runtime outside (only SIGKILL and SIGSTOP
//! from an ancestor namespace get through). So the handlers must exist before any step that can
//! take time (the first list from the API server, waiting for certificates): otherwise a pod
//! deleted while starting ignores its SIGTERM and is killed at the end of its grace period,
//! without handing the capture back.
//!
//! As PID 1 the process also inherits orphans of its namespace. mesh-node starts no child
//! processes and the container runs nothing else, so there is nothing to reap: no SIGCHLD
//! handler and no reaper loop (which could also steal the exit status of a child some library
//! waits for).
use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The two shutdown signals; each `recv` waits for the next of either.
pub struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    /// Installs the handlers (from here on neither signal is lost, even as PID 1). Needs the
    /// Tokio runtime.
    pub fn install() -> io::Result<Self> {
        let term = signal(SignalKind::terminate()).map_err(|e| io::Error::new(e.kind(), format!("installing the SIGTERM handler: {e}")))?;
        let int = signal(SignalKind::interrupt()).map_err(|e| io::Error::new(e.kind(), format!("installing the SIGINT handler: {e}")))?;
        Ok(Self { term, int })
    }

    /// Waits for SIGTERM or SIGINT and says which.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the handlers installed a SIGTERM is delivered to `recv` instead of ending the
    /// process (which is what would happen to a process that is not PID 1 without them, and
    /// what PID 1 would silently drop).
    #[tokio::test]
    async fn sigterm_reaches_recv() {
        let mut shutdown = Shutdown::install().unwrap();
        // SAFETY: signals this very process, whose SIGTERM handler is installed above.
        assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), shutdown.recv()).await;
        assert_eq!(got.expect("the signal arrives"), "SIGTERM");
    }
}
