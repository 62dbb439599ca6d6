//! The QoS 1/2 flows of persistent sessions across a restart
//! (docs/design/persistence.md §4.2, §5.2): outgoing messages in flight
//! with their packet ids and phase, and incoming QoS 2 packet ids awaiting
//! PUBREL.
//!
//! A session's image lists what it had not had acknowledged; small records
//! follow it as its flows move, each naming the image by its alias
//! (`record::Alias`, 4 bytes; format 1 named it by its 8-byte stamp,
//! [`legacy_events`]): [`Record::Queue`] (queued, 5 bytes a session),
//! [`Record::Sent`] (in flight with a packet id, 7 bytes a session, the
//! message itself stored once per shard), [`Record::DoneMany`]
//! (acknowledged: 6 bytes each, one record per step of the shard),
//! [`Record::Steps`] (a step that also sent messages from the sessions'
//! queues, in order: 9 bytes for a session that had one acknowledged and
//! sent the next, the message named once per record; [`StepBatch`]),
//! [`Record::Flow`] (PUBREC'd, an incoming id awaiting PUBREL or released:
//! 16 bytes). [`replay`] turns an image and the records after
//! it, in log order, into what the session holds at restart; [`image_tail`]
//! writes those flows again after a new image (the start-up compaction, a
//! session's image at connect, disconnect and take-over).

use std::collections::VecDeque;

use crate::protocol::v3::QoS;
use crate::store::record::{Alias, FlowStep, Legacy, Record, StepEntry, StoredMessage};

/// Something that happened to one session's flows after its image, in log
/// order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    /// A message (id) was queued at a QoS ([`Record::Queue`]).
    Queued(u64, QoS),
    /// A message (id) went in flight with a packet id at a QoS
    /// ([`Record::Sent`]).
    Sent(u64, u16, QoS),
    /// A step of a packet id ([`Record::Flow`]).
    Step(FlowStep, u16),
}

/// An outgoing message in flight at restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedInflight {
    /// Its message id in the journal.
    pub mid: u64,
    /// The message.
    pub message: StoredMessage,
    /// The QoS it was sent at.
    pub qos: QoS,
    /// The packet id it was sent with: resent with it.
    pub packet_id: u16,
    /// QoS 2 and PUBREC'd: PUBREL is resent, not the PUBLISH.
    pub pubrecd: bool,
}

/// A session's flows at restart, besides its queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadedFlows {
    /// Outgoing messages in flight, oldest first.
    pub inflight: Vec<LoadedInflight>,
    /// Incoming QoS 2 packet ids PUBREC'd and not yet released.
    pub awaiting_rel: Vec<u16>,
}

/// What a session's queue and flows are after its image's `queued` list and
/// `events` (in log order), resolved against `message` (a message id's
/// record, `None` if it was not found): the pending queue, oldest first,
/// and the flows. A message queued then sent leaves the queue; a packet id
/// acknowledged leaves the flight; records naming what is not there (a
/// record lost with a torn tail before them) are ignored.
pub fn replay<'a>(
    image_queued: &[(u64, QoS)],
    events: &[FlowEvent],
    message: impl Fn(u64) -> Option<&'a StoredMessage>,
) -> (Vec<(u64, StoredMessage, QoS)>, LoadedFlows) {
    let mut queue: VecDeque<(u64, QoS)> = image_queued.iter().copied().collect();
    let mut inflight: Vec<(u64, u16, QoS, bool)> = Vec::new();
    let mut awaiting_rel: Vec<u16> = Vec::new();
    for event in events {
        match *event {
            FlowEvent::Queued(mid, qos) => queue.push_back((mid, qos)),
            FlowEvent::Sent(mid, packet_id, qos) => {
                if let Some(i) = queue.iter().position(|&(m, _)| m == mid) {
                    queue.remove(i);
                }
                inflight.retain(|f| f.1 != packet_id);
                inflight.push((mid, packet_id, qos, false));
            }
            FlowEvent::Step(FlowStep::Done, packet_id) => inflight.retain(|f| f.1 != packet_id),
            FlowEvent::Step(FlowStep::PubRecd, packet_id) => {
                for f in inflight.iter_mut().filter(|f| f.1 == packet_id) {
                    f.3 = f.2 == QoS::ExactlyOnce;
                }
            }
            FlowEvent::Step(FlowStep::AwaitRel, packet_id) => {
                if !awaiting_rel.contains(&packet_id) {
                    awaiting_rel.push(packet_id);
                }
            }
            FlowEvent::Step(FlowStep::Released, packet_id) => {
                awaiting_rel.retain(|&id| id != packet_id);
            }
        }
    }
    let queued = queue
        .into_iter()
        .filter_map(|(mid, qos)| Some((mid, message(mid)?.clone(), qos)))
        .collect();
    let inflight = inflight
        .into_iter()
        .filter_map(|(mid, packet_id, qos, pubrecd)| {
            Some(LoadedInflight {
                mid,
                message: message(mid)?.clone(),
                qos,
                packet_id,
                pubrecd,
            })
        })
        .collect();
    (
        queued,
        LoadedFlows {
            inflight,
            awaiting_rel,
        },
    )
}

/// One outgoing message in flight as [`image_tail`] writes it: message id,
/// packet id, QoS sent at, PUBREC'd.
pub type InflightRef = (u64, u16, QoS, bool);

/// The events of a format 1 record, each with the stamp of the image it
/// names.
pub fn legacy_events(record: Legacy) -> Vec<(u64, FlowEvent)> {
    match record {
        Legacy::Queue(mid, refs) => refs
            .into_iter()
            .map(|(stamp, qos)| (stamp, FlowEvent::Queued(mid, qos)))
            .collect(),
        Legacy::Sent(mid, refs) => refs
            .into_iter()
            .map(|(stamp, packet_id, qos)| (stamp, FlowEvent::Sent(mid, packet_id, qos)))
            .collect(),
        Legacy::Flow(step, stamp, packet_id) => vec![(stamp, FlowEvent::Step(step, packet_id))],
        Legacy::DoneMany(done) => done
            .into_iter()
            .map(|(stamp, packet_id)| (stamp, FlowEvent::Step(FlowStep::Done, packet_id)))
            .collect(),
    }
}

/// The events of a [`Record::Steps`], each with the alias of the image it
/// names, in the record's order (an entry's acknowledgement before its
/// send).
pub fn steps_events<'a>(
    messages: &'a [(u64, QoS)],
    entries: &'a [StepEntry],
) -> impl Iterator<Item = (Alias, FlowEvent)> + 'a {
    entries.iter().flat_map(move |e| {
        let done = (e.done != 0).then_some((e.alias, FlowEvent::Step(FlowStep::Done, e.done)));
        let sent = usize::from(e.message)
            .checked_sub(1)
            .and_then(|i| messages.get(i))
            .map(|&(mid, qos)| (e.alias, FlowEvent::Sent(mid, e.sent, qos)));
        done.into_iter().chain(sent)
    })
}

/// The flow changes of steps of a shard, gathered into one ordered record
/// ([`Record::Steps`]; [`Record::DoneMany`] when nothing was sent):
/// a session that has a message acknowledged and sends the next from its
/// queue takes one 9-byte entry, and the message is named once per record,
/// however many sessions send it.
#[derive(Debug, Default)]
pub struct StepBatch {
    /// The messages sent so far (id, QoS sent at), each once.
    messages: Vec<(u64, QoS)>,
    /// The entries, in the order of the steps.
    entries: Vec<StepEntry>,
    /// When the first entry came (None: empty).
    since: Option<std::time::Instant>,
}

impl StepBatch {
    /// Whether the batch should be written now: it holds `entries` entries
    /// or more, or its first came `age` or longer before `now`.
    pub fn due(&self, now: std::time::Instant, entries: usize, age: std::time::Duration) -> bool {
        self.entries.len() >= entries
            || self
                .since
                .is_some_and(|since| now.saturating_duration_since(since) >= age)
    }

    /// Notes the time of a first entry.
    fn started(&mut self) {
        if self.since.is_none() {
            self.since = Some(std::time::Instant::now());
        }
    }

    /// Session `alias` had the message with `packet_id` acknowledged.
    pub fn done(&mut self, alias: Alias, packet_id: u16) {
        self.started();
        self.entries.push(StepEntry {
            alias,
            done: packet_id,
            message: 0,
            sent: 0,
        });
    }

    /// Session `alias` sent message `mid` with `packet_id` at `qos`; joins
    /// the session's acknowledgement just before it into one entry. The
    /// record gathered so far when it already names 255 other messages:
    /// append it first (the send then starts a new one).
    #[must_use]
    pub fn sent(&mut self, alias: Alias, mid: u64, packet_id: u16, qos: QoS) -> Option<Record> {
        let known = self.messages.iter().rposition(|&m| m == (mid, qos));
        let mut full = None;
        if known.is_none() && self.messages.len() == usize::from(u8::MAX) {
            full = self.take();
        }
        self.started();
        let index = known.unwrap_or_else(|| {
            self.messages.push((mid, qos));
            self.messages.len() - 1
        });
        // At most 255 messages, so the 1-based index fits.
        let message = u8::try_from(index + 1).unwrap_or(u8::MAX);
        match self.entries.last_mut() {
            Some(last) if last.alias == alias && last.message == 0 => {
                last.message = message;
                last.sent = packet_id;
            }
            _ => self.entries.push(StepEntry {
                alias,
                done: 0,
                message,
                sent: packet_id,
            }),
        }
        full
    }

    /// The record of what was gathered (None: nothing), and a fresh batch.
    pub fn take(&mut self) -> Option<Record> {
        if self.entries.is_empty() {
            return None;
        }
        let entries = std::mem::take(&mut self.entries);
        let messages = std::mem::take(&mut self.messages);
        self.since = None;
        if messages.is_empty() {
            return Some(Record::DoneMany(
                entries.into_iter().map(|e| (e.alias, e.done)).collect(),
            ));
        }
        Some(Record::Steps(messages, entries))
    }
}

/// The records that follow a new image with alias `alias` (whose `queued`
/// list starts with the in-flight messages' ids) so that its flows come
/// back as they are: a [`Record::Sent`] per message in flight, a
/// PUBREC'd step for the QoS 2 ones past PUBREC, an awaiting-PUBREL step
/// per incoming id.
pub fn image_tail(
    alias: Alias,
    inflight: impl IntoIterator<Item = InflightRef>,
    awaiting_rel: &[u16],
) -> Vec<Record> {
    let mut records = Vec::new();
    for (mid, packet_id, qos, pubrecd) in inflight {
        records.push(Record::Sent(mid, vec![(alias, packet_id, qos)]));
        if pubrecd {
            records.push(Record::Flow(FlowStep::PubRecd, alias, packet_id));
        }
    }
    for &packet_id in awaiting_rel {
        records.push(Record::Flow(FlowStep::AwaitRel, alias, packet_id));
    }
    records
}

/// [`image_tail`] of a session loaded at start-up (the compaction writes
/// it after the image).
pub fn loaded_tail(alias: Alias, flows: &LoadedFlows) -> Vec<Record> {
    image_tail(
        alias,
        flows.inflight.iter().map(LoadedInflight::tail_ref),
        &flows.awaiting_rel,
    )
}

impl LoadedInflight {
    /// The message as [`image_tail`] writes it.
    pub fn tail_ref(&self) -> InflightRef {
        (self.mid, self.packet_id, self.qos, self.pubrecd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use bytestring::ByteString;

    fn message(n: u8) -> StoredMessage {
        StoredMessage {
            qos: QoS::ExactlyOnce,
            retain: false,
            expires_unix_ms: 0,
            topic: ByteString::from("t"),
            properties: Default::default(),
            payload: Bytes::from(vec![n]),
        }
    }

    /// A session image of `client_id` queueing `queued`, with alias
    /// `alias` (0: a format 1 image).
    fn image(
        stamp: u64,
        client_id: &str,
        queued: Vec<(u64, QoS)>,
    ) -> crate::store::record::StoredSession {
        crate::store::record::StoredSession {
            stamp,
            client_id: ByteString::from(client_id),
            protocol_level: 4,
            expiry_interval: u32::MAX,
            offline_since_unix_ms: 0,
            subscriptions: Vec::new(),
            queued,
            alias: crate::store::record::next_alias(),
        }
    }

    /// Writes `records` as shard 0's log in store `dir`, less its last
    /// `torn` bytes.
    fn write_log(dir: &std::path::Path, records: &[Record], torn: usize) {
        write_segment(dir, 0, frame_version(), records, torn);
    }

    /// The format this fanmq writes.
    fn frame_version() -> u16 {
        crate::store::frame::FORMAT_VERSION
    }

    /// Writes `records` as shard 0's segment at `base` of format `version`,
    /// less its last `torn` bytes.
    fn write_segment(
        dir: &std::path::Path,
        base: u64,
        version: u16,
        records: &[Record],
        torn: usize,
    ) {
        use crate::store::{frame, journal::segment_path, shard_dir};
        let mut data = frame::Header {
            version,
            shard: 0,
            shards: 1,
            base_lsn: base,
        }
        .encode()
        .to_vec();
        for record in records {
            frame::append_record(&mut data, record.kind(), |out| record.encode_body(out));
        }
        data.truncate(data.len() - torn);
        let shard = shard_dir(dir, 0);
        std::fs::create_dir_all(&shard).unwrap();
        std::fs::write(segment_path(&shard, base), &data).unwrap();
    }

    /// The messages in flight of `flows`, as [`InflightRef`]s.
    fn refs(flows: &LoadedFlows) -> Vec<InflightRef> {
        flows
            .inflight
            .iter()
            .map(LoadedInflight::tail_ref)
            .collect()
    }

    /// The events that `records` (of any sessions) hold for the session
    /// with alias `stamp`, as the loader gathers them.
    fn events_of(stamp: Alias, records: &[Record]) -> Vec<FlowEvent> {
        let mut events = Vec::new();
        for record in records {
            match record {
                Record::Queue(mid, refs) => events.extend(
                    refs.iter()
                        .filter(|r| r.0 == stamp)
                        .map(|r| FlowEvent::Queued(*mid, r.1)),
                ),
                Record::Sent(mid, refs) => events.extend(
                    refs.iter()
                        .filter(|r| r.0 == stamp)
                        .map(|r| FlowEvent::Sent(*mid, r.1, r.2)),
                ),
                Record::Flow(step, s, id) if *s == stamp => {
                    events.push(FlowEvent::Step(*step, *id))
                }
                _ => {}
            }
        }
        events
    }

    #[test]
    fn sent_pubrecd_done_and_incoming_ids_replay_in_log_order() {
        let messages: Vec<StoredMessage> = (0..6).map(message).collect();
        let lookup = |mid: u64| messages.get(mid as usize);
        let records = vec![
            Record::Queue(2, vec![(7, QoS::ExactlyOnce), (8, QoS::AtLeastOnce)]),
            // Message 0 and 1 were in the image's queue; 0 goes out first.
            Record::Sent(0, vec![(7, 10, QoS::AtLeastOnce)]),
            Record::Sent(1, vec![(7, 11, QoS::ExactlyOnce)]),
            Record::Flow(FlowStep::PubRecd, 7, 11),
            Record::Flow(FlowStep::Done, 7, 10),
            // Sent straight from a publish, never queued.
            Record::Sent(3, vec![(7, 12, QoS::ExactlyOnce), (8, 1, QoS::AtLeastOnce)]),
            Record::Flow(FlowStep::AwaitRel, 7, 5),
            Record::Flow(FlowStep::AwaitRel, 7, 6),
            Record::Flow(FlowStep::Released, 7, 5),
            // Another session's steps change nothing here.
            Record::Flow(FlowStep::Done, 8, 12),
            // A step for an id not in flight is ignored.
            Record::Flow(FlowStep::Done, 7, 999),
        ];
        let (queued, flows) = replay(
            &[(0, QoS::AtLeastOnce), (1, QoS::ExactlyOnce)],
            &events_of(7, &records),
            lookup,
        );
        assert_eq!(
            queued,
            vec![(2, message(2), QoS::ExactlyOnce)],
            "queued after the image and not yet sent"
        );
        assert_eq!(
            refs(&flows),
            vec![
                (1, 11, QoS::ExactlyOnce, true),
                (3, 12, QoS::ExactlyOnce, false)
            ]
        );
        assert_eq!(flows.awaiting_rel, vec![6]);
        // The tail written after a new image brings back the same flows.
        let tail = loaded_tail(9, &flows);
        let image_queued: Vec<_> = flows
            .inflight
            .iter()
            .map(|f| (f.mid, f.qos))
            .chain(queued.iter().map(|q| (q.0, q.2)))
            .collect();
        let (queued_again, flows_again) = replay(&image_queued, &events_of(9, &tail), lookup);
        assert_eq!((queued_again, flows_again), (queued, flows));
    }

    #[test]
    fn a_missing_message_is_left_out_and_a_reused_packet_id_replaces_the_old_one() {
        let messages = [message(0), message(1)];
        let lookup = |mid: u64| messages.get(mid as usize);
        let events = [
            FlowEvent::Sent(0, 4, QoS::AtLeastOnce),
            FlowEvent::Step(FlowStep::Done, 4),
            FlowEvent::Sent(1, 4, QoS::AtLeastOnce),
            FlowEvent::Sent(77, 5, QoS::AtLeastOnce),
            FlowEvent::Queued(78, QoS::AtLeastOnce),
            // PUBREC'd is for QoS 2 only.
            FlowEvent::Step(FlowStep::PubRecd, 4),
        ];
        let (queued, flows) = replay(&[], &events, lookup);
        assert!(queued.is_empty(), "message 78 was never stored");
        assert_eq!(flows.inflight.len(), 1);
        assert_eq!(
            (flows.inflight[0].mid, flows.inflight[0].pubrecd),
            (1, false)
        );
    }

    #[test]
    fn the_load_keeps_the_flows_before_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let image = image(
            crate::store::record::next_stamp(),
            "torn",
            vec![(1, QoS::ExactlyOnce)],
        );
        let stamp = image.alias;
        let records = [
            Record::Message(1, message(1)),
            Record::Message(2, message(2)),
            Record::SessionImage(image),
            Record::Sent(1, vec![(stamp, 3, QoS::ExactlyOnce)]),
            Record::Flow(FlowStep::PubRecd, stamp, 3),
            Record::Sent(2, vec![(stamp, 4, QoS::AtLeastOnce)]),
            Record::Flow(FlowStep::AwaitRel, stamp, 8),
            // Torn below: its PUBACK is lost, so message 2 stays in flight.
            Record::Flow(FlowStep::Done, stamp, 4),
        ];
        write_log(dir.path(), &records, 3);
        let loaded = store
            .load_sessions(crate::store::record::unix_ms_now())
            .unwrap();
        assert_eq!(loaded.sessions.len(), 1);
        let session = &loaded.sessions[0];
        assert!(session.queued.is_empty(), "both went in flight");
        assert_eq!(
            refs(&session.flows),
            vec![
                (1, 3, QoS::ExactlyOnce, true),
                (2, 4, QoS::AtLeastOnce, false)
            ]
        );
        assert_eq!(session.flows.awaiting_rel, vec![8]);
    }

    #[test]
    fn the_fuzz_seed_of_the_flow_and_will_records_is_valid() {
        let seed = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/store_load/flows"),
        )
        .unwrap();
        let (records, valid, bad) =
            crate::store::read_records(&seed[crate::store::frame::HEADER_LEN..]);
        assert_eq!(bad, None);
        assert_eq!(valid, seed.len() - crate::store::frame::HEADER_LEN);
        assert_eq!(records.len(), 9);
        // A format 1 file (checked in): its flow records name sessions by
        // stamp.
        assert_eq!(
            crate::store::frame::Header::decode(&seed).unwrap().version,
            1
        );
        assert!(matches!(&records[0], Record::Legacy(Legacy::Sent(5, refs)) if refs.len() == 2));
        assert!(matches!(&records[5], Record::Will(w) if w.delay == 5));
        assert!(matches!(&records[6], Record::WillClear(79, _)));
        assert_eq!(
            records[7],
            Record::Legacy(Legacy::DoneMany(vec![(77, 1), (78, 2)]))
        );
        // A will with a Message Expiry Interval (kind 0x0F).
        assert_eq!(records[8].kind(), crate::store::record::kind::WILL_EXPIRING);
        assert!(matches!(&records[8], Record::Will(w) if w.expiry_interval == Some(60)));
    }

    #[test]
    fn the_fuzz_seed_of_the_step_record_is_valid() {
        let seed = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/store_load/steps"),
        )
        .unwrap();
        let (records, valid, bad) =
            crate::store::read_records(&seed[crate::store::frame::HEADER_LEN..]);
        assert_eq!(
            (bad, valid),
            (None, seed.len() - crate::store::frame::HEADER_LEN)
        );
        assert_eq!(
            crate::store::frame::Header::decode(&seed).unwrap().version,
            3
        );
        assert_eq!(
            records[1],
            Record::Steps(
                vec![(4, QoS::AtLeastOnce), (5, QoS::ExactlyOnce)],
                vec![step(7, 6, 1, 6), step(8, 3, 0, 0), step(7, 0, 2, 9)],
            )
        );
        assert_eq!(records[2], Record::DoneMany(vec![(7, 6)]));
    }

    /// Loads `store` and returns the session of `client_id`.
    fn load_one(store: &crate::store::Store, client_id: &str) -> crate::store::LoadedSession {
        let loaded = store
            .load_sessions(crate::store::record::unix_ms_now())
            .unwrap();
        loaded
            .sessions
            .into_iter()
            .find(|s| s.session.client_id == client_id)
            .expect("loaded")
    }

    #[test]
    fn a_format_1_log_then_format_2_and_3_ones_load_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let next_stamp = crate::store::record::next_stamp;
        // As fanmq 1 wrote it: an image without alias, flows by stamp.
        let mut old = image(next_stamp(), "upgraded", vec![(1, QoS::AtLeastOnce)]);
        old.alias = 0;
        let stamp = old.stamp;
        let mut other = image(next_stamp(), "other", Vec::new());
        other.alias = 0;
        write_segment(
            dir.path(),
            0,
            1,
            &[
                Record::Message(1, message(1)),
                Record::Message(2, message(2)),
                Record::Message(3, message(3)),
                Record::SessionImage(old),
                Record::SessionImage(other.clone()),
                Record::Legacy(Legacy::Queue(2, vec![(stamp, QoS::AtLeastOnce)])),
                Record::Legacy(Legacy::Sent(1, vec![(stamp, 4, QoS::AtLeastOnce)])),
                Record::Legacy(Legacy::Sent(2, vec![(stamp, 5, QoS::ExactlyOnce)])),
                Record::Legacy(Legacy::Flow(FlowStep::PubRecd, stamp, 5)),
                Record::Legacy(Legacy::DoneMany(vec![(stamp, 4), (other.stamp, 9)])),
                Record::Legacy(Legacy::Flow(FlowStep::AwaitRel, stamp, 7)),
            ],
            0,
        );
        let session = load_one(&store, "upgraded");
        assert!(session.queued.is_empty());
        assert_eq!(refs(&session.flows), vec![(2, 5, QoS::ExactlyOnce, true)]);
        assert_eq!(session.flows.awaiting_rel, vec![7]);
        // A newer fanmq goes on in a format 2 segment after it: a new image
        // (with an alias) and flows by alias.
        let new = image(next_stamp(), "upgraded", vec![(2, QoS::ExactlyOnce)]);
        let alias = new.alias;
        write_segment(
            dir.path(),
            4096,
            2,
            &[
                Record::SessionImage(new),
                Record::Sent(2, vec![(alias, 5, QoS::ExactlyOnce)]),
                Record::Flow(FlowStep::PubRecd, alias, 5),
                Record::Sent(3, vec![(alias, 6, QoS::AtLeastOnce)]),
                Record::DoneMany(vec![(alias, 5)]),
                // An alias no image has is ignored.
                Record::DoneMany(vec![(alias + 1000, 6)]),
            ],
            0,
        );
        let session = load_one(&store, "upgraded");
        assert_eq!(refs(&session.flows), vec![(3, 6, QoS::AtLeastOnce, false)]);
        assert!(
            session.flows.awaiting_rel.is_empty(),
            "not in the new image"
        );
        assert!(
            crate::store::record::next_alias() > alias,
            "new aliases above the loaded ones"
        );
        // And a format 3 segment: the ordered record of a step. Packet id 6
        // is acknowledged and sent again (message 4) in one entry; message
        // 2, queued by the next image, goes in flight with id 7 in a second
        // entry of the same session; another session's entries between.
        let newest = image(next_stamp(), "upgraded", vec![(2, QoS::AtLeastOnce)]);
        let (newest_alias, newest_stamp) = (newest.alias, newest.stamp);
        write_segment(
            dir.path(),
            8192,
            3,
            &[
                Record::Message(4, message(4)),
                Record::SessionImage(newest),
                Record::Sent(3, vec![(newest_alias, 6, QoS::AtLeastOnce)]),
                Record::Steps(
                    vec![(4, QoS::AtLeastOnce), (2, QoS::AtLeastOnce)],
                    vec![
                        step(newest_alias, 6, 1, 6),
                        step(newest_alias + 1000, 3, 2, 3),
                        step(newest_alias, 0, 2, 7),
                    ],
                ),
            ],
            0,
        );
        let session = load_one(&store, "upgraded");
        assert_eq!(session.session.stamp, newest_stamp);
        assert!(session.queued.is_empty(), "message 2 went in flight");
        assert_eq!(
            refs(&session.flows),
            vec![
                (4, 6, QoS::AtLeastOnce, false),
                (2, 7, QoS::AtLeastOnce, false)
            ]
        );
    }

    /// A [`StepEntry`].
    fn step(alias: Alias, done: u16, message: u8, sent: u16) -> StepEntry {
        StepEntry {
            alias,
            done,
            message,
            sent,
        }
    }

    /// A session that had its window's message acknowledged and sent the
    /// next from its queue takes one 9-byte entry of its step's record (was
    /// a record of each kind, 19 + 28 bytes framed); many such sessions of
    /// one step share one record that names the message once; the order of
    /// an acknowledgement and the send of its packet id again is kept.
    #[test]
    fn a_step_of_many_sessions_goes_as_one_record_of_nine_bytes_a_session() {
        let framed = crate::store::record::framed_len;
        let batch_of = |sessions: u32| {
            let mut batch = StepBatch::default();
            for alias in 1..=sessions {
                batch.done(alias, 5);
                assert!(batch.sent(alias, 77, 5, QoS::AtLeastOnce).is_none());
            }
            batch.take().unwrap()
        };
        let (one, many) = (batch_of(1), batch_of(1000));
        assert_eq!(framed(&many) - framed(&one), 999 * 9, "bytes a session");
        let Record::Steps(messages, entries) = &many else {
            panic!("{many:?}");
        };
        assert_eq!(messages, &vec![(77, QoS::AtLeastOnce)], "named once");
        assert_eq!(entries.len(), 1000, "one entry a session");
        let events: Vec<_> = steps_events(messages, entries).take(2).collect();
        assert_eq!(
            events,
            vec![
                (1, FlowEvent::Step(FlowStep::Done, 5)),
                (1, FlowEvent::Sent(77, 5, QoS::AtLeastOnce))
            ],
            "the acknowledgement before the send of its id again"
        );
        let (queued, flows) = replay(
            &[(77, QoS::AtLeastOnce)],
            &[
                FlowEvent::Sent(76, 5, QoS::AtLeastOnce),
                events[0].1,
                events[1].1,
            ],
            |mid| (mid == 77).then_some(&STORED_77),
        );
        assert!(queued.is_empty());
        assert_eq!(refs(&flows), vec![(77, 5, QoS::AtLeastOnce, false)]);
        // Written when it holds enough entries or is old enough.
        let mut batch = StepBatch::default();
        let (now, age) = (
            std::time::Instant::now(),
            std::time::Duration::from_millis(10),
        );
        assert!(!batch.due(now + age, 1, age), "an empty batch is never due");
        batch.done(1, 5);
        let since = batch.since.unwrap();
        assert!(!batch.due(since, 2, age));
        assert!(batch.due(since, 1, age), "entries");
        assert!(batch.due(since + age, 2, age), "age");
        assert!(batch.take().is_some() && batch.since.is_none());
        // Acknowledgements only: the record they always were.
        let mut batch = StepBatch::default();
        batch.done(1, 5);
        batch.done(2, 6);
        assert_eq!(batch.take(), Some(Record::DoneMany(vec![(1, 5), (2, 6)])));
        assert_eq!(batch.take(), None, "taken");
        // A 256th message starts a new record, after the full one.
        let mut batch = StepBatch::default();
        for mid in 1..=255 {
            assert!(batch.sent(1, mid, 1, QoS::AtLeastOnce).is_none());
        }
        let full = batch.sent(1, 256, 2, QoS::AtLeastOnce);
        assert!(matches!(&full, Some(Record::Steps(m, e)) if m.len() == 255 && e.len() == 255));
        assert_eq!(
            batch.take(),
            Some(Record::Steps(
                vec![(256, QoS::AtLeastOnce)],
                vec![step(1, 0, 1, 2)]
            ))
        );
    }

    /// Message 77 of [`a_step_of_many_sessions_goes_as_one_record_of_nine_bytes_a_session`].
    static STORED_77: std::sync::LazyLock<StoredMessage> = std::sync::LazyLock::new(|| message(77));

    /// A step record that sends nothing, names a message it lacks or
    /// sends packet id 0 or at QoS 0 is refused, never a panic.
    #[test]
    fn a_step_record_that_makes_no_sense_is_refused() {
        let decode = |messages: Vec<(u64, QoS)>, entries: Vec<StepEntry>| {
            let record = Record::Steps(messages, entries);
            let mut body = Vec::new();
            record.encode_body(&mut body);
            Record::decode(record.kind(), &body)
        };
        let one = vec![(9, QoS::AtLeastOnce)];
        assert!(decode(one.clone(), vec![step(1, 2, 1, 3)]).is_ok());
        for bad in [step(1, 0, 0, 0), step(1, 2, 2, 3), step(1, 2, 1, 0)] {
            assert!(decode(one.clone(), vec![bad]).is_err(), "{bad:?}");
        }
        assert!(decode(vec![(9, QoS::AtMostOnce)], vec![step(1, 2, 1, 3)]).is_err());
    }

    #[test]
    fn the_latest_will_record_of_a_live_session_is_loaded() {
        use crate::store::record::{StoredWill, next_stamp};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let will = |id: &str, payload: u8| {
            Record::Will(StoredWill {
                stamp: next_stamp(),
                client_id: ByteString::from(id),
                delay: 0,
                due_unix_ms: 0,
                message: message(payload),
                expiry_interval: None,
            })
        };
        let clear = |id: &str| Record::WillClear(next_stamp(), ByteString::from(id));
        let records = [
            Record::SessionImage(image(next_stamp(), "kept", Vec::new())),
            Record::SessionImage(image(next_stamp(), "cleared", Vec::new())),
            Record::SessionImage(image(next_stamp(), "dropped", Vec::new())),
            will("kept", 1),
            clear("cleared"),
            will("dropped", 3),
            clear("kept"),
            will("kept", 2),
            will("cleared", 4),
            clear("cleared"),
            Record::SessionDrop(next_stamp(), ByteString::from("dropped")),
        ];
        write_log(dir.path(), &records, 0);
        let loaded = store
            .load_sessions(crate::store::record::unix_ms_now())
            .unwrap();
        let mut wills: Vec<_> = loaded
            .sessions
            .iter()
            .map(|s| {
                let payload = s.will.as_ref().map(|w| w.message.payload.to_vec());
                (s.session.client_id.to_string(), payload)
            })
            .collect();
        wills.sort();
        assert_eq!(
            wills,
            vec![
                ("cleared".to_string(), None),
                ("kept".to_string(), Some(vec![2]))
            ]
        );
    }

    #[test]
    fn an_expired_session_with_shared_messages_is_loaded_to_end_after_the_start() {
        use crate::store::record::{StoredSubscription, next_stamp};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        // Offline for 10 s with an expiry of 1 s; each queues message 1.
        let expired = |id: &str, filter: &str| {
            let mut session = image(next_stamp(), id, vec![(1, QoS::AtLeastOnce)]);
            session.expiry_interval = 1;
            session.offline_since_unix_ms = crate::store::record::unix_ms_now() - 10_000;
            session.subscriptions = vec![StoredSubscription {
                filter: ByteString::from(filter),
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                identifier: 0,
            }];
            session
        };
        let mut empty = expired("shared-empty", "$share/g/t");
        empty.queued.clear();
        let records = [
            Record::Message(1, message(1)),
            Record::SessionImage(expired("shared", "$share/g/t")),
            Record::SessionImage(expired("plain", "t")),
            Record::SessionImage(empty),
        ];
        write_log(dir.path(), &records, 0);
        let loaded = store
            .load_sessions(crate::store::record::unix_ms_now())
            .unwrap();
        let ids: Vec<_> = loaded
            .sessions
            .iter()
            .map(|s| (s.session.client_id.to_string(), s.queued.len()))
            .collect();
        assert_eq!(
            ids,
            vec![("shared".to_string(), 1)],
            "only the one with shared messages to hand on"
        );
        assert_eq!((loaded.expired, loaded.ending), (2, 1));
    }
}
