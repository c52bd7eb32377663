# syntax=docker/dockerfile:1
# mesh-node image: the node daemon (`mesh-node run`, `mesh-node ca`, `mesh-node validate`) and
# meshctl.   docker build -t ghcr.io/mesh/mesh-node:0.1.0 .

# --- build --------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder

# The eBPF programs (mesh-ebpf) are built by mesh-node's build.rs with `rustup run nightly`
# (build-std needs rust-src) and linked by bpf-linker 0.10.4, which uses the nightly's own
# LLVM 22 (no system LLVM needed).
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && llvm="$(rustc +nightly -vV | sed -n 's/^LLVM version: //p')" \
 && case "$llvm" in 22.*) ;; *) echo "nightly uses LLVM $llvm; bpf-linker 0.10.4 needs LLVM 22: pin a nightly-YYYY-MM-DD" >&2; exit 1;; esac \
 && cargo install bpf-linker@0.10.4 --locked

WORKDIR /src
# Only what the workspace needs (keeps target/ and other local state out of the image).
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY mesh-common mesh-common
COPY mesh-ebpf mesh-ebpf
COPY mesh-node mesh-node
COPY tests tests
COPY xtask xtask
RUN cargo build --release --locked -p mesh-node \
 && install -D -m 0755 target/release/mesh-node /out/mesh-node \
 && install -D -m 0755 target/release/meshctl /out/meshctl

# --- runtime ------------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY --from=builder /out/mesh-node /out/meshctl /usr/local/bin/
# `kubectl mesh ...` works when meshctl is installed as kubectl-mesh.
RUN ln -s meshctl /usr/local/bin/kubectl-mesh

# 15001 outbound, 15008 inbound tunnels (HBONE), 15012 CA, 15020 metrics, 15021 readiness.
# The admin API (15000) listens on loopback only: use meshctl inside the pod or port-forward.
EXPOSE 15001 15008 15012 15020 15021
ENTRYPOINT ["/usr/local/bin/mesh-node"]
CMD ["--help"]
