#![no_main]
//! See mesh_node::fuzzing::hbone_connect.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzzing::hbone_connect(data));
