//! Sockets below MQTT: transports (TLS, WebSocket), admission limits, the
//! PROXY protocol.

pub(crate) mod admission;
pub(crate) mod fd;
pub mod framing;
pub(crate) mod poller;
pub mod proxy;
pub mod transport;
pub(crate) mod waiting;
