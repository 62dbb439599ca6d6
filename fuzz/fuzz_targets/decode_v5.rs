//! The MQTT 5.0 packet decoder on arbitrary bytes, whole and split into chunks
//! (see `fanmq::protocol::v5::fuzz::decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fanmq::protocol::v5::fuzz::decode(data);
});
