#![no_main]
//! See mesh_node::fuzzing::config_yaml.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_node::fuzzing::config_yaml(data));
