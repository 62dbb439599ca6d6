//! Shared subscriptions on a shard (docs/ARCHITECTURE.md, "Shared
//! subscriptions"): keeping this shard's replica of the groups
//! (`router::shared::SharedGroups`) and the other shards' replicas up to
//! date, choosing one member per group for each message published here, and
//! delivering what other shards chose this shard's members for.

use bytes::BytesMut;
use bytestring::ByteString;

use crate::mesh::ShardMsg;
use crate::observe::counters::Counters;
use crate::protocol::message::{Encoded, Message};
use crate::protocol::v3::QoS;
use crate::router::shared::{self, Member, MemberUpdate, SharedDelivery, SharedGroups};
use crate::security::acl::Who;
use crate::security::auth::Auth;
use crate::session::{Delivery, Limits, Session};
use crate::shard::registry::home_shard;
use crate::shard::{SessionKey, Shard, may_read};

/// Where the message for one group went.
enum Chosen {
    /// Queued (or pending) for a member of this shard.
    Here,
    /// Sent to the member on that shard.
    Sent,
    /// No member could take it.
    Nobody,
}

impl Shard {
    /// Applies `update` here and sends it to every other shard.
    fn share_update(&mut self, update: MemberUpdate) {
        for peer in (0..self.nr_shards).filter(|&p| p != self.id) {
            self.outbox
                .push((peer, ShardMsg::SharedMember(update.clone())));
        }
        self.shared.apply(update);
    }

    /// Session `key` of this shard joins group `share` (the whole
    /// `$share/...` filter) with granted QoS `qos`, or updates its entry.
    pub fn shared_join(&mut self, key: SessionKey, share: ByteString, qos: QoS) {
        let Some(session) = self.sessions.get(key as usize) else {
            return;
        };
        let member = Member {
            shard: self.id,
            key,
            client_id: ByteString::from(&*session.client_id),
            qos,
            online: session.is_online(),
            read_check: session.read_check,
            username: session.read_check_username().map(ByteString::from),
        };
        self.share_update(MemberUpdate::Join { share, member });
    }

    /// Session `key` of this shard leaves group `share`.
    pub fn shared_leave(&mut self, key: SessionKey, share: &str) {
        let update = MemberUpdate::Leave {
            share: ByteString::from(share),
            shard: self.id,
            key,
        };
        self.share_update(update);
    }

    /// Sends session `key`'s memberships again with its current state: when
    /// it lost its connection (persistent, kept offline), so that publishers
    /// prefer connected members, and when its reads became checked (a
    /// subscription the ACL covers only partly), so that they pass it over
    /// for topics it may not read.
    pub fn shared_refresh(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get(key as usize) else {
            return;
        };
        let shares: Vec<(ByteString, QoS)> = session
            .state
            .subscriptions
            .iter()
            .filter(|(filter, _)| shared::is_shared(filter))
            .map(|(filter, qos)| (ByteString::from(&**filter), *qos))
            .collect();
        for (share, qos) in shares {
            self.shared_join(key, share, qos);
        }
    }

    /// The shard's parts that shared deliveries use, borrowed apart.
    fn shared_parts(&mut self) -> Parts<'_> {
        Parts {
            groups: &mut self.shared,
            targets: Targets {
                sessions: &mut self.sessions,
                dirty: &mut self.dirty,
                stats: &mut self.stats,
                limits: &self.limits,
                auth: &self.auth,
            },
            batch: &mut self.batch,
            shared_out: &mut self.shared_out,
            id: self.id,
        }
    }

    /// The groups matching a message published on this shard: one member
    /// each, by the strategy, among those that can take it; a member on
    /// another shard gets it through [`ShardMsg::SharedPublish`] (sent by
    /// `Ctx::forward_publishes`). Called only when there is a group.
    pub(super) fn route_shared(&mut self, message: &Message, origin: Option<SessionKey>) {
        let publisher_hash = origin
            .and_then(|key| self.sessions.get(key as usize))
            .map_or(0, |s| home_shard(&s.client_id, usize::MAX) as u64);
        let Parts {
            groups,
            mut targets,
            batch,
            shared_out,
            id,
        } = self.shared_parts();
        let mut encoded = Encoded::new(message, batch);
        groups.for_each_match(&message.topic, publisher_hash, |group, first| {
            let mut chosen = Chosen::Nobody;
            // Connected members first, from the strategy's choice on; then
            // the first offline (persistent) one, whose pending queue keeps
            // QoS 1/2 until it reconnects.
            let online = group.members_from(first).filter(|m| m.online);
            let offline = group.members_from(first).filter(|m| !m.online).take(1);
            for member in online.chain(offline) {
                if member.shard != id && !targets.may_read_remote(member, &message.topic) {
                    continue;
                }
                if member.shard != id {
                    if let Some(out) = shared_out.get_mut(member.shard) {
                        out.push(SharedDelivery {
                            message: message.clone(),
                            share: group.share.clone(),
                            key: member.key,
                        });
                        chosen = Chosen::Sent;
                    }
                    break;
                }
                if targets.offer(&mut encoded, &group.share, member) {
                    chosen = Chosen::Here;
                    break;
                }
            }
            match chosen {
                Chosen::Here => targets.stats.shared_deliveries += 1,
                Chosen::Sent => {}
                Chosen::Nobody => targets.stats.shared_dropped += 1,
            }
        });
    }

    /// Messages another shard chose members of this shard for: each goes
    /// to its member or, when that one cannot take it (queue full, session
    /// gone or disconnected), to another member of the group on this shard
    /// that can; with none, to the named member if it is an offline
    /// persistent session (QoS 1/2 wait in its pending queue); otherwise it
    /// is dropped and counted in `shared_dropped`.
    pub fn deliver_shared(&mut self, deliveries: Vec<SharedDelivery>) {
        for delivery in deliveries {
            let Parts {
                groups,
                mut targets,
                batch,
                id,
                ..
            } = self.shared_parts();
            let Some(group) = groups.group(&delivery.share) else {
                targets.stats.shared_dropped += 1;
                continue;
            };
            let here = group.members.iter().filter(|m| m.shard == id);
            let named = here.clone().filter(|m| m.key == delivery.key);
            let others = here.clone().filter(|m| m.key != delivery.key);
            let mut candidates = named
                .clone()
                .chain(others)
                .filter(|m| m.online)
                .chain(named.filter(|m| !m.online));
            let mut encoded = Encoded::new(&delivery.message, batch);
            if candidates.any(|member| targets.offer(&mut encoded, &delivery.share, member)) {
                targets.stats.shared_deliveries += 1;
            } else {
                targets.stats.shared_dropped += 1;
            }
        }
        self.flush_dirty();
    }

    /// True when messages wait to go to other shards' members.
    pub(super) fn has_shared_out(&self) -> bool {
        self.shared_out.iter().any(|out| !out.is_empty())
    }

    /// The messages for other shards' members, by shard.
    pub(super) fn take_shared_out(&mut self) -> Vec<(usize, Vec<SharedDelivery>)> {
        self.shared_out
            .iter_mut()
            .enumerate()
            .filter(|(_, out)| !out.is_empty())
            .map(|(peer, out)| (peer, std::mem::take(out)))
            .collect()
    }
}

/// What [`Shard::route_shared`] and [`Shard::deliver_shared`] borrow of the
/// shard, apart.
struct Parts<'a> {
    /// The replica of the groups.
    groups: &'a mut SharedGroups,
    /// Where local members' messages go.
    targets: Targets<'a>,
    /// The step's QoS 0 frames (see `Shard::route`).
    batch: &'a mut BytesMut,
    /// Messages for other shards' members.
    shared_out: &'a mut Vec<Vec<SharedDelivery>>,
    /// This shard's id.
    id: usize,
}

/// The sessions of this shard that shared messages are offered to, with
/// what an offer updates.
struct Targets<'a> {
    /// The shard's sessions.
    sessions: &'a mut slab::Slab<Box<Session>>,
    /// The shard's dirty list.
    dirty: &'a mut Vec<SessionKey>,
    /// The shard's counters.
    stats: &'a mut Counters,
    /// The per-client limits.
    limits: &'a Limits,
    /// The ACL, for members with a partly covered subscription.
    auth: &'a Auth,
}

impl Targets<'_> {
    /// May `member`, of another shard, read `topic`: its shard checks again,
    /// but a message sent there for a member that may not read it would be
    /// dropped, as that shard does not pass it on to a third. A denial is
    /// counted in `read_denied`.
    fn may_read_remote(&mut self, member: &Member, topic: &str) -> bool {
        if !member.read_check {
            return true;
        }
        let who = Who {
            client_id: &member.client_id,
            username: member.username.as_deref(),
        };
        let may = self.auth.can_read(who, topic);
        if !may {
            self.stats.read_denied += 1;
        }
        may
    }

    /// Offers the message to `member`'s session (of this shard) at the
    /// member's granted QoS, as the copy for its subscription `share`
    /// (`Session::deliver_shared`: that subscription's Subscription
    /// Identifier and Retain As Published): true when it took it (queued, or waiting in
    /// its pending queue), and then it is counted and marked dirty. A
    /// member whose subscription the ACL covers only partly and that may not
    /// read the topic is counted in `read_denied` and passed over.
    fn offer(&mut self, encoded: &mut Encoded<'_>, share: &str, member: &Member) -> bool {
        let Some(session) = self.sessions.get_mut(member.key as usize) else {
            return false;
        };
        if session.read_check && !may_read(self.auth, session, &encoded.message.topic) {
            self.stats.read_denied += 1;
            return false;
        }
        match session.deliver_shared(encoded, share, member.qos, self.limits) {
            Delivery::Queued => {
                let qos = encoded.message.qos.min(member.qos);
                self.stats.publish_sent_by_qos[qos as usize] += 1;
                if !session.dirty {
                    session.dirty = true;
                    self.dirty.push(member.key);
                }
                true
            }
            Delivery::Pending => true,
            Delivery::Skipped | Delivery::Dropped => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::Config;
    use crate::protocol::v3::Subscribe;
    use crate::shard::testing::{self, attach_client};

    /// A QoS 1 message on `topic`.
    fn message(topic: &str, payload: &str) -> Message {
        Message {
            topic: ByteString::from(topic),
            payload: Bytes::from(payload.to_string()),
            qos: QoS::AtLeastOnce,
            retain: false,
            retain_stamp: 0,
            properties: None,
        }
    }

    #[test]
    fn each_message_goes_to_one_member_in_turn_beside_a_plain_subscriber() {
        let mut shard = testing::shard();
        let mut a = attach_client(&mut shard, "a", "$share/g/t/+", QoS::AtLeastOnce, None);
        let mut b = attach_client(&mut shard, "b", "$share/g/t/+", QoS::AtMostOnce, None);
        let mut plain = attach_client(&mut shard, "p", "t/+", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        assert_eq!(shard.shared.members(), 2);
        assert_eq!(shard.router.len(), 1, "the group is not in the router");
        for i in 0..4 {
            shard.publish(message("t/x", &i.to_string()));
        }
        shard.flush_dirty();
        let got_a = a.publishes();
        let got_b = b.publishes();
        assert_eq!(got_a.len(), 2);
        assert_eq!(got_b.len(), 2);
        assert!(got_a.iter().all(|p| p.2 == QoS::AtLeastOnce));
        assert!(
            got_b.iter().all(|p| p.2 == QoS::AtMostOnce),
            "granted QoS 0"
        );
        assert_eq!(plain.publishes().len(), 4);
        assert_eq!(shard.stats.shared_deliveries, 4);
    }

    #[test]
    fn a_member_on_another_shard_gets_the_message_through_the_mesh() {
        let mut publisher = testing::shard_with(0, 2, Config::default());
        let mut member_shard = testing::shard_with(1, 2, Config::default());
        let mut m = attach_client(&mut member_shard, "m", "$share/g/t", QoS::AtLeastOnce, None);
        member_shard.flush_dirty();
        for (peer, msg) in std::mem::take(&mut member_shard.outbox) {
            assert_eq!(peer, 0);
            publisher.handle_control(msg);
        }
        assert_eq!(publisher.shared.members(), 1, "the replica learnt of it");
        publisher.publish(message("t", "x"));
        let out = publisher.take_shared_out();
        assert_eq!(out.len(), 1);
        let (peer, deliveries) = out.into_iter().next().expect("one batch");
        assert_eq!(peer, 1);
        member_shard.handle_control(ShardMsg::SharedPublish(deliveries));
        assert_eq!(m.publishes().len(), 1);
        assert_eq!(member_shard.stats.shared_deliveries, 1);
        // The member leaves: the replica forgets it, the next message is
        // counted as dropped rather than sent nowhere.
        let key = m.key;
        member_shard.remove_session(key);
        for (_, msg) in std::mem::take(&mut member_shard.outbox) {
            publisher.handle_control(msg);
        }
        assert!(publisher.shared.is_empty());
    }

    #[test]
    fn a_member_with_a_full_queue_is_passed_over_for_one_that_can_take_it() {
        let config = Config {
            max_queued_messages: 4,
            ..Config::default()
        };
        let mut shard = testing::shard_with(0, 1, config);
        // `stalled` never reads and its socket buffer is small: its queue
        // fills up; `reading` reads after every step.
        let stalled = attach_client(
            &mut shard,
            "stalled",
            "$share/g/t",
            QoS::AtMostOnce,
            Some(4096),
        );
        let mut reading = attach_client(&mut shard, "reading", "$share/g/t", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let payload = "x".repeat(1000);
        let mut got = 0;
        for _ in 0..60 {
            shard.publish(Message {
                qos: QoS::AtMostOnce,
                ..message("t", &payload)
            });
            shard.flush_dirty();
            got += reading.publishes().len();
        }
        let stalled_queue = shard.sessions[stalled.key as usize].out.publishes();
        assert_eq!(stalled_queue, 4, "the stalled member's queue is full");
        assert_eq!(shard.stats.shared_dropped, 0, "nothing lost");
        assert_eq!(shard.stats.shared_deliveries, 60);
        assert!(got > 30, "the reading member took the rest: {got}");
    }

    #[test]
    fn a_message_for_a_member_that_left_goes_to_another_member_of_its_shard() {
        let mut shard = testing::shard_with(1, 2, Config::default());
        let gone = attach_client(&mut shard, "gone", "$share/g/t", QoS::AtLeastOnce, None);
        let mut other = attach_client(&mut shard, "other", "$share/g/t", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        let _ = other.publishes();
        shard.remove_session(gone.key);
        let delivery = |key| SharedDelivery {
            message: message("t", "x"),
            share: ByteString::from("$share/g/t"),
            key,
        };
        shard.handle_control(ShardMsg::SharedPublish(vec![delivery(gone.key)]));
        assert_eq!(other.publishes().len(), 1);
        // A group this shard no longer has: dropped and counted.
        shard.handle_control(ShardMsg::SharedPublish(vec![SharedDelivery {
            share: ByteString::from("$share/none/t"),
            ..delivery(other.key)
        }]));
        assert_eq!(
            (shard.stats.shared_deliveries, shard.stats.shared_dropped),
            (1, 1)
        );
    }

    /// An ACL that lets every client read everything but
    /// `secret/{its client id}`.
    fn acl_file() -> tempfile::NamedTempFile {
        let mut acl = tempfile::NamedTempFile::new().expect("acl file");
        std::io::Write::write_all(&mut acl, b"topic readwrite #\npattern deny secret/%c\n")
            .expect("write acl");
        acl
    }

    /// Shard `id` of 2 with the ACL `acl` ([`acl_file`]).
    fn shard_with_acl(id: usize, acl: &tempfile::NamedTempFile) -> Shard {
        let config = Config {
            acl_file: Some(acl.path().to_path_buf()),
            ..Config::default()
        };
        let auth = Auth::load(&config).expect("the ACL loads");
        Shard::new(
            id,
            2,
            std::sync::Arc::new(config),
            std::sync::Arc::new(auth),
        )
    }

    #[test]
    fn a_member_of_another_shard_that_may_not_read_the_topic_is_passed_over_there() {
        let acl = acl_file();
        let mut publisher = shard_with_acl(0, &acl);
        let mut remote = shard_with_acl(1, &acl);
        // Both members' "+/+" cover a denied topic: partly covered, their
        // reads are checked; only "anon" may not read secret/anon.
        let _denied = attach_client(&mut remote, "anon", "$share/g/+/+", QoS::AtLeastOnce, None);
        let mut local = attach_client(
            &mut publisher,
            "local",
            "$share/g/+/+",
            QoS::AtLeastOnce,
            None,
        );
        assert!(remote.sessions.iter().all(|(_, s)| s.read_check));
        for (peer, msg) in std::mem::take(&mut remote.outbox) {
            assert_eq!(peer, 0);
            publisher.handle_control(msg);
        }
        assert_eq!(publisher.shared.members(), 2);
        // Round robin would give the remote member every other message;
        // the publishing shard passes it over instead of sending it there,
        // where no other member could take it.
        for i in 0..4 {
            publisher.publish(message("secret/anon", &i.to_string()));
        }
        publisher.flush_dirty();
        assert!(
            publisher.take_shared_out().is_empty(),
            "nothing sent to the denied member"
        );
        assert_eq!(local.publishes().len(), 4);
        assert_eq!(publisher.stats.shared_dropped, 0);
        assert!(publisher.stats.read_denied >= 2);
    }

    #[test]
    fn a_membership_is_announced_again_when_the_sessions_reads_become_checked() {
        let acl = acl_file();
        let mut shard = shard_with_acl(1, &acl);
        // "$share/g/a/b" is fully covered: announced unchecked.
        let member = attach_client(&mut shard, "anon", "$share/g/a/b", QoS::AtLeastOnce, None);
        let checked = |shard: &mut Shard| -> Vec<bool> {
            std::mem::take(&mut shard.outbox)
                .into_iter()
                .filter_map(|(_, msg)| match msg {
                    ShardMsg::SharedMember(MemberUpdate::Join { member, .. }) => {
                        Some(member.read_check)
                    }
                    _ => None,
                })
                .collect()
        };
        assert_eq!(checked(&mut shard), vec![false]);
        // A plain "+/+" covers secret/anon: from now on its reads are
        // checked, and the other shards learn it for the membership too.
        let subscribe = Subscribe {
            packet_id: 2,
            filters: vec![(ByteString::from("+/+"), QoS::AtLeastOnce)],
        };
        shard.subscribe(member.key, subscribe, None);
        assert_eq!(checked(&mut shard), vec![true]);
    }

    #[test]
    fn an_offline_member_is_skipped_while_a_connected_one_can_take_it() {
        let mut shard = testing::shard();
        let off = attach_client(&mut shard, "off", "$share/g/t", QoS::AtLeastOnce, None);
        let mut on = attach_client(&mut shard, "on", "$share/g/t", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        let conn_id = shard.sessions[off.key as usize]
            .link
            .as_ref()
            .map(|l| l.conn_id)
            .expect("connected");
        shard.sessions[off.key as usize].clean_session = false;
        shard.end_connection(off.key, conn_id);
        for i in 0..3 {
            shard.publish(message("t", &i.to_string()));
        }
        shard.flush_dirty();
        assert_eq!(on.publishes().len(), 3);
        assert_eq!(shard.stats.shared_dropped, 0);
    }
}
