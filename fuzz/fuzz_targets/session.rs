//! A shard with a few clients driven by an arbitrary sequence of packets
//! and operations (see `fanmq::fuzzing::session`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fanmq::fuzzing::session(data);
});
