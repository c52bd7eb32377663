#![no_main]
//! See mesh_node::fuzzing::admin_request.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzzing::admin_request(data));
