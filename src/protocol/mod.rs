//! MQTT on the wire: packets, topics, the application message.

pub mod message;
pub mod topic;
pub mod v3;
