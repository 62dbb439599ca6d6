//! The MQTT 5.0 packet decoder on arbitrary bytes, whole and split into chunks
//! (see `fanmq::fuzzing::decode_v5`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fanmq::fuzzing::decode_v5(data);
});
