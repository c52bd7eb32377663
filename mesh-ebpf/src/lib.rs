#![no_std]
//! Build-dependency anchor: lets cargo rebuild mesh-node when the eBPF programs change.
