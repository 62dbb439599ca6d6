//! MQTT on the wire: packets of each protocol version (`v3`: 3.1.1 and 3.1;
//! `v5`: 5.0), topics, the application message and its encoded frames.
//! This floor imports nothing else of the crate.

pub mod message;
pub mod topic;
pub mod v3;
pub mod v5;

/// The protocol a connection speaks, which decides how its packets are
/// decoded and its frames encoded. Sessions, the router and the queues are
/// otherwise the same for both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1 (level 4) or MQTT 3.1 (level 3): the same wire format for
    /// everything a server sends ([`v3`]).
    #[default]
    V3,
    /// MQTT 5.0 (level 5, [`v5`]).
    V5,
}
