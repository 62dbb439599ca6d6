//! The packet decoder on arbitrary bytes, whole and split into chunks
//! (see `fanmq::fuzzing::decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fanmq::fuzzing::decode(data);
});
