//! Where the binaries under test are: `mesh-node`, `meshctl` and `mesh-probe`, next to the
//! test binary (same profile). `cargo xtask test` builds them first; cargo cannot build them
//! from inside a running test because it holds the target directory's lock.
use std::{path::PathBuf, sync::OnceLock};

fn bin_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("MESH_BIN_DIR") {
            return PathBuf::from(dir);
        }
        // target/<profile>/deps/<test-binary> or target/<profile>/<binary>
        let exe = std::env::current_exe().expect("current_exe");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        dir
    })
}

pub fn path(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not found (run `cargo xtask test`, or `cargo build --bins` before `cargo test`)", p.display());
    p
}
