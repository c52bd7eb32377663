#![no_main]
//! See mesh_node::fuzzing::sniff.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzzing::sniff(data));
