//! Sockets below MQTT: transports (TLS, WebSocket), admission limits.

pub(crate) mod admission;
pub(crate) mod fd;
pub(crate) mod poller;
pub mod transport;
