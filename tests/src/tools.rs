//! Tools outside this workspace's binaries that the tests run: the Python venv that
//! `cargo xtask setup` makes for the gRPC probes, and those probe scripts.
use std::path::PathBuf;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace").to_path_buf()
}

/// The venv's interpreter (`<workspace>/target/pyenv/bin/python`, with grpcio installed).
pub fn python() -> PathBuf {
    let p = workspace().join("target/pyenv/bin/python");
    assert!(p.is_file(), "{} not found: run `cargo xtask setup` (it creates the venv with grpcio)", p.display());
    p
}

/// A gRPC probe script under `tests/grpc/`: `probe_server.py` or `probe_client.py`.
pub fn grpc_script(name: &str) -> PathBuf {
    let p = workspace().join("tests/grpc").join(name);
    assert!(p.is_file(), "{} not found", p.display());
    p
}
