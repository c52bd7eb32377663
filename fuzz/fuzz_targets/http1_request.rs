#![no_main]
//! See mesh_node::fuzzing::http1_request.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzzing::http1_request(data));
