//! Shared subscriptions on a shard (docs/ARCHITECTURE.md, "Shared
//! subscriptions"): keeping this shard's replica of the groups
//! (`router::shared::SharedGroups`) and the other shards' replicas up to
//! date, choosing one member per group for each message published here, and
//! delivering what other shards chose this shard's members for.

use bytestring::ByteString;

use crate::mesh::ShardMsg;
use crate::observe::counters::Counters;
use crate::protocol::message::{Batch, Encoded, Message};
use crate::protocol::v3::QoS;
use crate::router::shared::{self, Member, MemberUpdate, SharedDelivery, SharedGroups};
use crate::security::acl::Who;
use crate::security::auth::Auth;
use crate::session::link::TICKS_PER_SEC;
use crate::session::{Delivery, Limits, Session, SessionState};
use crate::shard::registry::home_shard;
use crate::shard::{SessionKey, Shard, may_read, persist};

/// Persistent sessions taken over from a shard that it remembers (the
/// latest), for shared deliveries still on their way to them: such a
/// delivery was sent before the publishing shard learnt of the take-over,
/// a few mesh hops at most, so the latest thousand take-overs (about 50 KB
/// a shard) cover it even in a take-over storm.
pub const MOVES_KEPT: usize = 1024;

/// How many times a shared delivery follows a session that is taken over
/// again and again before it is dropped (and counted): a bound, so that no
/// message travels between shards for ever.
pub const MOST_PASSES: u8 = 8;

/// How long a shard holds back the `Leave` of a membership whose session
/// was taken over by another shard's connection, when that shard's `Join`
/// does not come (the session ended there before it was attached): the
/// other shards then forget the stale entry.
pub const MOVE_WAIT_SECS: u32 = 30;

/// A persistent session taken over from this shard.
#[derive(Debug)]
pub struct Moved {
    /// Its key here, which shared deliveries for it name.
    key: SessionKey,
    /// Its client id, which names it on its new shard.
    client_id: ByteString,
    /// The shard of the connection that took it over.
    shard: usize,
    /// When, in keep-alive ticks.
    since: u32,
    /// The groups whose `Leave` the other shards have not been sent yet
    /// (see [`Shard::shared_moved`]).
    leaves: Vec<ByteString>,
}

/// What became of one message another shard chose a member here for.
enum Shared {
    /// A member here took it, or the state of a session about to attach here.
    Taken,
    /// No member here could take it.
    Dropped,
    /// Its member was taken over by a connection on that shard: the
    /// delivery to pass on there, naming it by client id.
    Moved(usize, SharedDelivery),
}

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
        self.send_to_peers(&update);
        self.shared_member_update(update);
    }

    /// Sends `update` to every other shard.
    fn send_to_peers(&mut self, update: &MemberUpdate) {
        for peer in (0..self.nr_shards).filter(|&p| p != self.id) {
            self.outbox
                .push((peer, ShardMsg::SharedMember(update.clone())));
        }
    }

    /// Applies a membership change of this shard or another to the replica;
    /// a `Join` may end what this shard keeps of a session taken over from
    /// it ([`Shard::shared_moved`]).
    pub fn shared_member_update(&mut self, update: MemberUpdate) {
        if self.moves_waiting > 0
            && let MemberUpdate::Join { share, member } = &update
        {
            self.move_arrived(member, share);
        }
        let now = self.now_ticks();
        self.shared.apply(update, now);
    }

    /// The persistent session `key` of this shard, `session`, was taken
    /// over by a connection on shard `to` (this one or another), its state
    /// with it. Every replica keeps its memberships, as offline, until a
    /// `Join` of its client id to the group (from its new shard) reaches
    /// this shard, then this shard sends their `Leave` (after
    /// [`MOVE_WAIT_SECS`] without one, too): so a message published
    /// meanwhile still finds the session in its group, and
    /// [`Shard::deliver_shared`] passes it on to shard `to`. That `Leave`
    /// names the new shard (`moved_to`): a third shard that gets it before
    /// the new shard's `Join` (another channel) keeps the entry until the
    /// `Join` is applied there (`SharedGroups::leave_moved`), so no replica
    /// lacks the member in between.
    pub(super) fn shared_moved(&mut self, key: SessionKey, session: &Session, to: usize) {
        let mut leaves = Vec::new();
        for (filter, qos) in &session.state.subscriptions {
            if !shared::is_shared(filter) {
                continue;
            }
            let share = ByteString::from(&**filter);
            let member = Member {
                shard: self.id,
                key,
                client_id: ByteString::from(&*session.client_id),
                qos: *qos,
                online: false,
                read_check: session.read_check,
                username: session.read_check_username().map(ByteString::from),
            };
            self.share_update(MemberUpdate::Join {
                share: share.clone(),
                member,
            });
            leaves.push(share);
        }
        if leaves.is_empty() {
            return;
        }
        if self.moved.len() >= MOVES_KEPT
            && let Some(oldest) = self.moved.pop_front()
        {
            if !oldest.leaves.is_empty() {
                self.moves_waiting -= 1;
            }
            self.end_move(oldest.key, oldest.leaves, None);
        }
        self.moves_waiting += 1;
        self.moved.push_back(Moved {
            key,
            client_id: ByteString::from(&*session.client_id),
            shard: to,
            since: self.now_ticks(),
            leaves,
        });
    }

    /// A `Join` of `member` to `share`: for a session taken over from here
    /// with that client id, its entry there is no longer needed (its
    /// `Leave` goes out); an entry of this shard with the same key is a new
    /// session's (the key was reused), which the record no longer names.
    fn move_arrived(&mut self, member: &Member, share: &str) {
        let id = self.id;
        let mut leaves = Vec::new();
        for moved in &mut self.moved {
            let reused = member.shard == id && member.key == moved.key;
            let arrived = !reused && *moved.client_id == *member.client_id;
            if !(reused || arrived) {
                continue;
            }
            let before = moved.leaves.len();
            moved.leaves.retain(|s| &**s != share);
            if moved.leaves.len() == before {
                continue;
            }
            if arrived {
                leaves.push((moved.key, member.shard));
            }
            if moved.leaves.is_empty() {
                self.moves_waiting -= 1;
            }
        }
        for (key, to) in leaves {
            self.end_move(key, vec![ByteString::from(share)], Some(to));
        }
    }

    /// Sends (and applies) the `Leave`s of the entries `leaves` of this
    /// shard's session `key`, one taken over from here: `moved_to` the
    /// shard whose `Join` replaced them, None when none came.
    fn end_move(&mut self, key: SessionKey, leaves: Vec<ByteString>, moved_to: Option<usize>) {
        for share in leaves {
            self.share_update(MemberUpdate::Leave {
                share,
                shard: self.id,
                key,
                moved_to,
            });
        }
    }

    /// Sends the `Leave`s held back for more than [`MOVE_WAIT_SECS`] (no
    /// `Join` came: the session ended on its new shard before it was
    /// attached); true when there were any (the outbox has them).
    /// Also forgets the entries this replica kept for a `Join` that did
    /// not come within as long (`SharedGroups::end_replaced`).
    pub fn end_old_moves(&mut self, now: u32) -> bool {
        let wait = MOVE_WAIT_SECS * TICKS_PER_SEC;
        self.shared.end_replaced(now, wait);
        if self.moves_waiting == 0 {
            return false;
        }
        let mut ended = Vec::new();
        for moved in &mut self.moved {
            if !moved.leaves.is_empty() && now.saturating_sub(moved.since) > wait {
                ended.push((moved.key, std::mem::take(&mut moved.leaves)));
            }
        }
        self.moves_waiting -= ended.len();
        let any = !ended.is_empty();
        for (key, leaves) in ended {
            self.end_move(key, leaves, None);
        }
        any
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
            moved_to: None,
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
                keepers: persist::Keepers::new(
                    &self.persist_stamps,
                    &mut self.persist_refs,
                    &mut self.persist_sent,
                    &mut self.persist_hold,
                ),
            },
            batch: &mut self.batch,
            shared_out: &mut self.shared_out,
            moved: Moves {
                moved: &self.moved,
                waiting: self.moves_waiting,
            },
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
            moved,
            id,
        } = self.shared_parts();
        // Chosen members taken over from here: passed on to their new shard.
        let mut passed_on: Vec<(usize, SharedDelivery)> = Vec::new();
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
                            client_id: None,
                            passes: 0,
                            barrier: None,
                        });
                        chosen = Chosen::Sent;
                    }
                    break;
                }
                if let Some(record) = moved.member(member.key, &group.share) {
                    passed_on.push((
                        record.shard,
                        SharedDelivery {
                            message: message.clone(),
                            share: group.share.clone(),
                            key: member.key,
                            client_id: Some(record.client_id.clone()),
                            passes: 1,
                            barrier: None,
                        },
                    ));
                    chosen = Chosen::Sent;
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
        drop(encoded);
        if let Some(mid) = targets.keepers.mid() {
            self.journal_queued(message, mid);
        }
        // With persistence, the publisher's acknowledgement waits for a
        // delivery passed on to another shard as for one sent there by
        // `Ctx::forward_publishes`: it joins the step's barrier now, as it
        // goes through the outbox (behind the session state) before that
        // barrier is started. One kept here is in this shard's journal,
        // which the acknowledgement waits for anyway.
        let waited = self.session_journal.is_some() && message.qos != QoS::AtMostOnce;
        for (to, mut delivery) in passed_on {
            if waited && to != self.id {
                delivery.barrier = Some((self.id, self.held_acks.join_open()));
            }
            self.pass_on(to, delivery);
        }
    }

    /// Sends `delivery` on to shard `to` (naming its member by client id)
    /// through the outbox: behind the session state that the take-over sent
    /// there ([`Shard::evict`]), on the same ordered queue; or, when `to`
    /// is this shard, delivers it here.
    fn pass_on(&mut self, to: usize, delivery: SharedDelivery) {
        if to == self.id {
            self.deliver_shared(vec![delivery]);
        } else {
            self.outbox
                .push((to, ShardMsg::SharedPublish(vec![delivery])));
        }
    }

    /// Messages another shard chose members of this shard for: each goes
    /// to its member or, when that one cannot take it (queue full, session
    /// gone or disconnected), to another member of the group on this shard
    /// that can; with none, to the named member if it is an offline
    /// persistent session (QoS 1/2 wait in its pending queue). A member
    /// whose session was taken over meanwhile by a connection on another
    /// shard (one of the latest [`MOVES_KEPT`]) gets it there: it is passed
    /// on, in order behind the session state, and that shard gives it to
    /// the session or, not attached yet, to its granted state's pending
    /// queue. Otherwise it is dropped and counted in `shared_dropped`.
    ///
    /// The barriers of the deliveries settled here (given or dropped, not
    /// passed on) gather in `shared_settled`, for the publishing shards'
    /// acknowledgements (`shard::inbox` answers them once durable).
    pub fn deliver_shared(&mut self, deliveries: Vec<SharedDelivery>) {
        let mut queue: std::collections::VecDeque<SharedDelivery> = deliveries.into();
        while let Some(delivery) = queue.pop_front() {
            let barrier = delivery.barrier;
            let outcome = self.deliver_one_shared(delivery);
            if let (Some(barrier), Shared::Taken | Shared::Dropped) = (barrier, &outcome) {
                self.shared_settled.push(barrier);
            }
            match outcome {
                Shared::Taken => self.stats.shared_deliveries += 1,
                Shared::Dropped => self.stats.shared_dropped += 1,
                Shared::Moved(to, delivery) if to == self.id => queue.push_back(delivery),
                Shared::Moved(to, delivery) => self.pass_on(to, delivery),
            }
        }
        self.flush_dirty();
    }

    /// One delivery of [`Shard::deliver_shared`].
    fn deliver_one_shared(&mut self, delivery: SharedDelivery) -> Shared {
        // Passed on after a take-over: the member is named by client id.
        let named_key = match &delivery.client_id {
            Some(client_id) => self.session_key(client_id),
            None => Some(delivery.key),
        };
        let Parts {
            groups,
            mut targets,
            batch,
            moved,
            id,
            ..
        } = self.shared_parts();
        let mut named_here = false;
        if let Some(group) = groups.group(&delivery.share) {
            // This shard's entries, less those of sessions taken over from
            // here (whose keys may name other sessions by now).
            let here = group
                .members
                .iter()
                .filter(|m| m.shard == id && moved.member(m.key, &delivery.share).is_none());
            let named = here.clone().filter(|m| Some(m.key) == named_key);
            let others = here.clone().filter(|m| Some(m.key) != named_key);
            named_here = named.clone().next().is_some();
            let mut candidates = named
                .clone()
                .chain(others)
                .filter(|m| m.online)
                .chain(named.filter(|m| !m.online));
            let mut encoded = Encoded::new(&delivery.message, batch);
            let taken =
                candidates.any(|member| targets.offer(&mut encoded, &delivery.share, member));
            drop(encoded);
            if let Some(mid) = targets.keepers.mid() {
                self.journal_queued(&delivery.message, mid);
            }
            if taken {
                return Shared::Taken;
            }
        }
        if let Some(client_id) = &delivery.client_id {
            // Taken over by a connection here that has not attached the
            // session yet: its state keeps the message.
            let limits = self.limits;
            let kept = self
                .granted_state_mut(client_id)
                .map(|state| state.keep_shared(&delivery.message, &delivery.share, &limits));
            if let Some(kept) = kept {
                return if kept == Delivery::Pending {
                    Shared::Taken
                } else {
                    Shared::Dropped
                };
            }
            // Taken over again, from here, while the message followed it.
            let moved = self.moved.iter().rev().find(|m| m.client_id == *client_id);
            return match moved {
                Some(moved) if delivery.passes < MOST_PASSES => Shared::Moved(
                    moved.shard,
                    SharedDelivery {
                        passes: delivery.passes + 1,
                        ..delivery
                    },
                ),
                _ => self.another_member(delivery),
            };
        }
        if named_here {
            return self.another_member(delivery);
        }
        match self.moved.iter().rev().find(|m| m.key == delivery.key) {
            Some(moved) => {
                let to = moved.shard;
                let client_id = Some(moved.client_id.clone());
                Shared::Moved(
                    to,
                    SharedDelivery {
                        client_id,
                        passes: 1,
                        ..delivery
                    },
                )
            }
            None => self.another_member(delivery),
        }
    }

    /// A message no member of this shard could take, its own member gone
    /// (a clean session ended or taken over in a clean start: nothing of it
    /// to follow) or unable to take it: sent on to a member of the group on
    /// another shard (connected ones first, then an offline persistent
    /// one), as §4.8.2 asks for a message whose chosen member's session
    /// ended; the member chosen there may be the session that took this
    /// one over, once it subscribed again. Dropped when there is none, or
    /// after [`MOST_PASSES`] passes.
    fn another_member(&mut self, delivery: SharedDelivery) -> Shared {
        if delivery.passes >= MOST_PASSES {
            return Shared::Dropped;
        }
        let Parts {
            groups,
            mut targets,
            id,
            ..
        } = self.shared_parts();
        let Some(group) = groups.group(&delivery.share) else {
            return Shared::Dropped;
        };
        let elsewhere = group.members.iter().filter(|m| m.shard != id);
        let online = elsewhere.clone().filter(|m| m.online);
        let offline = elsewhere.filter(|m| !m.online);
        let topic = &delivery.message.topic;
        let chosen = online
            .chain(offline)
            .find(|m| targets.may_read_remote(m, topic))
            .map(|m| (m.shard, m.key));
        match chosen {
            Some((to, key)) => Shared::Moved(
                to,
                SharedDelivery {
                    key,
                    client_id: None,
                    passes: delivery.passes + 1,
                    ..delivery
                },
            ),
            None => Shared::Dropped,
        }
    }

    /// The session of this shard whose state was `state` ended (a clean
    /// session at disconnect, an expired one, one ended by a clean start):
    /// the QoS 1/2 messages its shared subscriptions gave it and its client
    /// did not take ([`SessionState::shared_backlog`]) go to another member
    /// of the same group, as §4.8.2 asks. Its memberships have left the
    /// groups already ([`Shard::hand_on_shared`]). The publisher was
    /// answered long ago, so no durability barrier waits for these.
    pub(super) fn pass_on_shared_backlog(&mut self, state: &SessionState) {
        if self.shared.is_empty() {
            return;
        }
        self.hand_on_shared(Self::backlog_of(state), None);
    }

    /// [`Shard::pass_on_shared_backlog`] of a journalled persistent
    /// session that ends (expired): with persistence, the deliveries sent
    /// to members on other shards carry a barrier of their own, whose
    /// token this returns (None: none went elsewhere, or persistence is
    /// off). Each shard answers once its journal holds what it kept
    /// (`shard::inbox`); the session's drop record waits for that
    /// ([`Shard::journal_drop_after`]), so a `kill -9` in between brings
    /// the session back with its backlog rather than lose it.
    pub(super) fn hand_over_shared_backlog(&mut self, state: &SessionState) -> Option<u64> {
        if self.shared.is_empty() || self.session_journal.is_none() {
            self.pass_on_shared_backlog(state);
            return None;
        }
        let barrier = self.held_acks.new_barrier();
        self.hand_on_shared(Self::backlog_of(state), Some(barrier));
        if self.held_acks.passed(barrier) {
            return None;
        }
        Some(barrier)
    }

    /// The QoS 1/2 messages `state`'s shared subscriptions gave it that its
    /// client did not take, with their groups.
    fn backlog_of(state: &SessionState) -> impl Iterator<Item = (ByteString, Message)> {
        state
            .shared_backlog()
            .into_iter()
            .map(|(share, message)| (ByteString::from(&*share), message))
    }

    /// Session `key` unsubscribed from the shared subscription `share`
    /// (and has left its group): the messages the group gave it that wait
    /// unsent in its pending queue ([`SessionState::take_shared_pending`])
    /// go to another member, as [`Shard::pass_on_shared_backlog`] hands
    /// on those of a session that ends. Only while the group has another
    /// member: with none, they stay with the session, which may still
    /// deliver what it has buffered (MQTT-3.10.4-2), rather than be
    /// dropped.
    pub(super) fn pass_on_unsubscribed_share(&mut self, key: SessionKey, share: &str) {
        if self
            .shared
            .group(share)
            .is_none_or(|group| group.members.is_empty())
        {
            return;
        }
        let Some(session) = self.sessions.get_mut(key as usize) else {
            return;
        };
        let taken = session.state.take_shared_pending(share);
        if !taken.is_empty() {
            let share = ByteString::from(share);
            self.hand_on_shared(taken.into_iter().map(|m| (share.clone(), m)), None);
        }
    }

    /// Gives each `(share, message)` of a member that left its group to
    /// another member: a connected member of this shard first, then one
    /// of another shard (connected first, through the mesh, as
    /// [`Shard::another_member`] chooses), then an offline persistent
    /// member here; a message no member can take is dropped and counted in
    /// `shared_dropped`. With `barrier`, each delivery sent to another
    /// shard joins it ([`Shard::hand_over_shared_backlog`]).
    fn hand_on_shared(
        &mut self,
        backlog: impl IntoIterator<Item = (ByteString, Message)>,
        barrier: Option<u64>,
    ) {
        for (share, message) in backlog {
            let delivery = SharedDelivery {
                message,
                share,
                // No member is named: `another_member` names the one chosen.
                key: SessionKey::MAX,
                client_id: None,
                passes: 0,
                barrier: None,
            };
            if self.offer_here(&delivery, true) {
                self.stats.shared_deliveries += 1;
                continue;
            }
            match self.another_member(delivery.clone()) {
                Shared::Moved(to, mut delivery) => {
                    if let Some(token) = barrier {
                        delivery.barrier = Some((self.id, token));
                        self.held_acks.join(token);
                    }
                    self.pass_on(to, delivery);
                }
                _ if self.offer_here(&delivery, false) => self.stats.shared_deliveries += 1,
                _ => self.stats.shared_dropped += 1,
            }
        }
        self.flush_dirty();
    }

    /// Offers `delivery` to the members of its group on this shard that are
    /// connected (`online`) or offline: true when one took it.
    fn offer_here(&mut self, delivery: &SharedDelivery, online: bool) -> bool {
        let Parts {
            groups,
            mut targets,
            batch,
            moved,
            id,
            ..
        } = self.shared_parts();
        let Some(group) = groups.group(&delivery.share) else {
            return false;
        };
        let mut here = group.members.iter().filter(|m| {
            m.shard == id && m.online == online && moved.member(m.key, &delivery.share).is_none()
        });
        let mut encoded = Encoded::new(&delivery.message, batch);
        let taken = here.any(|member| targets.offer(&mut encoded, &delivery.share, member));
        drop(encoded);
        if let Some(mid) = targets.keepers.mid() {
            self.journal_queued(&delivery.message, mid);
        }
        taken
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
    batch: &'a mut Batch,
    /// Messages for other shards' members.
    shared_out: &'a mut Vec<Vec<SharedDelivery>>,
    /// The sessions taken over from this shard.
    moved: Moves<'a>,
    /// This shard's id.
    id: usize,
}

/// The sessions taken over from a shard that its replica still lists.
#[derive(Clone, Copy)]
struct Moves<'a> {
    /// The shard's records, newest last.
    moved: &'a std::collections::VecDeque<Moved>,
    /// How many of them still hold back a `Leave`.
    waiting: usize,
}

impl<'a> Moves<'a> {
    /// The record of this shard's entry `key` in group `share`, when that
    /// entry is a session taken over from here (its `Leave` held back).
    fn member(self, key: SessionKey, share: &str) -> Option<&'a Moved> {
        if self.waiting == 0 {
            return None;
        }
        self.moved
            .iter()
            .rev()
            .find(|m| m.key == key && m.leaves.iter().any(|s| **s == *share))
    }
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
    /// The journalled members that keep the message, for its records
    /// (one message per [`Targets`]: see [`Shard::shared_parts`]).
    keepers: persist::Keepers<'a>,
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
        // A journalled member keeps a QoS 1/2 message on disk too, as a
        // plain subscriber does (`Shard::route_from`).
        let limits = self.limits;
        let delivery = self.keepers.offer(session, member.key, |session| {
            session.deliver_shared(encoded, share, member.qos, limits)
        });
        match delivery {
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
            client_id: None,
            passes: 0,
            barrier: Some((0, 5)),
        };
        shard.handle_control(ShardMsg::SharedPublish(vec![delivery(gone.key)]));
        assert_eq!(other.publishes().len(), 1);
        assert_eq!(
            std::mem::take(&mut shard.shared_settled),
            vec![(0, 5)],
            "settled here: this shard answers the publisher's barrier"
        );
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

    /// Carries every message in the shards' outboxes to its shard until
    /// none is left (the mesh, in order per pair of shards).
    fn pump(shards: &mut [Shard]) {
        loop {
            let mut moved = false;
            for from in 0..shards.len() {
                for (peer, msg) in std::mem::take(&mut shards[from].outbox) {
                    moved = true;
                    shards[peer].handle_control(msg);
                }
            }
            if !moved {
                return;
            }
        }
    }

    #[test]
    fn a_message_for_a_member_taken_over_meanwhile_follows_it_to_its_new_shard() {
        let mut shards = [
            testing::shard_with(0, 2, Config::default()),
            testing::shard_with(1, 2, Config::default()),
        ];
        let old = attach_client(&mut shards[0], "m", "$share/g/t", QoS::AtLeastOnce, None);
        shards[0].sessions[old.key as usize].clean_session = false;
        let clean = attach_client(&mut shards[0], "c", "$share/h/t", QoS::AtLeastOnce, None);
        pump(&mut shards);
        assert_eq!(shards[1].shared.members(), 2);
        // A connection on shard 1 takes the persistent session over; the
        // state is granted to its claim, not attached yet.
        shards[1].start_claim(ByteString::from("m"), false);
        pump(&mut shards);
        assert!(shards[0].session_key("m").is_none(), "it left shard 0");
        assert!(shards[1].granted_state_mut("m").is_some());
        // A message chosen for it on shard 0 before the take-over was known
        // there arrives after it left: passed on, kept by the state.
        let stale = SharedDelivery {
            message: message("t", "late"),
            share: ByteString::from("$share/g/t"),
            key: old.key,
            client_id: None,
            passes: 0,
            barrier: Some((0, 9)),
        };
        shards[0].handle_control(ShardMsg::SharedPublish(vec![stale.clone()]));
        // Passed on: the barrier goes with it, and the shard that keeps it
        // answers (once, whoever passed it).
        assert!(shards[0].shared_settled.is_empty());
        assert!(matches!(
            &shards[0].outbox[..],
            [(1, ShardMsg::SharedPublish(d))] if d[0].barrier == Some((0, 9))
        ));
        pump(&mut shards);
        assert_eq!(std::mem::take(&mut shards[1].shared_settled), vec![(0, 9)]);
        // Messages published now, on either shard, still find it in the
        // group (offline, its old shard's entry), and follow it too.
        shards[0].publish(message("t", "on 0"));
        shards[1].publish(message("t", "on 1"));
        for shard in shards.iter_mut() {
            let out = shard.take_shared_out();
            for (peer, deliveries) in out {
                shard
                    .outbox
                    .push((peer, ShardMsg::SharedPublish(deliveries)));
            }
        }
        pump(&mut shards);
        let pending = |shards: &mut [Shard]| {
            shards[1]
                .granted_state_mut("m")
                .and_then(|state| state.flows.as_ref())
                .map_or(0, |flows| flows.pending.len())
        };
        assert_eq!(pending(&mut shards), 3, "kept for the session");
        assert_eq!(shards[0].stats.shared_dropped, 0);
        assert_eq!(shards[1].stats.shared_deliveries, 3);
        // Attached there: its Join reaches shard 0, whose entry goes.
        let state = shards[1]
            .granted_state_mut("m")
            .map(std::mem::take)
            .expect("the granted state");
        let session = Session::new(ByteString::from("m"), false, state);
        shards[1].insert_session(session);
        pump(&mut shards);
        for shard in &shards {
            let group = shard.shared.group("$share/g/t").expect("the group");
            let entries: Vec<usize> = group.members.iter().map(|m| m.shard).collect();
            assert_eq!(entries, [1], "shard {}: only the new entry", shard.id);
        }
        // A clean session taken over leaves nothing to follow.
        shards[1].start_claim(ByteString::from("c"), true);
        pump(&mut shards);
        shards[0].handle_control(ShardMsg::SharedPublish(vec![SharedDelivery {
            key: clean.key,
            share: ByteString::from("$share/h/t"),
            ..stale
        }]));
        assert!(shards[0].outbox.is_empty());
        // Dropped: that one, and the two ("on 0", "on 1") in flight to "c"
        // when its session ended, with no other member in group h.
        assert_eq!(shards[0].stats.shared_dropped, 3);
    }

    #[test]
    fn a_delivery_passed_on_at_once_holds_the_publishers_ack_until_its_new_shard_settles_it() {
        let mut shards = [
            testing::shard_with(0, 2, Config::default()),
            testing::shard_with(1, 2, Config::default()),
        ];
        let old = attach_client(&mut shards[0], "m", "$share/g/t", QoS::AtLeastOnce, None);
        shards[0].sessions[old.key as usize].clean_session = false;
        pump(&mut shards);
        shards[1].start_claim(ByteString::from("m"), false);
        pump(&mut shards);
        assert!(shards[1].granted_state_mut("m").is_some(), "taken over");
        // With persistence, a QoS 1 publish on shard 0 right after: its
        // member is the entry of the session taken over from there, so the
        // delivery is passed on at once, through the outbox.
        let _journal = testing::unwritten_journal(&mut shards[0]);
        shards[0].publish(message("t", "now"));
        let barrier = match &shards[0].outbox[..] {
            [(1, ShardMsg::SharedPublish(d))] => d[0].barrier,
            other => panic!("one delivery for shard 1 expected: {other:?}"),
        };
        let (from, token) = barrier.expect("the passed-on delivery carries the barrier");
        assert_eq!(from, 0);
        // The step's barrier (one peer's batch besides) is that one, and
        // waits for the new shard's answer too.
        let cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert_eq!(shards[0].held_acks.start(1), token);
        shards[0].held_acks.applied(token);
        assert!(shards[0].held_acks.poll_applied(token, &cx).is_pending());
        pump(&mut shards);
        assert_eq!(
            std::mem::take(&mut shards[1].shared_settled),
            vec![(0, token)],
            "settled on the new shard, which answers once durable"
        );
        shards[0].handle_control(ShardMsg::SharedDurable { token, count: 1 });
        assert!(shards[0].held_acks.poll_applied(token, &cx).is_ready());
        // A QoS 0 publish takes no barrier.
        shards[0].publish(Message {
            qos: QoS::AtMostOnce,
            ..message("t", "q0")
        });
        assert!(matches!(
            &shards[0].outbox[..],
            [(1, ShardMsg::SharedPublish(d))] if d[0].barrier.is_none()
        ));
        assert!(!shards[0].held_acks.has_open());
    }

    /// Shard `id` of 3.
    fn shard_of_3(id: usize) -> Shard {
        testing::shard_with(id, 3, Config::default())
    }

    /// A client id `prefix`N whose home is shard 0 of 3, where the tests
    /// attach it (so the home knows the session without a claim).
    fn homed_on_0(prefix: &str) -> String {
        (0..100)
            .map(|i| format!("{prefix}{i}"))
            .find(|id| home_shard(id, 3) == 0)
            .expect("an id homed on shard 0")
    }

    /// Sends every message `from`'s outbox holds for `to` there; the rest
    /// stays in the outbox.
    fn carry(shards: &mut [Shard], from: usize, to: usize) {
        let (there, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut shards[from].outbox)
            .into_iter()
            .partition(|(peer, _)| *peer == to);
        shards[from].outbox = rest;
        for (_, msg) in there {
            shards[to].handle_control(msg);
        }
    }

    /// Hands each shard's shared deliveries to its outbox (what
    /// `Ctx::forward_publishes` sends).
    fn queue_shared_out(shards: &mut [Shard]) {
        for shard in shards.iter_mut() {
            for (peer, deliveries) in shard.take_shared_out() {
                shard
                    .outbox
                    .push((peer, ShardMsg::SharedPublish(deliveries)));
            }
        }
    }

    #[test]
    fn a_third_shard_that_gets_the_old_shards_leave_first_still_finds_the_member() {
        let mut shards = [shard_of_3(0), shard_of_3(1), shard_of_3(2)];
        let id = homed_on_0("m");
        let old = attach_client(&mut shards[0], &id, "$share/g/t", QoS::AtLeastOnce, None);
        shards[0].sessions[old.key as usize].clean_session = false;
        pump(&mut shards);
        // A connection on shard 1 takes the session over and attaches it.
        shards[1].start_claim(ByteString::from(id.as_str()), false);
        pump(&mut shards);
        let state = shards[1]
            .granted_state_mut(&id)
            .map(std::mem::take)
            .expect("the granted state");
        shards[1].insert_session(Session::new(ByteString::from(id.as_str()), false, state));
        // Shard 1's Join reaches shard 0 but not yet shard 2; shard 0 then
        // sends its Leave, which reaches shard 2 first.
        carry(&mut shards, 1, 0);
        carry(&mut shards, 0, 2);
        carry(&mut shards, 0, 1);
        let group = shards[2].shared.group("$share/g/t").expect("the group");
        assert_eq!(group.members.len(), 1, "the old entry is kept");
        // A message published on shard 2 in that instant goes to shard 0,
        // which passes it on to the session on shard 1.
        shards[2].publish(message("t", "between"));
        queue_shared_out(&mut shards);
        carry(&mut shards, 2, 0);
        pump(&mut shards);
        assert_eq!(shards[2].stats.shared_dropped, 0);
        assert_eq!(shards[0].stats.shared_dropped, 0);
        let key = shards[1].session_key(&id).expect("attached on shard 1");
        let pending = shards[1].sessions[key as usize]
            .state
            .flows
            .as_ref()
            .map_or(0, |flows| flows.pending.len());
        assert_eq!(pending, 1, "kept for the offline session");
        // The Join, now applied on shard 2, ends the old entry.
        for shard in &shards {
            let group = shard.shared.group("$share/g/t").expect("the group");
            let entries: Vec<usize> = group.members.iter().map(|m| m.shard).collect();
            assert_eq!(entries, [1], "shard {}: only the new entry", shard.id);
        }
    }

    #[test]
    fn a_message_for_a_clean_member_taken_over_goes_to_another_member_of_the_group() {
        let mut shards = [shard_of_3(0), shard_of_3(1), shard_of_3(2)];
        let id = homed_on_0("c");
        let clean = attach_client(&mut shards[0], &id, "$share/h/t", QoS::AtLeastOnce, None);
        let mut other = attach_client(&mut shards[2], "o", "$share/h/t", QoS::AtLeastOnce, None);
        pump(&mut shards);
        // Taken over in a clean start: its session, state and membership
        // end on shard 0.
        shards[1].start_claim(ByteString::from(id.as_str()), true);
        pump(&mut shards);
        assert!(shards[0].session_key(&id).is_none());
        let stale = SharedDelivery {
            message: message("t", "in flight"),
            share: ByteString::from("$share/h/t"),
            key: clean.key,
            client_id: None,
            passes: 0,
            barrier: None,
        };
        shards[0].handle_control(ShardMsg::SharedPublish(vec![stale.clone()]));
        pump(&mut shards);
        assert_eq!(other.publishes().len(), 1, "another member took it");
        assert_eq!(shards[0].stats.shared_dropped, 0);
        // The other member goes; the new session subscribes again on shard
        // 1: the next one in flight goes to it.
        shards[2].remove_session(other.key);
        let mut new = attach_client(
            &mut shards[1],
            "c-new",
            "$share/h/t",
            QoS::AtLeastOnce,
            None,
        );
        pump(&mut shards);
        shards[0].handle_control(ShardMsg::SharedPublish(vec![stale.clone()]));
        pump(&mut shards);
        assert_eq!(new.publishes().len(), 1, "the new session took it");
        // With no member left anywhere, it is dropped and counted.
        shards[1].remove_session(new.key);
        pump(&mut shards);
        shards[0].handle_control(ShardMsg::SharedPublish(vec![stale]));
        assert!(shards[0].outbox.is_empty());
        assert_eq!(shards[0].stats.shared_dropped, 1);
    }

    #[test]
    fn a_message_no_member_can_take_stops_after_the_most_passes() {
        let mut shard = shard_of_3(0);
        let mut groups_peer = shard_of_3(1);
        let _remote = attach_client(&mut groups_peer, "r", "$share/g/t", QoS::AtLeastOnce, None);
        for (_, msg) in std::mem::take(&mut groups_peer.outbox) {
            shard.handle_control(msg);
        }
        let delivery = |passes| SharedDelivery {
            message: message("t", "x"),
            share: ByteString::from("$share/g/t"),
            key: 77,
            client_id: None,
            passes,
            barrier: None,
        };
        shard.handle_control(ShardMsg::SharedPublish(vec![delivery(MOST_PASSES - 1)]));
        assert_eq!(shard.outbox.len(), 1, "passed on to shard 1's member");
        shard.outbox.clear();
        shard.handle_control(ShardMsg::SharedPublish(vec![delivery(MOST_PASSES)]));
        assert!(shard.outbox.is_empty());
        assert_eq!(shard.stats.shared_dropped, 1);
    }

    #[test]
    fn a_member_of_another_shard_that_may_not_read_the_topic_is_passed_over_there() {
        let acl = testing::acl_file();
        let mut publisher = testing::shard_with_acl(0, 2, &acl);
        let mut remote = testing::shard_with_acl(1, 2, &acl);
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
        let acl = testing::acl_file();
        let mut shard = testing::shard_with_acl(1, 2, &acl);
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

    /// The connection id of `key`'s link.
    fn conn_of(shard: &Shard, key: SessionKey) -> u64 {
        shard.sessions[key as usize]
            .link
            .as_ref()
            .map(|l| l.conn_id)
            .expect("connected")
    }

    #[test]
    fn a_clean_members_unacknowledged_shared_messages_go_to_another_member_when_it_ends() {
        let config = Config {
            max_inflight_messages: 1,
            ..Config::default()
        };
        let mut shard = testing::shard_with(0, 1, config);
        let gone = attach_client(&mut shard, "gone", "$share/g/t/+", QoS::AtLeastOnce, None);
        let mut other = attach_client(&mut shard, "other", "$share/g/t/+", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        let _ = other.publishes();
        // Round robin: "gone" is chosen for 0, 2, 4, 6; one in flight, three
        // pending behind its window of 1. "other" acknowledges nothing
        // either but takes the rest: 1, 3, 5, 7 at once.
        for i in 0..8 {
            shard.publish(message("t/x", &i.to_string()));
        }
        shard.flush_dirty();
        let mut got: Vec<Vec<u8>> = other.publishes().into_iter().map(|p| p.1).collect();
        assert_eq!(got.len(), 1, "the other member's window of 1 is full too");
        // The clean session ends with its connection: its four messages go
        // to "other", behind what waits there.
        shard.end_connection(gone.key, conn_of(&shard, gone.key));
        assert_eq!(shard.stats.shared_dropped, 0);
        let other_key = other.key;
        for _ in 0..8 {
            let pid = shard.sessions[other_key as usize]
                .state
                .flows
                .as_ref()
                .and_then(|f| f.inflight.front().map(|i| i.packet_id));
            let Some(pid) = pid else { break };
            let limits = shard.limits;
            assert!(shard.sessions[other_key as usize].on_puback(pid, &limits));
            shard.mark_dirty(other_key);
            shard.flush_dirty();
            got.extend(other.publishes().into_iter().map(|p| p.1));
        }
        got.sort();
        let all: Vec<Vec<u8>> = (0..8).map(|i: i32| i.to_string().into_bytes()).collect();
        assert_eq!(got, all, "each message once, none lost");
    }

    #[test]
    fn an_ended_members_shared_messages_go_to_a_member_on_another_shard() {
        let mut shards = [
            testing::shard_with(0, 2, Config::default()),
            testing::shard_with(1, 2, Config::default()),
        ];
        let gone = attach_client(&mut shards[0], "gone", "$share/g/t", QoS::AtLeastOnce, None);
        // A plain subscription of the same session to the topic: its copies
        // may be that subscription's, so they stay with the session.
        let plain = attach_client(
            &mut shards[0],
            "plain",
            "$share/g/u",
            QoS::AtLeastOnce,
            None,
        );
        shards[0].subscribe(
            plain.key,
            Subscribe {
                packet_id: 2,
                filters: vec![(ByteString::from("u"), QoS::AtLeastOnce)],
            },
            None,
        );
        let mut far = attach_client(&mut shards[1], "far", "$share/g/t", QoS::AtLeastOnce, None);
        let mut far_u = attach_client(
            &mut shards[1],
            "far-u",
            "$share/g/u",
            QoS::AtLeastOnce,
            None,
        );
        shards[0].flush_dirty();
        shards[1].flush_dirty();
        pump(&mut shards);
        let _ = (far.publishes(), far_u.publishes());
        // The publisher's shard keeps the messages it chooses "gone" and
        // "plain" for and sends the others to shard 1.
        for i in 0..4 {
            shards[0].publish(message("t", &i.to_string()));
            shards[0].publish(message("u", &i.to_string()));
        }
        shards[0].flush_dirty();
        let to_far = |shards: &mut [Shard]| {
            for (peer, deliveries) in shards[0].take_shared_out() {
                shards[peer].handle_control(ShardMsg::SharedPublish(deliveries));
            }
            pump(shards);
            shards[1].flush_dirty();
        };
        to_far(&mut shards);
        assert_eq!(far.publishes().len(), 2);
        assert_eq!(far_u.publishes().len(), 2);
        for key in [gone.key, plain.key] {
            let conn = conn_of(&shards[0], key);
            shards[0].end_connection(key, conn);
        }
        to_far(&mut shards);
        assert_eq!(far.publishes().len(), 2, "gone's two came to far");
        assert_eq!(
            far_u.publishes().len(),
            0,
            "plain's copies of `u` may be its plain subscription's: kept"
        );
        assert_eq!(shards[0].stats.shared_dropped, 0);
    }

    /// A persistent session of `shard` for `client_id`, member of
    /// `share`, journalled and offline (its connection ended).
    fn offline_member(shard: &mut Shard, client_id: &str, share: &str) -> SessionKey {
        let key = testing::attach(shard, client_id, share, QoS::AtLeastOnce);
        shard.sessions[key as usize].clean_session = false;
        let conn = conn_of(shard, key);
        shard.end_connection(key, conn);
        key
    }

    /// Whether `journal` holds the drop record of `client_id`.
    fn dropped(journal: &crate::store::journal::Journal, client_id: &str) -> bool {
        journal.pending_records().iter().any(
            |r| matches!(r, crate::store::record::Record::SessionDrop(_, id) if &**id == client_id),
        )
    }

    #[test]
    fn an_expired_members_drop_is_journalled_only_once_the_other_shard_journalled_its_backlog() {
        let mut shards = [
            testing::shard_with(0, 2, Config::default()),
            testing::shard_with(1, 2, Config::default()),
        ];
        let journals = [
            testing::unwritten_journal(&mut shards[0]),
            testing::unwritten_journal(&mut shards[1]),
        ];
        let gone = offline_member(&mut shards[0], "gone", "$share/g/t");
        // The only member: both wait in its queue.
        for i in 0..2 {
            shards[0].publish(message("t", &i.to_string()));
        }
        let far = offline_member(&mut shards[1], "far", "$share/g/t");
        let far_alias = shards[1].persist_stamps[&far];
        pump(&mut shards);
        assert_eq!(shards[0].shared.members(), 2);

        shards[0].end_expired_sessions(&[gone]);
        let (mut handed, others): (Vec<_>, Vec<_>) = std::mem::take(&mut shards[0].outbox)
            .into_iter()
            .partition(|(_, m)| matches!(m, ShardMsg::SharedPublish(_)));
        for (peer, msg) in others {
            shards[peer].handle_control(msg);
        }
        assert!(
            !dropped(&journals[0], "gone"),
            "not before shard 1 holds the backlog"
        );
        assert_eq!(handed.len(), 2, "{handed:?}");
        let barriers: Vec<_> = handed
            .iter()
            .filter_map(|(_, m)| match m {
                ShardMsg::SharedPublish(d) => Some(d[0].barrier),
                _ => None,
            })
            .collect();
        let token = match barriers[..] {
            [Some((0, a)), Some((0, b))] if a == b => a,
            _ => panic!("one barrier of shard 0 for both: {barriers:?}"),
        };
        let (peer, first) = handed.remove(0);
        assert_eq!(peer, 1);
        shards[1].handle_control(first);
        for (_, msg) in handed {
            shards[1].handle_control(msg);
        }
        let queued = journals[1]
            .pending_records()
            .iter()
            .filter(|r| {
                matches!(r, crate::store::record::Record::Queue(_, refs)
                    if refs == &vec![(far_alias, QoS::AtLeastOnce)])
            })
            .count();
        assert_eq!(queued, 2, "shard 1 journalled both for its member");
        assert_eq!(
            std::mem::take(&mut shards[1].shared_settled),
            vec![(0, token), (0, token)]
        );
        // Shard 1 answers once its journal is durable (`shard::inbox`).
        shards[0].handle_control(ShardMsg::SharedDurable { token, count: 1 });
        assert!(!dropped(&journals[0], "gone"), "one answer of two");
        shards[0].handle_control(ShardMsg::SharedDurable { token, count: 1 });
        assert!(dropped(&journals[0], "gone"), "then the drop");
        assert!(shards[0].drops_waiting.is_empty());
    }

    #[test]
    fn a_clean_start_that_ends_a_member_is_answered_once_its_drop_follows_the_hand_over() {
        let mut shards = [
            testing::shard_with(0, 2, Config::default()),
            testing::shard_with(1, 2, Config::default()),
        ];
        let journal = testing::unwritten_journal(&mut shards[0]);
        let _far_journal = testing::unwritten_journal(&mut shards[1]);
        let _ = offline_member(&mut shards[0], "ended", "$share/g/t");
        shards[0].publish(message("t", "0"));
        let _ = offline_member(&mut shards[1], "far", "$share/g/t");
        pump(&mut shards);
        // A clean start of "ended" (claim 7 of shard 0) ends the session.
        shards[0].evict("ended", None, 0, 7, true);
        let handed: Vec<_> = std::mem::take(&mut shards[0].outbox)
            .into_iter()
            .filter_map(|(_, m)| match m {
                ShardMsg::SharedPublish(d) => Some(d),
                _ => None,
            })
            .collect();
        let token = match &handed[..] {
            [d] => d[0].barrier.map(|b| b.1).expect("a barrier"),
            _ => panic!("one delivery to shard 1: {handed:?}"),
        };
        assert!(!dropped(&journal, "ended"), "not before shard 1 holds it");
        assert!(shards[0].held_out.is_empty(), "nor is the claim answered");
        for deliveries in handed {
            shards[1].handle_control(ShardMsg::SharedPublish(deliveries));
        }
        shards[0].handle_control(ShardMsg::SharedDurable { token, count: 1 });
        assert!(dropped(&journal, "ended"));
        assert!(
            !shards[0].held_out.is_empty(),
            "the answer waits for the drop to be durable"
        );
    }

    #[test]
    fn an_expired_members_drop_waits_for_nothing_when_its_backlog_stays_on_its_shard() {
        let mut shard = testing::shard();
        let journal = testing::unwritten_journal(&mut shard);
        let gone = offline_member(&mut shard, "gone", "$share/g/t");
        shard.publish(message("t", "0"));
        let _near = offline_member(&mut shard, "near", "$share/g/t");
        shard.end_expired_sessions(&[gone]);
        let records = journal.pending_records();
        let drop_at = records.iter().position(
            |r| matches!(r, crate::store::record::Record::SessionDrop(_, id) if &**id == "gone"),
        );
        let queued_at = records
            .iter()
            .rposition(|r| matches!(r, crate::store::record::Record::Queue(..)));
        assert!(
            matches!((queued_at, drop_at), (Some(q), Some(d)) if q < d),
            "handed over to the member here first, then dropped: {records:?}"
        );
    }
}
