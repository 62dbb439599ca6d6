//! The one table of the broker's counters and gauges.
//!
//! Every figure fanmq reports is one row of [`counter_table!`] below: its
//! field, its kind (counter or gauge), how shards combine (sum, or the
//! largest for figures every shard holds a replica of), its Prometheus name,
//! its per-shard Prometheus name, its `$SYS` topic (Mosquitto's names) and its
//! help text. From that one list the macro generates:
//!
//! - [`Counters`], the plain numbers a shard counts in (no atomics on the data
//!   path) and the broker-wide sum (`/api/v1/stats` serialises it);
//! - [`Counters::add`], which sums shards;
//! - [`AtomicCounters`], the atomic mirror a shard stores into and the admin
//!   thread loads from;
//! - [`SCALARS`] and [`LABELED`], the rows as data, which the Prometheus
//!   renderer (`crate::observe::metrics`) and the `$SYS` renderer
//!   (`crate::observe::sys`) walk.
//!
//! Adding a figure is one row here; nothing else lists counters.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::net::transport::Transport;

/// Whether Prometheus sees a figure as a counter (only grows) or a gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic since start (rendered with Prometheus's `_total` suffix).
    Counter,
    /// A level that goes up and down.
    Gauge,
}

/// How one figure of several shards combines into the broker's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Each shard counts its own part: the sum.
    Sum,
    /// Each shard holds the whole (the retained store is replicated) or the
    /// figure is a maximum: the largest.
    Max,
}

impl Merge {
    /// Combines a running total `a` with another shard's `b`.
    pub fn apply(self, a: u64, b: u64) -> u64 {
        match self {
            Merge::Sum => a.saturating_add(b),
            Merge::Max => a.max(b),
        }
    }
}

/// One scalar row of the table, as data for the renderers.
#[derive(Clone, Copy, Debug)]
pub struct Scalar {
    /// Counter or gauge.
    pub kind: Kind,
    /// The broker-wide Prometheus metric (without the `fanmq_` prefix), if
    /// exported as a scalar.
    pub prometheus: Option<&'static str>,
    /// The per-shard Prometheus metric (label `shard`), if any.
    pub per_shard: Option<&'static str>,
    /// The `$SYS` topic that carries the broker-wide value, if any.
    pub sys: Option<&'static str>,
    /// What the figure means (Prometheus HELP, and the field's doc).
    pub help: &'static str,
    /// Reads the figure.
    pub get: fn(&Counters) -> u64,
}

/// One labelled row of the table (an array of figures, one per label value).
#[derive(Clone, Copy, Debug)]
pub struct Labeled {
    /// Counter or gauge.
    pub kind: Kind,
    /// The Prometheus label's name.
    pub label: &'static str,
    /// The label value of each index.
    pub value: fn(usize) -> &'static str,
    /// The Prometheus metric family (without the `fanmq_` prefix), if any.
    pub prometheus: Option<&'static str>,
    /// What the figure means.
    pub help: &'static str,
    /// Reads the figures.
    pub get: fn(&Counters) -> &[u64],
}

/// Number of QoS levels, the length of the per-QoS arrays.
pub const NR_QOS: usize = 3;

/// Number of transports, the length of the per-listener arrays.
pub const NR_LISTENERS: usize = Transport::ALL.len();

/// The `qos` label value of index `i`.
fn qos_label(i: usize) -> &'static str {
    ["0", "1", "2"].get(i).copied().unwrap_or("?")
}

/// The `listener` label value of index `i`.
fn listener_label(i: usize) -> &'static str {
    Transport::ALL.get(i).map_or("?", |t| t.name())
}

/// Declares [`Counters`], [`AtomicCounters`], [`SCALARS`] and [`LABELED`]
/// from one list of rows (see the module documentation).
macro_rules! counter_table {
    (
        scalars {
            $( $name:ident: $kind:ident $merge:ident,
               prometheus $prom:expr, per_shard $shard:expr, sys $sys:expr,
               help $help:literal; )*
        }
        labeled {
            $( $lname:ident[$len:expr]: $lkind:ident, label $label:literal = $value:expr,
               prometheus $lprom:expr, help $lhelp:literal; )*
        }
    ) => {
        /// Counters and gauges of one shard, or of the broker once summed.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
        pub struct Counters {
            $( #[doc = $help] pub $name: u64, )*
            $( #[doc = $lhelp] pub $lname: [u64; $len], )*
        }

        impl Counters {
            /// Adds another shard's figures, each as its row says.
            pub fn add(&mut self, other: &Counters) {
                $( self.$name = Merge::$merge.apply(self.$name, other.$name); )*
                $( for (s, o) in self.$lname.iter_mut().zip(&other.$lname) {
                    *s = s.saturating_add(*o);
                } )*
            }
        }

        /// A shard's [`Counters`] as atomics: stored by the shard (relaxed,
        /// every refresh), loaded by the admin thread.
        #[derive(Debug, Default)]
        pub struct AtomicCounters {
            $( #[doc = $help] $name: AtomicU64, )*
            $( #[doc = $lhelp] $lname: [AtomicU64; $len], )*
        }

        impl AtomicCounters {
            /// Stores a shard's figures.
            pub fn store(&self, c: &Counters) {
                $( self.$name.store(c.$name, Ordering::Relaxed); )*
                $( for (slot, v) in self.$lname.iter().zip(&c.$lname) {
                    slot.store(*v, Ordering::Relaxed);
                } )*
            }

            /// Loads the figures last stored.
            pub fn load(&self) -> Counters {
                Counters {
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                    $( $lname: std::array::from_fn(|i| self.$lname[i].load(Ordering::Relaxed)), )*
                }
            }
        }

        /// The scalar rows, in table order.
        pub const SCALARS: &[Scalar] = &[
            $( Scalar {
                kind: Kind::$kind,
                prometheus: $prom,
                per_shard: $shard,
                sys: $sys,
                help: $help,
                get: |c: &Counters| c.$name,
            }, )*
        ];

        /// The labelled rows, in table order.
        pub const LABELED: &[Labeled] = &[
            $( Labeled {
                kind: Kind::$lkind,
                label: $label,
                value: $value,
                prometheus: $lprom,
                help: $lhelp,
                get: |c: &Counters| -> &[u64] { &c.$lname },
            }, )*
        ];
    };
}

counter_table! {
    scalars {
        // Gauges: a shard fills them in from its state when it takes a
        // snapshot (`shard::sys`).
        clients_connected: Gauge Sum,
            prometheus None, per_shard Some("shard_connections"),
            sys Some("$SYS/broker/clients/connected"),
            help "Connected clients (sessions with a live connection)";
        clients_parked: Gauge Sum,
            prometheus None, per_shard Some("shard_clients_parked"), sys None,
            help "Connections parked (idle, no task)";
        connections_waiting: Gauge Sum,
            prometheus Some("connections_waiting"), per_shard None, sys None,
            help "Accepted sockets whose client has not written yet (no task)";
        sessions: Gauge Sum,
            prometheus Some("sessions"), per_shard None,
            sys Some("$SYS/broker/clients/total"),
            help "Sessions, live or offline";
        clients_disconnected: Gauge Sum,
            prometheus None, per_shard None,
            sys Some("$SYS/broker/clients/disconnected"),
            help "Offline persistent sessions (sessions less connected clients)";
        subscriptions: Gauge Sum,
            prometheus Some("subscriptions"), per_shard Some("shard_subscriptions"),
            sys Some("$SYS/broker/subscriptions/count"),
            help "Subscriptions";
        retained: Gauge Max,
            prometheus Some("retained_messages"), per_shard None,
            sys Some("$SYS/broker/retained messages/count"),
            help "Retained messages (every shard holds a full replica)";
        shared_groups: Gauge Max,
            prometheus Some("shared_groups"), per_shard None,
            sys Some("$SYS/broker/shared_subscriptions/groups"),
            help "Shared subscription groups (every shard holds a full replica)";
        shared_members: Gauge Max,
            prometheus Some("shared_members"), per_shard None,
            sys Some("$SYS/broker/shared_subscriptions/members"),
            help "Members of shared subscription groups, all groups together";
        queued_messages: Gauge Sum,
            prometheus None, per_shard Some("shard_queued_messages"), sys None,
            help "PUBLISH packets queued for live clients, not yet written";
        queued_bytes: Gauge Sum,
            prometheus None, per_shard Some("shard_queued_bytes"),
            sys Some("$SYS/broker/queued/bytes"),
            help "Bytes queued to clients, not yet written (what max_queued_bytes_total bounds)";
        max_client_queue_bytes: Gauge Max,
            prometheus None, per_shard Some("shard_max_client_queue_bytes"), sys None,
            help "Largest single client queue, in bytes (a slow subscriber shows here first)";
        pending_messages: Gauge Sum,
            prometheus None, per_shard Some("shard_pending_messages"), sys None,
            help "QoS 1/2 messages waiting for a free slot in an inflight window";
        // Counters, kept by the shard as things happen.
        connections_accepted: Counter Sum,
            prometheus None, per_shard None, sys None,
            help "TCP connections accepted";
        connections_refused: Counter Sum,
            prometheus Some("connections_refused"), per_shard None,
            sys Some("$SYS/broker/connections/refused"),
            help "Connections closed at once because max_connections was reached";
        accept_errors: Counter Sum,
            prometheus Some("accept_errors"), per_shard None, sys None,
            help "Failed accept calls (e.g. out of file descriptors)";
        packets_received: Counter Sum,
            prometheus Some("packets_received"), per_shard None,
            sys Some("$SYS/broker/messages/received"),
            help "MQTT packets received";
        pingreq_parked: Counter Sum,
            prometheus Some("pingreq_parked"), per_shard None, sys None,
            help "PINGREQs of parked connections answered without waking them";
        ack_patience_expired: Counter Sum,
            prometheus Some("ack_patience_expired"), per_shard None, sys None,
            help "Waits for a batch of acknowledgements that ended at the 50 ms patience, reading what had arrived";
        publish_received: Counter Sum,
            prometheus None, per_shard Some("shard_messages_received"),
            sys Some("$SYS/broker/publish/messages/received"),
            help "PUBLISH packets received";
        publish_sent: Counter Sum,
            prometheus None, per_shard Some("shard_messages_delivered"),
            sys Some("$SYS/broker/publish/messages/sent"),
            help "PUBLISH packets queued to subscribers (deliveries; the sum of publish_sent_by_qos)";
        publish_dropped: Counter Sum,
            prometheus None, per_shard None,
            sys Some("$SYS/broker/publish/messages/dropped"),
            help "PUBLISH packets dropped, every reason";
        dropped_queue_full: Counter Sum,
            prometheus None, per_shard None, sys None,
            help "Of publish_dropped: dropped because a client's queue was full (every drop with no other reason)";
        dropped_sys_topic: Counter Sum,
            prometheus None, per_shard None, sys None,
            help "Of publish_dropped: publishes to $SYS topics by clients";
        dropped_qos2_overflow: Counter Sum,
            prometheus None, per_shard None, sys None,
            help "Of publish_dropped: QoS 2 publishes over max_awaiting_rel";
        bytes_received: Counter Sum,
            prometheus Some("bytes_received"), per_shard None,
            sys Some("$SYS/broker/bytes/received"),
            help "Bytes received from clients";
        bytes_sent: Counter Sum,
            prometheus Some("bytes_sent"), per_shard None,
            sys Some("$SYS/broker/bytes/sent"),
            help "Bytes sent to clients";
        protocol_errors: Counter Sum,
            prometheus Some("protocol_errors"), per_shard None, sys None,
            help "Connections closed for malformed packets or protocol violations";
        auth_failures: Counter Sum,
            prometheus Some("auth_failures"), per_shard None,
            sys Some("$SYS/broker/clients/auth_failed"),
            help "CONNECTs refused by authentication (CONNACK 5: anonymous refused, unknown user, wrong password)";
        connect_refused: Counter Sum,
            prometheus Some("connect_refused"), per_shard None, sys None,
            help "CONNECTs refused with CONNACK 1, 2 or 3 (protocol version, client identifier, server unavailable)";
        log_lines_suppressed: Counter Sum,
            prometheus Some("log_lines_suppressed"), per_shard None, sys None,
            help "Log lines about clients not written: at most one per kind per shard every 10 s";
        publish_denied: Counter Sum,
            prometheus Some("publish_denied"), per_shard None,
            sys Some("$SYS/broker/publish/messages/denied"),
            help "PUBLISH packets (and wills) from clients denied by the ACL (acknowledged, dropped)";
        subscribe_denied: Counter Sum,
            prometheus Some("subscribe_denied"), per_shard None,
            sys Some("$SYS/broker/subscriptions/denied"),
            help "Subscription filters denied by the ACL (SUBACK 0x80)";
        read_denied: Counter Sum,
            prometheus Some("read_denied"), per_shard None, sys None,
            help "Messages not delivered to a subscriber because the ACL denies it read access to their topic (checked only for subscriptions the ACL covers partly)";
        connections_ip_limited: Counter Sum,
            prometheus Some("connections_ip_limited"), per_shard None,
            sys Some("$SYS/broker/connections/refused/per_ip"),
            help "Connections closed after accept because max_connections_per_ip was reached";
        connections_rate_limited: Counter Sum,
            prometheus Some("connections_rate_limited"), per_shard None,
            sys Some("$SYS/broker/connections/refused/rate"),
            help "Connections closed after accept because max_connection_rate was reached";
        connections_ip_rate_limited: Counter Sum,
            prometheus Some("connections_ip_rate_limited"), per_shard None,
            sys Some("$SYS/broker/connections/refused/rate_per_ip"),
            help "Connections closed after accept because their address was over max_connection_rate_per_ip";
        connections_proxy_refused: Counter Sum,
            prometheus Some("connections_proxy_refused"), per_shard None,
            sys Some("$SYS/broker/connections/refused/proxy_protocol"),
            help "Connections closed on a proxy_protocol listener: no valid PROXY protocol header in time";
        subscriptions_refused: Counter Sum,
            prometheus Some("subscriptions_refused"), per_shard None,
            sys Some("$SYS/broker/subscriptions/refused"),
            help "Filters refused by max_subscriptions_per_client or max_topic_levels (SUBACK 0x80)";
        clients_shed: Counter Sum,
            prometheus Some("clients_shed"), per_shard None,
            sys Some("$SYS/broker/clients/shed"),
            help "Non-reading clients disconnected while their shard was over its share of max_queued_bytes_total";
        store_records_written: Counter Sum,
            prometheus Some("store_records_written"), per_shard None, sys None,
            help "Records appended to the persistence journal";
        store_bytes_written: Counter Sum,
            prometheus Some("store_bytes_written"), per_shard None, sys None,
            help "Bytes written to the persistence journal";
        store_fsyncs: Counter Sum,
            prometheus Some("store_fsyncs"), per_shard None, sys None,
            help "fdatasync calls of the persistence journal";
        store_write_errors: Counter Sum,
            prometheus Some("store_write_errors"), per_shard None, sys None,
            help "Persistence journal writes that failed (full disk, I/O error), each retried every second";
        store_disk_full: Gauge Max,
            prometheus Some("store_disk_full"), per_shard None, sys None,
            help "1 while the persistence journal cannot write: retained QoS 1/2 publishes are refused";
        store_snapshots: Counter Sum,
            prometheus Some("store_snapshots"), per_shard None, sys None,
            help "Snapshots of the persistence journals written while running (persistence_snapshot_log_bytes)";
        store_log_bytes: Gauge Sum,
            prometheus Some("store_log_bytes"), per_shard None, sys None,
            help "Bytes of the persistence journals since their last snapshot";
        store_refused: Counter Sum,
            prometheus Some("store_refused"), per_shard None, sys None,
            help "QoS 1/2 publishes not acknowledged because persistence could not store them (5.0: reason 0x97; 3.1.1: connection closed)";
        cluster_sent: Counter Sum,
            prometheus Some("cluster_sent"), per_shard None, sys None,
            help "Messages this node handed to its NATS bridge (each published message once, by the shard it entered on)";
        cluster_send_dropped: Counter Sum,
            prometheus Some("cluster_send_dropped"), per_shard None, sys None,
            help "Messages not handed to the NATS bridge: its queue stayed full for stall_ms (delivered locally only)";
        cluster_received: Counter Sum,
            prometheus Some("cluster_received"), per_shard None, sys None,
            help "Messages from other nodes routed on this node (each once per shard with a subscriber)";
        cluster_doubles_dropped: Counter Sum,
            prometheus Some("cluster_doubles_dropped"), per_shard None, sys None,
            help "Messages from NATS not given again to a session that moved here, which the hand-over's merge gave it already (a NATS cluster's routes)";
        cluster_taken_over: Counter Sum,
            prometheus Some("cluster_taken_over"), per_shard None, sys None,
            help "Take-over requests from other nodes served: each ends this node's session of the client id, if any, and sends its state";
        cluster_link_up: Gauge Max,
            prometheus Some("cluster_link_up"), per_shard None, sys None,
            help "1 while the NATS connection is up (every shard copies the bridge's figures)";
        cluster_connects: Counter Max,
            prometheus Some("cluster_connects"), per_shard None, sys None,
            help "NATS connections made: the first and every reconnect";
        cluster_subscriptions: Gauge Max,
            prometheus Some("cluster_subscriptions"), per_shard None, sys None,
            help "NATS subscriptions this node holds for MQTT filters (one per distinct filter, two for a trailing #)";
        cluster_published: Counter Max,
            prometheus Some("cluster_published"), per_shard None, sys None,
            help "Messages the bridge published to NATS";
        cluster_publish_dropped: Counter Max,
            prometheus Some("cluster_publish_dropped"), per_shard None, sys None,
            help "Messages the bridge did not publish to NATS (link down, or a publish error)";
        cluster_deliver_dropped: Counter Max,
            prometheus Some("cluster_deliver_dropped"), per_shard None, sys None,
            help "Messages from NATS dropped for a shard whose queue from the bridge was full";
        cluster_received_invalid: Counter Max,
            prometheus Some("cluster_received_invalid"), per_shard None, sys None,
            help "Messages from NATS that are no fanmq message (subject or headers), dropped";
        cluster_slow_consumer: Counter Max,
            prometheus Some("cluster_slow_consumer"), per_shard None, sys None,
            help "Slow-consumer events of the NATS client (it dropped messages of a subscription)";
        cluster_kv_errors: Counter Max,
            prometheus Some("cluster_kv_errors"), per_shard None, sys None,
            help "Failed operations on the retained-message and sessions buckets";
        cluster_claims: Counter Max,
            prometheus Some("cluster_claims"), per_shard None, sys None,
            help "Client ids this node's CONNECTs claimed in the sessions bucket";
        cluster_takeovers: Counter Max,
            prometheus Some("cluster_takeovers"), per_shard None, sys None,
            help "Client ids this node took over from another live node (with their session state)";
        cluster_claims_unavailable: Counter Max,
            prometheus Some("cluster_claims_unavailable"), per_shard None, sys None,
            help "CONNECTs refused with 0x03 Server unavailable: no owner answer or KV decision in time, or the link down in fence mode";
        cluster_unregistered: Counter Max,
            prometheus Some("cluster_unregistered"), per_shard None, sys None,
            help "CONNECTs granted without a sessions-bucket record while the NATS link was down (partition_mode serve)";
        cluster_reasserted: Counter Max,
            prometheus Some("cluster_reasserted"), per_shard None, sys None,
            help "Sessions whose sessions-bucket record this node re-asserted after a NATS outage or at start-up (from its store)";
        cluster_reassert_lost: Counter Max,
            prometheus Some("cluster_reassert_lost"), per_shard None, sys None,
            help "Sessions this node dropped on re-assertion because another node owns the client id (the connection closed as a take-over)";
        cluster_recovered: Counter Max,
            prometheus Some("cluster_recovered"), per_shard None, sys None,
            help "Persistent sessions whose subscriptions this node recovered from a dead node's record";
        cluster_claim_states_kept: Counter Max,
            prometheus Some("cluster_claim_states_kept"), per_shard None, sys None,
            help "Session states a claim of this node received but did not give to its connection (cut off by its deadline with the outcome unknown, or answered after its shard stopped waiting), kept for the next claim of the client id";
        cluster_claim_states_given: Counter Max,
            prometheus Some("cluster_claim_states_given"), per_shard None, sys None,
            help "Kept claim session states given to a later claim of the client id on this node or to another node that took it over";
        cluster_subscription_records: Counter Max,
            prometheus Some("cluster_subscription_records"), per_shard None, sys None,
            help "Subscriptions records of persistent sessions written to the cluster's bucket (at attach, SUBSCRIBE and UNSUBSCRIBE)";
        cluster_tails_merged: Counter Max,
            prometheus Some("cluster_tails_merged"), per_shard None, sys None,
            help "Persistent sessions moved to this node with the old node's tail: what other nodes published on their topics during the move, merged without loss or repeats";
        cluster_tails_missed: Counter Max,
            prometheus Some("cluster_tails_missed"), per_shard None, sys None,
            help "Persistent sessions moved to this node without the old node's tail (no answer in time, or it collected none): what was published on their topics during the move is lost for them";
        cluster_tails_short: Counter Max,
            prometheus Some("cluster_tails_short"), per_shard None, sys None,
            help "Tails of persistent sessions moved away from this node that may lack messages published on this node itself (its ring of recent publishes no longer reached back to what the session's shard had not routed, or that shard's position was not known)";
        cluster_tails_behind: Counter Max,
            prometheus Some("cluster_tails_behind"), per_shard None, sys None,
            help "Tails of persistent sessions moved away from this node answered before it had the first message the new node got itself of each publishing node (its route from that node's NATS server slower than the new node's by more than 300 ms): what came before it here is lost for the session";
        cluster_nodes: Gauge Max,
            prometheus Some("cluster_nodes"), per_shard None, sys None,
            help "Other nodes heard from within the node timeout";
        cluster_suback_unconfirmed: Counter Max,
            prometheus Some("cluster_suback_unconfirmed"), per_shard None, sys None,
            help "SUBACKs of a filter new to the node sent without the NATS server's confirmation of its subscription (link down, or none within 5 s)";
        cluster_retained_unconfirmed: Counter Max,
            prometheus Some("cluster_retained_unconfirmed"), per_shard None, sys None,
            help "Retained QoS 1/2 publishes acknowledged while the NATS link was down (partition_mode serve): held by this node only";
        cluster_retained_refused: Counter Max,
            prometheus Some("cluster_retained_refused"), per_shard None, sys None,
            help "Retained QoS 1/2 publishes not acknowledged (connection closed) because the retained bucket did not confirm them within 5 s";
        shared_deliveries: Counter Sum,
            prometheus Some("shared_deliveries"), per_shard None,
            sys Some("$SYS/broker/shared_subscriptions/delivered"),
            help "Messages given to a shared subscription group's chosen member (one per message and group)";
        shared_dropped: Counter Sum,
            prometheus Some("shared_dropped"), per_shard None,
            sys Some("$SYS/broker/shared_subscriptions/dropped"),
            help "Messages for a shared subscription group that no member could take";
    }
    labeled {
        clients_by_listener[NR_LISTENERS]: Gauge, label "listener" = listener_label,
            prometheus Some("connections"),
            help "Connected MQTT clients by listener (kept by the connection tasks)";
        accepted_by_listener[NR_LISTENERS]: Counter, label "listener" = listener_label,
            prometheus Some("connections_accepted"),
            help "TCP connections accepted by listener";
        publish_received_by_qos[NR_QOS]: Counter, label "qos" = qos_label,
            prometheus Some("messages_received"),
            help "PUBLISH packets received, by QoS";
        publish_sent_by_qos[NR_QOS]: Counter, label "qos" = qos_label,
            prometheus Some("messages_delivered"),
            help "PUBLISH packets queued to subscribers (deliveries), by the QoS sent at";
    }
}

impl Counters {
    /// Fills in the figures derived from others (call before the figures
    /// leave the shard): deliveries from their per-QoS split, drops for a
    /// full queue from the other reasons, offline sessions.
    pub fn complete(&mut self) {
        self.publish_sent = self.publish_sent_by_qos.iter().sum();
        self.dropped_queue_full = self
            .publish_dropped
            .saturating_sub(self.dropped_sys_topic)
            .saturating_sub(self.dropped_qos2_overflow);
        self.clients_disconnected = self.sessions.saturating_sub(self.clients_connected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_sum_except_replicas_and_maxima() {
        let a = Counters {
            clients_connected: 2,
            retained: 7,
            max_client_queue_bytes: 100,
            bytes_sent: 10,
            publish_sent_by_qos: [1, 2, 3],
            ..Counters::default()
        };
        let b = Counters {
            clients_connected: 3,
            retained: 7,
            max_client_queue_bytes: 40,
            bytes_sent: 5,
            publish_sent_by_qos: [1, 0, 0],
            ..Counters::default()
        };
        let mut total = Counters::default();
        total.add(&a);
        total.add(&b);
        assert_eq!(total.clients_connected, 5);
        assert_eq!(total.retained, 7, "a replica, not a sum");
        assert_eq!(total.max_client_queue_bytes, 100, "the largest queue");
        assert_eq!(total.bytes_sent, 15);
        assert_eq!(total.publish_sent_by_qos, [2, 2, 3]);
    }

    #[test]
    fn the_atomic_mirror_gives_back_what_was_stored() {
        let mut c = Counters {
            sessions: 9,
            clients_connected: 4,
            publish_dropped: 10,
            dropped_sys_topic: 3,
            dropped_qos2_overflow: 2,
            publish_sent_by_qos: [5, 6, 7],
            accepted_by_listener: [1, 2, 3, 4],
            ..Counters::default()
        };
        c.complete();
        assert_eq!(c.publish_sent, 18);
        assert_eq!(c.dropped_queue_full, 5);
        assert_eq!(c.clients_disconnected, 5);
        let mirror = AtomicCounters::default();
        mirror.store(&c);
        assert_eq!(mirror.load(), c);
    }

    #[test]
    fn every_row_reads_its_own_field_and_names_are_unique() {
        let c = Counters {
            bytes_sent: 42,
            publish_received_by_qos: [0, 8, 0],
            ..Counters::default()
        };
        let row = SCALARS
            .iter()
            .find(|s| s.prometheus == Some("bytes_sent"))
            .unwrap();
        assert_eq!((row.get)(&c), 42);
        let row = LABELED
            .iter()
            .find(|l| l.prometheus == Some("messages_received"))
            .unwrap();
        assert_eq!((row.get)(&c), &[0, 8, 0]);
        assert_eq!((row.value)(1), "1");
        let prometheus: Vec<_> = SCALARS
            .iter()
            .filter_map(|s| s.prometheus)
            .chain(SCALARS.iter().filter_map(|s| s.per_shard))
            .chain(LABELED.iter().filter_map(|l| l.prometheus))
            .collect();
        let mut unique = prometheus.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), prometheus.len(), "a Prometheus name twice");
    }
}
