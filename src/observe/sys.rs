//! The `$SYS/broker/...` topics (Mosquitto's names): the broker-wide totals
//! as topic and value pairs, from the counter table
//! ([`crate::observe::counters`]). Publishing them is the shard's part
//! (`shard::sys`): every `sys_interval` each shard sends a snapshot
//! to shard 0, which sums them and publishes these as retained QoS 0
//! messages, so a client subscribing to `$SYS/#` gets them at once.

use std::time::Duration;

use crate::observe::counters::{Counters, SCALARS};

/// The `$SYS` topics and values for broker-wide totals: the version, the
/// uptime, and every row of the counter table that names a `$SYS` topic.
pub fn sys_messages(total: &Counters, uptime: Duration) -> Vec<(&'static str, String)> {
    let mut messages = vec![
        (
            "$SYS/broker/version",
            format!("fanmq {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", uptime.as_secs()),
        ),
    ];
    messages.extend(
        SCALARS
            .iter()
            .filter_map(|row| Some((row.sys?, (row.get)(total).to_string()))),
    );
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_and_topics_use_mosquitto_names() {
        let mut a = Counters {
            clients_connected: 2,
            sessions: 3,
            bytes_sent: 10,
            ..Counters::default()
        };
        a.complete();
        let mut total = Counters::default();
        total.add(&a);
        total.add(&a);
        assert_eq!(total.clients_connected, 4);
        assert_eq!(total.bytes_sent, 20);
        let msgs = sys_messages(&total, Duration::from_secs(5));
        let get = |t: &str| msgs.iter().find(|(k, _)| *k == t).map(|(_, v)| v.clone());
        assert_eq!(get("$SYS/broker/clients/connected").as_deref(), Some("4"));
        assert_eq!(
            get("$SYS/broker/clients/disconnected").as_deref(),
            Some("2")
        );
        assert_eq!(get("$SYS/broker/uptime").as_deref(), Some("5 seconds"));
    }
}
