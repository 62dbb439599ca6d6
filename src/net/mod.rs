//! Sockets below MQTT: transports (TLS, WebSocket), admission limits.

pub mod admission;
pub mod transport;
