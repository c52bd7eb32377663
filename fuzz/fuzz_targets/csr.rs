#![no_main]
//! See mesh_node::fuzzing::csr.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzzing::csr(data));
