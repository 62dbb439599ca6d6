//! Wire protocols the broker speaks, one module per MQTT version.

pub mod v5;
