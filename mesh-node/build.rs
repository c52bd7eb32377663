//! Builds the eBPF programs of `mesh-ebpf` with the nightly toolchain and bpf-linker, so that
//! `mesh-node` can embed the object file; and, in release builds, links the data path's hot
//! functions together (`hot-symbols.txt`, written by `cargo xtask hot-symbols`).
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    order_hot_symbols();
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .ok_or_else(|| anyhow!("mesh-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("mesh-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir: &root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

/// The kernel maps code 64 KiB around each page first touched: the data path's functions spread
/// over all of `.text` keep most of it resident, laid out together they take a few pages. Only
/// for release builds of the node binary on x86_64 Linux with glibc, where rustc links with its
/// own lld (`--symbol-ordering-file` is lld's); `MESH_NO_SYMBOL_ORDER=1` turns it off, e.g. for
/// another linker. Symbols the file names that no longer exist are skipped.
fn order_hot_symbols() {
    println!("cargo:rerun-if-env-changed=MESH_NO_SYMBOL_ORDER");
    let order = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hot-symbols.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let wanted = var("PROFILE") == "release"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && std::env::var_os("MESH_NO_SYMBOL_ORDER").is_none();
    if wanted && order.is_file() {
        println!("cargo:rustc-link-arg-bin=mesh-node=-Wl,--symbol-ordering-file={}", order.display());
        println!("cargo:rustc-link-arg-bin=mesh-node=-Wl,--no-warn-symbol-ordering");
    }
}
