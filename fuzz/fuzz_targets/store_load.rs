//! The persistence loader's reading of a segment on arbitrary bytes (see
//! `fanmq::fuzzing::store_load`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fanmq::fuzzing::store_load(data);
});
