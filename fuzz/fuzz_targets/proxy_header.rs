//! The PROXY protocol header parser on arbitrary bytes (see
//! `fanmq::fuzzing::proxy_header`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fanmq::fuzzing::proxy_header(data);
});
