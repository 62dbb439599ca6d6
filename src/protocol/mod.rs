//! MQTT on the wire: packets of each protocol version (`v3`: 3.1.1 and 3.1;
//! `v5`: 5.0), topics, the application message and its encoded frames.
//! This floor imports nothing else of the crate.

pub mod message;
pub mod topic;
pub mod v3;
// Only the fuzz target and the unit tests use the MQTT 5 codec until the
// connection speaks MQTT 5 (issue 12); the expectation fails the build
// once it does, so that this line goes.
#[expect(
    dead_code,
    unused_imports,
    reason = "the MQTT 5 codec is not wired into the connection yet"
)]
pub mod v5;
