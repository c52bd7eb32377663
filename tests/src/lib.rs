//! The simulated cluster the end-to-end tests, the demo and the benchmark run on.
pub mod bins;
pub mod cluster;
pub mod container;
pub mod report;
pub mod sys;
pub mod tools;

pub use cluster::{ClusterSpec, SimCluster};

/// Polls `cond` every 50 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
