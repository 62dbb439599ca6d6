//! Sockets below MQTT: transports (TLS, WebSocket), admission limits.

pub mod admission;
pub mod fd;
pub mod poller;
pub mod transport;
