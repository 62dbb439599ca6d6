//! MQTT on the wire: packets, topics, the application message.

pub mod codec;
pub mod message;
pub mod topic;
