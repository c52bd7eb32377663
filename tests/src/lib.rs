//! The simulated cluster the end-to-end tests, the demo and the benchmark run on.
pub mod bins;
pub mod cluster;
pub mod container;
pub mod report;
pub mod sys;
pub mod tools;

pub use cluster::{ClusterSpec, SimCluster};
