//! The shard's side of the NATS bridge (cluster module, docs/design/cluster.md):
//! handing this shard's publishes to the bridge, and routing what other
//! nodes published.
//!
//! A message from another node is routed with the filter whose NATS
//! subscription carried it: NATS sends one copy per matching subscription
//! of the node, so a session takes a message only through the smallest
//! (byte order) of its own filters that match the topic, at the highest
//! QoS granted among them; one copy, as for a local publish. Messages on
//! the escaped subject (no filter) are matched in full. Either way they go
//! through the route, never the publish: they are never handed on again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytestring::ByteString;

use crate::cluster::link::{HandOver, Outgoing, Ticket, ToShard};
use crate::cluster::ownership::MAX_SUBSCRIPTIONS_RECORD;
use crate::cluster::positions::Seen;
use crate::cluster::tail::{self, TailError, put_record};
use crate::protocol::message::{Encoded, Message};
use crate::protocol::topic;
use crate::protocol::v3::QoS;
use crate::router::SharedFilter;
use crate::router::shared::{self, SharedDelivery};
use crate::session::{Phase, Session, SessionState};
use crate::shard::persist::{Keepers, restore_flows, set_stored_options, stored_subscriptions};
use crate::shard::run::{self, takes_runs};
use crate::shard::{Ctx, SessionKey, Shard, offer, read_allowed, registry};
use crate::store::flows;
use crate::store::record::{Record, RecordError, StoredMessage, StoredSession, unix_ms_now};

/// Longest a SUBACK of a filter new to the node waits for the bridge to
/// say the NATS server holds the subscription (the bridge itself gives up
/// on the server sooner; this bounds a bridge whose interest queue is
/// long); it then goes anyway, counted.
pub const SUBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a retained QoS 1/2 publish's acknowledgement waits for the
/// retained bucket to hold it; after that the publish is not acknowledged
/// (its connection closes, the client sends it again).
pub const RETAINED_TIMEOUT: Duration = Duration::from_secs(5);

impl Ctx {
    /// Hands this step's publishes to the bridge, waiting at most the
    /// cluster's `stall` for room (a full queue pushes back on the
    /// publisher like a full mesh channel); then the batch is dropped for
    /// the cluster only and counted. With `stored`, the bridge says on the
    /// returned queue whether the retained bucket holds the batch's
    /// retained messages (closed at once: not handed over, no cluster).
    pub(crate) async fn forward_to_cluster(
        &self,
        (batch, first): (Arc<Vec<Message>>, u64),
        stored: bool,
    ) -> async_channel::Receiver<bool> {
        let (answer, answered) = async_channel::bounded(1);
        let Some((queue, stall)) = self
            .shard
            .borrow()
            .cluster
            .as_ref()
            .map(|c| (c.ends.publish.clone(), c.stall))
        else {
            return answered;
        };
        let n = batch.len() as u64;
        let batch = Outgoing {
            messages: batch,
            stored: stored.then_some(answer),
            shard: self.id,
            first,
        };
        let sent = match queue.try_send(batch) {
            Ok(()) => true,
            Err(async_channel::TrySendError::Full(batch)) => {
                glommio::timer::timeout(stall, async { Ok(queue.send(batch).await.is_ok()) })
                    .await
                    .unwrap_or(false)
            }
            Err(async_channel::TrySendError::Closed(_)) => false,
        };
        let mut shard = self.shard.borrow_mut();
        if sent {
            shard.stats.cluster_sent += n;
        } else {
            shard.stats.cluster_send_dropped += n;
            if let Some(link) = &shard.cluster {
                // No tail of a hand-over waits for what never comes.
                link.unsent(first, n as usize);
            }
        }
        answered
    }

    /// Waits until the retained bucket holds what `stored` (from
    /// [`Ctx::forward_to_cluster`]) stands for, at most
    /// [`RETAINED_TIMEOUT`]; whether it does (else counted).
    pub(crate) async fn retained_stored(&self, stored: async_channel::Receiver<bool>) -> bool {
        let answer = glommio::timer::timeout(RETAINED_TIMEOUT, async {
            Ok(stored.recv().await.unwrap_or(false))
        })
        .await
        .unwrap_or(false);
        if !answer && let Some(link) = &self.shard.borrow().cluster {
            link.status
                .figures
                .cluster_retained_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    /// Sends the SUBACKs held for NATS (`Shard::held_subacks`) once the
    /// bridge answered for every new filter, at most [`SUBACK_TIMEOUT`]
    /// (then anyway, counted), each followed by its retained messages.
    pub(crate) async fn release_subacks(&self) {
        let held = std::mem::take(&mut self.shard.borrow_mut().held_subacks);
        if held.is_empty() {
            return;
        }
        let ready: Vec<_> = held.iter().flat_map(|h| h.ready.iter().cloned()).collect();
        let waited = glommio::timer::timeout(SUBACK_TIMEOUT, async {
            for r in &ready {
                // Closed when answered: nothing is ever sent.
                let _ = r.recv().await;
            }
            Ok(())
        })
        .await;
        let mut shard = self.shard.borrow_mut();
        if waited.is_err()
            && let Some(link) = &shard.cluster
        {
            link.status
                .figures
                .cluster_suback_unconfirmed
                .fetch_add(held.len() as u64, Ordering::Relaxed);
        }
        for suback in held {
            shard.answer_subscribe(suback);
        }
        shard.flush_dirty();
    }
}

/// Messages from the bridge handled in one turn before the subscribers'
/// sockets are written: what waited in the queue while the shard was busy
/// goes out in one write per subscriber (as a local burst read in one
/// piece does), not one write per NATS message; the bound keeps one turn
/// short (the mesh and the connections are served between turns).
const DRAIN_PER_TURN: usize = 64;

/// Receives what the bridge sends this shard until the bridge ends.
pub async fn receive_from_bridge(ctx: Ctx, from_bridge: async_channel::Receiver<ToShard>) {
    while let Ok(first) = from_bridge.recv().await {
        let mut takeovers = Vec::new();
        {
            let mut shard = ctx.shard.borrow_mut();
            let mut next = Some(first);
            let mut handled = 0;
            while let Some(msg) = next.take() {
                match msg {
                    ToShard::Deliver {
                        filter,
                        seq,
                        messages,
                    } => {
                        shard.stats.cluster_received += messages.len() as u64;
                        shard.took_from_cluster(seq, filter.as_ref(), &messages);
                        shard.route_from_cluster(filter.as_deref(), &messages);
                    }
                    ToShard::DeliverExcept {
                        filter,
                        seq,
                        messages,
                        except,
                    } => {
                        shard.stats.cluster_received += messages.len() as u64;
                        shard.took_from_cluster(seq, filter.as_ref(), &messages);
                        shard.route_from_cluster_except(filter.as_deref(), &messages, &except);
                    }
                    ToShard::Lent {
                        token,
                        filter,
                        batches,
                        whole,
                    } => shard.lent(token, filter, batches, whole),
                    ToShard::DeliverShared(batch) => {
                        shard.stats.cluster_received += batch.len() as u64;
                        shard.deliver_shared_from_cluster(batch);
                    }
                    ToShard::DeliverSharedFor { client_id, batch } => {
                        shard.stats.cluster_received += batch.len() as u64;
                        shard.deliver_shared_for(&client_id, batch);
                    }
                    ToShard::Retained(message) => shard.retained.apply(&message),
                    ToShard::Claimed {
                        token,
                        answer,
                        published,
                    } => {
                        shard.cluster_claim_answered_after(token, answer, published.map(|p| *p));
                    }
                    ToShard::Handing {
                        client_id,
                        on,
                        done,
                    } => {
                        if on {
                            shard.cluster_handing.insert(client_id);
                        } else {
                            shard.cluster_handing.remove(&client_id);
                        }
                        // The mark is in place: the bridge may go on.
                        drop(done);
                    }
                    ToShard::Takeover {
                        client_id,
                        clean_session,
                        answer,
                        ticket,
                    } => takeovers.push((client_id, clean_session, answer, ticket)),
                }
                handled += 1;
                if handled < DRAIN_PER_TURN {
                    next = from_bridge.try_recv().ok();
                }
            }
            shard.flush_dirty();
        }
        // Spawned with the shard unborrowed (glommio may run them at once),
        // after what was routed before them went out.
        for (client_id, clean_session, answer, ticket) in takeovers {
            let asked = hand_over(ctx.clone(), client_id, clean_session, answer, ticket);
            glommio::spawn_local(asked).detach();
        }
        glommio::yield_if_needed().await;
    }
    log::debug!("shard {}: cluster bridge queue closed", ctx.id);
}

/// How long a take-over by another node may take here, its claim and the
/// record of the session's end (its drop) becoming durable together,
/// before this node answers "unavailable" and keeps the session: under
/// the 2 s the bridge waits for the shard's answer (`SHARD_ANSWER` in
/// cluster::ownership), so the answer is this shard's, never the bridge's
/// guess.
const HAND_OVER_WAIT: Duration = Duration::from_millis(1500);

/// Another node takes `client_id` over: claims it on this node as a new
/// connection would (which ends the session wherever it is here, closing its
/// connection as a take-over, and supersedes a claim still waiting), then
/// releases it and answers with the session's image (None: nothing to
/// move). The node's own record of the id is no longer its own, so the
/// release deletes nothing.
///
/// With persistence the answer (hence the other node's CONNACK) leaves
/// only once this node's disk holds the end of the session here, as for a
/// take-over between shards: a clean start's claim is answered only then
/// (`Shard::answer_claim_after`), and a session that moves waits here for
/// its drop record. When either takes longer than [`HAND_OVER_WAIT`] (the
/// disk stalls) the answer is [`HandOver::Unavailable`]: a session that
/// was to move stays here, journalled again after its drop, and the other
/// node refuses the CONNECT; so a `kill -9` of this node cannot bring back
/// a session that lives on, or ended, elsewhere. The session goes only if
/// the bridge still waits for the answer (`ticket`,
/// [`Shard::hand_over_if_awaited`]).
async fn hand_over(
    ctx: Ctx,
    client_id: ByteString,
    clean_session: bool,
    answer: async_channel::Sender<HandOver>,
    ticket: Ticket,
) {
    let deadline = Instant::now() + HAND_OVER_WAIT;
    let claimed = registry::claim_on_node_within(
        &ctx,
        client_id.clone(),
        clean_session,
        HAND_OVER_WAIT,
        true,
    )
    .await;
    let token = match claimed {
        Ok(token) => token,
        Err(token) => {
            log::warn!(
                "cluster: take-over of {client_id:?} by another node refused: its claim here was not answered in {HAND_OVER_WAIT:?} (the disk is slow)"
            );
            let _ = answer.try_send(HandOver::Unavailable { token });
            return;
        }
    };
    // The state stays in the claim, which keeps the id claimed here, until
    // it goes: a CONNECT of the id here meanwhile supersedes the claim and
    // takes the state, as it would from any claim not yet attached, and
    // the take-over is then refused (the later CONNECT, here, wins; the
    // other node answers CONNACK 0x03 and its client retries). Else that
    // CONNECT found the id nowhere here, started a second, fresh session
    // beside the one leaving, and the record still named this node.
    let superseded = |ctx: &Ctx| {
        log::debug!(
            "cluster: take-over of {client_id:?} by another node refused: a CONNECT here took the session meanwhile"
        );
        // The superseded claim goes (taken already on some paths).
        let _ = ctx.shard.borrow_mut().take_claim(token);
        ctx.send_outbox();
        let _ = answer.try_send(HandOver::Unavailable { token: 0 });
    };
    let Some(lsn) = ctx.shard.borrow_mut().hand_over_dropping(&client_id, token) else {
        return superseded(&ctx);
    };
    let journal = ctx.shard.borrow().session_journal.clone();
    if let Some(journal) = journal.filter(|j| lsn > 0 && j.acked_lsn() < lsn) {
        let left = deadline.saturating_duration_since(Instant::now());
        let durable = glommio::timer::timeout(left, async {
            journal.wait_acked(lsn).await;
            Ok(())
        })
        .await;
        if durable.is_err() {
            let Some(state) = ctx.shard.borrow_mut().take_claim(token) else {
                return superseded(&ctx);
            };
            log::warn!(
                "cluster: take-over of {client_id:?} by another node refused: its end here was not durable in {HAND_OVER_WAIT:?} (the disk is slow); the session stays"
            );
            ctx.shard.borrow_mut().keep_handed(&client_id, token, state);
            ctx.send_outbox();
            let _ = answer.try_send(HandOver::Unavailable { token });
            return;
        }
    }
    let Some(state) = ctx.shard.borrow_mut().take_claim(token) else {
        return superseded(&ctx);
    };
    let answered = ctx
        .shard
        .borrow_mut()
        .hand_over_if_awaited(&client_id, token, state, &ticket);
    ctx.send_outbox();
    let _ = answer.try_send(answered);
}

impl Shard {
    /// The claim `token` that another node's take-over of `client_id`
    /// made here ([`hand_over`]) was granted: the session's state to send
    /// (None: nothing to move, or a later CONNECT here won meanwhile) and
    /// the session journal's LSN that must be durable before it goes (0:
    /// none), that of the drop record of the session leaving this node.
    /// Then [`Shard::handed`] or [`Shard::keep_handed`].
    #[cfg(test)]
    pub fn hand_over_claimed(
        &mut self,
        client_id: &str,
        token: u64,
    ) -> (Option<SessionState>, u64) {
        let Some(lsn) = self.hand_over_dropping(client_id, token) else {
            return (None, 0);
        };
        (self.take_claim(token).flatten(), lsn)
    }

    /// The claim `token` that another node's take-over of `client_id`
    /// made here ([`hand_over`]) was granted: journals the end of the
    /// session here if the claim holds one, which stays in the claim (so
    /// the id stays claimed) until [`Shard::take_claim`]. The LSN that
    /// must be durable before the state goes (0: none); None when a later
    /// CONNECT here superseded the claim (it holds the id and the state).
    pub fn hand_over_dropping(&mut self, client_id: &str, token: u64) -> Option<u64> {
        let holds = self.registry_claim_state(token)?;
        // The session lives on elsewhere now.
        Some(if holds {
            self.journal_drop(client_id)
        } else {
            0
        })
    }

    /// The take-over of [`Shard::hand_over_claimed`] goes: releases the id
    /// and returns the image of `state` to send.
    pub fn handed(
        &mut self,
        client_id: &str,
        token: u64,
        state: Option<SessionState>,
    ) -> Option<Vec<u8>> {
        let image = state.map(|state| encode_image(client_id, &state, MAX_IMAGE));
        self.release(client_id, token);
        self.stats.cluster_taken_over += 1;
        image
    }

    /// The take-over of [`Shard::hand_over_claimed`] ends, its end durable:
    /// [`Shard::handed`] if the bridge still waits for the answer
    /// ([`Ticket::answer`]); if it gave up meanwhile (this shard was slower
    /// than its `SHARD_ANSWER`), nobody would receive the state, so the
    /// session stays here ([`Shard::keep_handed`]) and the answer, which
    /// the bridge may still read to learn the claim that holds it, is
    /// [`HandOver::Unavailable`].
    pub fn hand_over_if_awaited(
        &mut self,
        client_id: &str,
        token: u64,
        state: Option<SessionState>,
        ticket: &Ticket,
    ) -> HandOver {
        if ticket.answer() {
            return HandOver::Moved(self.handed(client_id, token, state));
        }
        log::warn!(
            "cluster: take-over of {client_id:?} by another node given up by the bridge before this shard answered: the session stays"
        );
        self.keep_handed(client_id, token, state);
        HandOver::Unavailable { token }
    }

    /// The take-over of [`Shard::hand_over_claimed`] is refused: `state`
    /// stays here as an offline session of claim `token`, its image
    /// journalled after the drop (a higher stamp, so a restart loads it).
    pub fn keep_handed(&mut self, client_id: &str, token: u64, state: Option<SessionState>) {
        let persistent = state.is_some();
        self.keep_or_release(ByteString::from(client_id), token, state);
        if persistent && let Some(key) = self.session_key(client_id) {
            self.journal_session(key);
        }
    }
}

impl Shard {
    /// The cluster's grant made claim `token` attaching with another
    /// node's session, whose tail this node asked for when it had
    /// published `published`: what this shard routed since that was
    /// published is in neither the image nor the tail, and reached no copy
    /// of the session (it was on no shard here); it is kept for the claim
    /// now, after the image, in the order routed (cluster::positions).
    /// What the shard routes from now on is kept for it as it comes
    /// (`Shard::queue_for_attaching`).
    pub(super) fn catch_up(&mut self, token: u64, published: &Seen) {
        let current = (self.id, self.handed_on, self.remote_batch.as_slice());
        let (missed, whole) = self.routed.missed(published, current);
        if !whole && let Some(link) = &self.cluster {
            log::info!(
                "cluster: shard {} no longer holds everything this node published since the tail was asked for (claim {token}): a session moving here may miss some",
                self.id
            );
            link.status
                .figures
                .cluster_tails_short
                .fetch_add(1, Ordering::Relaxed);
        }
        let missed: Vec<Message> = missed.into_iter().cloned().collect();
        self.keep_for_claim(token, &missed);
    }
}

/// Largest session image sent to another node: under NATS's default
/// `max_payload` (1 MiB) with room for the reply's framing. An image that
/// would be larger loses its oldest queued messages.
const MAX_IMAGE: usize = 1_000_000;

/// Why a session image from another node cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A record is cut short or invalid.
    #[error("session image: {0}")]
    Record(#[from] RecordError),
    /// The records are not an image followed by its messages.
    #[error("session image: {0}")]
    Layout(&'static str),
}

/// A session's state as sent to another node at a take-over: the store's
/// records (persistence design), a session image naming its queued QoS
/// 1/2 messages (in flight first, then pending) followed by one message
/// record each, then the records of its flows ([`flows::image_tail`]:
/// each message in flight with its packet id and phase, each incoming QoS
/// 2 packet id awaiting PUBREL), so that the new node resends what was in
/// flight with DUP and its packet id, a PUBREL where PUBREC came, and
/// takes a QoS 2 PUBLISH resent with an id awaiting PUBREL as the
/// duplicate it is (MQTT 3.1.1 §4.4, §4.3.3; none when there are no
/// flows, the image as older nodes wrote it); at most `max` bytes, the
/// oldest messages left out first.
pub fn encode_image(client_id: &str, state: &SessionState, max: usize) -> Vec<u8> {
    let now = Instant::now();
    let unix_now = unix_ms_now();
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let mut queued = Vec::new();
    // Message id (in this image), packet id, QoS, PUBREC'd: one per
    // message in flight, which come first in `messages`.
    let mut inflight: Vec<flows::InflightRef> = Vec::new();
    let mut awaiting_rel: &[u16] = &[];
    if let Some(flows) = state.flows.as_deref() {
        for (mid, f) in (1u64..).zip(&flows.inflight) {
            inflight.push((
                mid,
                f.packet_id,
                f.message.qos,
                f.phase == Phase::AwaitPubComp,
            ));
        }
        awaiting_rel = &flows.awaiting_rel;
        let all = flows
            .inflight
            .iter()
            .map(|f| &f.message)
            .chain(flows.pending.iter());
        for (mid, message) in (1u64..).zip(all) {
            let mut out = Vec::new();
            put_record(
                &mut out,
                &Record::Message(mid, StoredMessage::of(message, now, unix_now)),
            );
            messages.push(out);
            queued.push((mid, message.qos));
        }
    }
    let image = |queued: &[(u64, QoS)]| image_record(client_id, state, queued);
    let flow_records = |skip: usize| {
        let mut out = Vec::new();
        let kept = inflight.iter().skip(skip.min(inflight.len())).copied();
        for record in flows::image_tail(0, kept, awaiting_rel) {
            put_record(&mut out, &record);
        }
        out
    };
    // Leave out the oldest messages until the whole fits (with the flow
    // records of all: a bound, never short).
    let mut skip = 0;
    let mut total: usize =
        image(&queued).len() + messages.iter().map(Vec::len).sum::<usize>() + flow_records(0).len();
    while total > max && skip < messages.len() {
        total -= messages[skip].len() + 9;
        skip += 1;
    }
    let mut out = image(&queued[skip..]);
    for message in &messages[skip..] {
        out.extend_from_slice(message);
    }
    out.extend_from_slice(&flow_records(skip));
    out
}

/// The session image record of `client_id` with the subscriptions of
/// `state` and the messages `queued` (ids of the message records after it).
fn image_record(client_id: &str, state: &SessionState, queued: &[(u64, QoS)]) -> Vec<u8> {
    let mut out = Vec::new();
    put_record(
        &mut out,
        &Record::SessionImage(StoredSession {
            stamp: 0,
            client_id: ByteString::from(client_id),
            protocol_level: 4,
            expiry_interval: 0,
            offline_since_unix_ms: 0,
            subscriptions: stored_subscriptions(state),
            queued: queued.to_vec(),
            // Alias 0: the format 1 image, so the wire between nodes stays
            // as it was.
            alias: 0,
        }),
    );
    out
}

/// The subscriptions of `state` as the cluster keeps them for a node's
/// death: a session image without messages (read by [`decode_image`]);
/// None when it is over `MAX_SUBSCRIPTIONS_RECORD` (of cluster ownership).
pub fn subscriptions_image(client_id: &str, state: &SessionState) -> Option<bytes::Bytes> {
    let image = image_record(client_id, state, &[]);
    (image.len() <= MAX_SUBSCRIPTIONS_RECORD).then(|| bytes::Bytes::from(image))
}

/// Reads what [`encode_image`] wrote into a session state: its
/// subscriptions with their options, its messages in flight with their
/// packet ids and phase (resent with DUP, or PUBREL, at the attach) and
/// its incoming QoS 2 ids awaiting PUBREL, then the rest of its queue
/// pending (sent with new packet ids). An image from an older node has no
/// flow records: everything is pending then.
///
/// # Errors
/// Bytes that are no such image.
pub fn decode_image(bytes: &[u8]) -> Result<SessionState, ImageError> {
    let records = tail::records(bytes).map_err(|e| match e {
        TailError::Record(e) => ImageError::Record(e),
        TailError::Layout(why) => ImageError::Layout(why),
    })?;
    let mut records = records.into_iter();
    let Some(Record::SessionImage(image)) = records.next() else {
        return Err(ImageError::Layout("no session image first"));
    };
    let mut bodies = AHashMap::new();
    let mut events = Vec::new();
    for record in records {
        match record {
            Record::Message(mid, message) => {
                bodies.insert(mid, message);
            }
            Record::Sent(mid, refs) => {
                for (alias, packet_id, qos) in refs {
                    if alias == 0 {
                        events.push(flows::FlowEvent::Sent(mid, packet_id, qos));
                    }
                }
            }
            Record::Flow(step, 0, packet_id) => {
                events.push(flows::FlowEvent::Step(step, packet_id));
            }
            _ => {
                return Err(ImageError::Layout(
                    "a record other than a message or a flow",
                ));
            }
        }
    }
    let mut session = Session::new(image.client_id, false, SessionState::default());
    for sub in &image.subscriptions {
        let filter = SharedFilter::from(&*sub.filter);
        session.subscribe(filter.clone(), sub.qos);
        set_stored_options(&mut session, filter, sub);
    }
    let (queued, loaded) = flows::replay(&image.queued, &events, |mid| bodies.get(&mid));
    let now = Instant::now();
    restore_flows(&mut session, &loaded, now, false);
    let unix_now = unix_ms_now();
    for (_, stored, qos) in queued {
        let Some(mut message) = stored.to_message(0, now, unix_now) else {
            continue;
        };
        message.qos = qos;
        message.retain = false;
        let flows = session.state.flows.get_or_insert_with(Box::default);
        flows.pending_bytes += message.wire_len();
        flows.pending.push_back(message);
    }
    Ok(session.state)
}

impl Shard {
    /// Tells the cluster the subscriptions of session `key` if it is a
    /// persistent one (at attach, SUBSCRIBE and UNSUBSCRIBE): kept in the
    /// cluster, they survive this node's death.
    pub(super) fn share_subscriptions(&self, key: SessionKey) {
        let (Some(link), Some(session)) = (&self.cluster, self.sessions.get(key as usize)) else {
            return;
        };
        if session.clean_session {
            return;
        }
        let image = subscriptions_image(&session.client_id, &session.state);
        link.subscriptions(&session.client_id, session.claim, image, false);
    }

    /// Asks the cluster to re-assert every persistent session restored
    /// from the store (at start-up, once the shard's cluster link is set).
    pub fn reassert_restored(&self) {
        let Some(link) = &self.cluster else {
            return;
        };
        for (_, session) in self.sessions.iter() {
            if session.clean_session {
                continue;
            }
            let image = subscriptions_image(&session.client_id, &session.state);
            link.subscriptions(&session.client_id, session.claim, image, true);
        }
    }

    /// Whether shared subscriptions are served through NATS's queue groups
    /// (the cluster link is up) rather than by the publishing shard: a
    /// node's own publishes then come back to it only if NATS picks it.
    /// `$SYS` topics stay on their node, so their groups are served here.
    pub(super) fn shares_through_cluster(&self, topic: &str) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.status.link_up())
            && !(topic == "$SYS" || topic.starts_with("$SYS/"))
    }

    /// Messages NATS gave this node for shared subscriptions, which the
    /// bridge sent this shard: each to one of this shard's members of its
    /// group, in turn (one that cannot take it is passed over for another
    /// here, as for a message from another shard).
    pub fn deliver_shared_from_cluster(&mut self, batch: Vec<(ByteString, Message)>) {
        let mut deliveries = Vec::with_capacity(batch.len());
        for (share, message) in batch {
            let here: Vec<u32> = self
                .shared
                .group(&share)
                .map(|g| {
                    g.members
                        .iter()
                        .filter(|m| m.shard == self.id)
                        .map(|m| m.key)
                        .collect()
                })
                .unwrap_or_default();
            let turn = self.cluster.as_mut().map_or(0, |c| {
                c.share_turn = c.share_turn.wrapping_add(1);
                c.share_turn
            });
            // None here (the last member just left): `deliver_shared`
            // counts it dropped.
            let key = here
                .get(turn % here.len().max(1))
                .copied()
                .unwrap_or(u32::MAX);
            deliveries.push(SharedDelivery {
                message,
                share,
                key,
                client_id: None,
                passes: 0,
                barrier: None,
            });
        }
        self.deliver_shared(deliveries);
    }

    /// Messages NATS gave this node for the shared subscriptions of
    /// `client_id`, a session that moved here from another node
    /// (`ToShard::DeliverSharedFor`): each named for that session, as a
    /// message that follows a session taken over between shards is
    /// (`SharedDelivery::client_id`): its claim's state keeps it while it
    /// attaches, the attached session takes it first.
    pub fn deliver_shared_for(
        &mut self,
        client_id: &ByteString,
        batch: Vec<(ByteString, Message)>,
    ) {
        let deliveries = batch
            .into_iter()
            .map(|(share, message)| SharedDelivery {
                message,
                share,
                // Named by client id: no key of this shard's.
                key: u32::MAX,
                client_id: Some(client_id.clone()),
                passes: 0,
                barrier: None,
            })
            .collect();
        self.deliver_shared(deliveries);
    }

    /// The persistent session state `state` of `client_id` goes to a claim on shard `to`
    /// of this node (this one included): in a cluster, the bridge holds
    /// the node's NATS interest in its plain filters for that shard a
    /// while (`Control::Lend`), so that what other nodes publish meanwhile
    /// keeps coming (to the claim's shard, which keeps it in the state
    /// while the claim attaches, `Shard::queue_for_attaching`) though no
    /// router of the node has the session. Told before this shard drops
    /// its own interest in them, in the same queue. One message per move.
    /// `claim`: the claim's shard `to` and its token; `after`: the number
    /// of the last NATS batch `state` holds, returned when the bridge was
    /// told (the claim then waits for the lend's batches, shard::lend).
    pub(super) fn lend_interest(
        &self,
        client_id: &str,
        claim: (usize, u64),
        state: &SessionState,
        after: u64,
    ) -> Option<u64> {
        let link = self.cluster.as_ref()?;
        let filters = state.subscriptions.iter().map(|(f, _)| f);
        let plain = filters.filter(|f| !shared::is_shared(f));
        let filters = plain.map(|f| ByteString::from(&**f)).collect();
        link.lend(client_id, claim, after, filters).then_some(after)
    }

    /// Delivers messages from another node, all of one NATS subscription
    /// (in the order NATS gave them), to this shard's subscribers of
    /// `filter` (`None`: every matching subscriber); never stored as
    /// retained (the bucket's watch does that) and never handed on. Each
    /// run of consecutive messages to one topic, QoS 0 ones as a local
    /// burst's ([`Shard::route_batch`]) or QoS 1/2 ones
    /// ([`run::split_cluster_runs`]), is routed together
    /// ([`Shard::route_run_from_cluster`]).
    pub fn route_from_cluster(&mut self, filter: Option<&str>, messages: &[Message]) {
        let Some(filter) = filter else {
            // The escaped subject's messages: one copy each, matched here.
            // The RETAIN flag is cleared, so that the route does not store
            // them (Retain As Published sees 0 on this rare path).
            let unretained = messages.iter().map(|m| Message {
                retain: false,
                ..m.clone()
            });
            if self.cluster_handing.is_empty() && !self.has_attaching() {
                let unretained: Vec<Message> = unretained.collect();
                self.route_batch(&unretained);
            } else {
                // A session being handed over takes none of them (its
                // collector has them), as on the other subjects; a claim
                // attaching takes them as NATS's (a lend may bring them,
                // shard::lend).
                for message in unretained {
                    self.route_escaped_from_cluster(&message);
                }
            }
            return;
        };
        for run in run::split_cluster_runs(messages) {
            self.route_run_from_cluster(filter, run);
        }
    }

    /// [`Shard::route_from_cluster`] of a batch some of whose messages a
    /// session that moved to this node got already (`except`: index in
    /// `messages` and client id, in order of index; `ToShard::DeliverExcept`):
    /// in order, each of those is routed alone with that session left
    /// out, as a session being handed over is (`Shard::cluster_handing`,
    /// for that message only), the others as a batch.
    pub fn route_from_cluster_except(
        &mut self,
        filter: Option<&str>,
        messages: &[Message],
        except: &[(usize, ByteString)],
    ) {
        let mut from = 0;
        let mut rest = except;
        while let Some(&(at, _)) = rest.first() {
            let here = rest.iter().take_while(|e| e.0 == at).count();
            let (ids, after) = rest.split_at(here);
            rest = after;
            let Some(message) = messages.get(at..=at) else {
                break;
            };
            self.route_from_cluster(filter, messages.get(from..at).unwrap_or_default());
            let left_out: Vec<&ByteString> = ids
                .iter()
                .map(|e| &e.1)
                .filter(|id| self.cluster_handing.insert((*id).clone()))
                .collect();
            self.stats.cluster_doubles_dropped += 1;
            self.route_from_cluster(filter, message);
            for id in left_out {
                self.cluster_handing.remove(id);
            }
            from = at + 1;
        }
        self.route_from_cluster(filter, messages.get(from..).unwrap_or_default());
    }

    /// Delivers `message`, from the escaped subject (RETAIN cleared), to
    /// every session of this shard whose filters match its topic but
    /// those being handed over (`Shard::cluster_handing`), then to the
    /// sessions attaching here: [`Shard::route_from_cluster`]'s way for
    /// that subject while a session is handed over.
    fn route_escaped_from_cluster(&mut self, message: &Message) {
        let Shard {
            router,
            sessions,
            stats,
            auth,
            cluster_others,
            cluster_handing,
            ..
        } = self;
        let mut takers = std::mem::take(cluster_others);
        takers.clear();
        let mut reads = None;
        router.for_each_match(&message.topic, |key, granted| {
            let Some(session) = sessions.get(key as usize) else {
                return;
            };
            if cluster_handing.contains(&*session.client_id) {
                return;
            }
            if read_allowed(session, &mut reads, auth, &message.topic, stats) {
                takers.push((key, granted));
            }
        });
        self.offer_from_cluster(message, &takers);
        self.queue_for_attaching(None, message, true);
        self.cluster_others = takers;
    }

    /// Delivers `run` (one message, or a run of [`run::split_cluster_runs`]:
    /// consecutive messages to one topic, all QoS 0 that [`run::runs`]
    /// allows or all QoS 1/2) from the NATS subscription of `filter`: the
    /// filter's subscribers are walked once, and each session's own
    /// filters matched and its read rules checked once ([`copy_qos`]), for
    /// the whole run. Of a QoS 0 run, sessions that take runs
    /// ([`takes_runs`]) get it as one queue entry, as from a local burst;
    /// the other sessions, and every subscriber of a QoS 1/2 run, get each
    /// message in turn, in order, as a local publish offers it (each its
    /// own packet id, the inflight window and queue limits per message,
    /// journalled once for the persistent sessions that keep it), then the
    /// sessions attaching on this node (`Shard::queue_for_attaching`). All
    /// of it reaches the subscribers' sockets at the turn's
    /// `Shard::flush_dirty`: one write per subscriber for what the turn
    /// routed, as for a local burst read at once.
    pub fn route_run_from_cluster(&mut self, filter: &str, run: &[Message]) {
        let [first, ..] = run else {
            return;
        };
        // A QoS 0 run whose frames the takers share.
        let as_run = run.len() > 1 && run::runs(first);
        let Shard {
            router,
            sessions,
            dirty,
            stats,
            limits,
            batch,
            auth,
            persist_stamps,
            run_frames,
            cluster_others,
            cluster_handing,
            ..
        } = self;
        let persist_stamps = &*persist_stamps;
        let mut frames = std::mem::take(run_frames);
        frames.clear();
        let mut others = std::mem::take(cluster_others);
        others.clear();
        // The ACL's read rules apply as for a local publish.
        let mut reads = None;
        router.for_each_subscriber(filter, |key, _| {
            let Some(session) = sessions.get_mut(key as usize) else {
                return;
            };
            // Being handed to another node: the bridge collects for it.
            if !cluster_handing.is_empty() && cluster_handing.contains(&*session.client_id) {
                return;
            }
            let Some(granted) = copy_qos(&session.state, Some(filter), &first.topic) else {
                return;
            };
            if !read_allowed(session, &mut reads, auth, &first.topic, stats) {
                // Counted per message, as a local publish counts it.
                stats.read_denied += run.len() as u64 - 1;
                return;
            }
            if !as_run || !takes_runs(session, key, persist_stamps) {
                others.push((key, granted));
                return;
            }
            frames.deliver(run, session, key, batch, limits, stats, dirty);
        });
        self.run_frames = frames;
        for message in run {
            self.offer_from_cluster(message, &others);
            // Nothing for QoS 0 (never kept for a session not yet attached).
            self.queue_for_attaching(Some(filter), message, true);
        }
        self.cluster_others = others;
    }

    /// Offers `message`, from another node, to each session of `takers`
    /// at the QoS granted to it, as a local publish offers it
    /// ([`Shard::route_from`]): a QoS 1/2 message that journalled
    /// (persistent) sessions keep is journalled once, with their queue and
    /// sent records, and a QoS 2 PUBLISH to one of them waits for its
    /// record (`Shard::hold_out`); so a `kill -9` of this node loses none
    /// of what it took from NATS for them.
    fn offer_from_cluster(&mut self, message: &Message, takers: &[(SessionKey, QoS)]) {
        let Shard {
            sessions,
            dirty,
            stats,
            limits,
            batch,
            persist_stamps,
            persist_refs,
            persist_sent,
            persist_hold,
            ..
        } = self;
        let mut keepers = Keepers::new(persist_stamps, persist_refs, persist_sent, persist_hold);
        let mut encoded = Encoded::new(message, batch);
        for &(key, granted) in takers {
            let Some(session) = sessions.get_mut(key as usize) else {
                continue;
            };
            keepers.offer(session, key, |session| {
                offer(session, &mut encoded, key, granted, limits, stats, dirty);
            });
        }
        if let Some(mid) = keepers.mid() {
            self.journal_queued(message, mid);
        }
    }
}

/// The QoS at which a session of `state` takes a message on `topic` that
/// came on the NATS subscription of `filter` (`None`: the escaped subject,
/// or a publish on this node: through any of its filters), or None when it
/// takes it through another of its filters or none. NATS sends the node
/// one copy per matching subscription, so a session takes it only through
/// the smallest (byte order) of its own filters that match the topic, at
/// the highest QoS granted among them: one copy, as for a local publish.
pub(super) fn copy_qos(state: &SessionState, filter: Option<&str>, topic: &str) -> Option<QoS> {
    let mut smallest: Option<&str> = None;
    let mut granted = QoS::AtMostOnce;
    for (own, qos) in &state.subscriptions {
        if topic::filter_matches(own, topic) {
            if smallest.is_none_or(|s| own.as_ref() < s) {
                smallest = Some(own.as_ref());
            }
            granted = granted.max(*qos);
        }
    }
    match filter {
        Some(filter) => (smallest == Some(filter)).then_some(granted),
        None => smallest.map(|_| granted),
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use bytes::Bytes;

    use super::*;
    use crate::config::Config;
    use crate::protocol::Version;
    use crate::protocol::v5::{RetainHandling, SubscriptionOptions};
    use crate::shard::testing::{self, attach_client, payloads};

    /// A message on `topic`.
    fn message(topic: &str, payload: &'static [u8]) -> Message {
        Message::new(
            topic.into(),
            Bytes::from_static(payload),
            QoS::AtLeastOnce,
            false,
        )
    }

    /// Subscribes session `key` of `shard` to `filter` at `qos` too.
    fn also_subscribe(shard: &mut Shard, key: SessionKey, filter: &str, qos: QoS) {
        let filters = vec![(filter.into(), qos)];
        let subscribe = crate::protocol::v3::Subscribe {
            packet_id: 2,
            filters,
        };
        shard.subscribe(key, subscribe, None);
    }

    #[test]
    fn a_session_takes_a_message_once_through_its_smallest_matching_filter() {
        let mut shard = testing::shard();
        let mut both = attach_client(&mut shard, "both", "a/#", QoS::AtMostOnce, None);
        also_subscribe(&mut shard, both.key, "a/+", QoS::AtLeastOnce);
        let mut plain = attach_client(&mut shard, "plain", "a/b", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let _ = both.publishes();
        // NATS sends one copy per subscription of the node: `a/#`, `a/+`, `a/b`.
        let m = message("a/b", b"x");
        for filter in ["a/#", "a/+", "a/b"] {
            shard.route_from_cluster(Some(filter), std::slice::from_ref(&m));
        }
        shard.flush_dirty();
        let got = both.publishes();
        assert_eq!(got.len(), 1, "one copy for the session with two filters");
        assert_eq!(got[0].2, QoS::AtLeastOnce, "the highest QoS granted");
        assert_eq!(plain.publishes().len(), 1);
        assert!(shard.take_remote_batch().is_none(), "never handed on");
    }

    #[test]
    fn a_run_from_another_node_reaches_each_session_once_as_one_entry_where_it_can() {
        let mut shard = testing::shard();
        let mut plain = attach_client(&mut shard, "plain", "t/#", QoS::AtMostOnce, None);
        let mut both = attach_client(&mut shard, "both", "t/#", QoS::AtMostOnce, None);
        also_subscribe(&mut shard, both.key, "t/+", QoS::AtMostOnce);
        let mut v5 = attach_client(&mut shard, "v5", "t/#", QoS::AtMostOnce, None);
        if let Some(session) = shard.sessions.get_mut(v5.key as usize) {
            // An MQTT 5.0 session takes the run message by message.
            session.version = Version::V5;
        }
        shard.flush_dirty();
        let _ = both.publishes();
        let run: Vec<Message> = (0..5)
            .map(|i| {
                let mut m = message("t/1", b"");
                m.qos = QoS::AtMostOnce;
                m.payload = Bytes::from(i.to_string());
                m
            })
            .collect();
        // NATS gives the node one copy per matching subscription.
        for filter in ["t/#", "t/+"] {
            shard.route_from_cluster(Some(filter), &run);
        }
        let entries = shard
            .sessions
            .get(plain.key as usize)
            .map(|s| s.out.entries());
        assert_eq!(entries, Some(1), "the whole run is one queue entry");
        assert_eq!(shard.stats.publish_sent_by_qos, [15, 0, 0]);
        shard.flush_dirty();
        let want: Vec<String> = (0..5).map(|i| i.to_string()).collect();
        assert_eq!(payloads(&plain.publishes()), want);
        assert_eq!(payloads(&both.publishes()), want, "once, through t/#");
        // Read as 3.1.1: the 5.0 frame's empty properties come first.
        let want_v5: Vec<String> = want.iter().map(|p| format!("\0{p}")).collect();
        assert_eq!(payloads(&v5.publishes()), want_v5, "in order");
        assert!(shard.take_remote_batch().is_none(), "never handed on");
    }

    /// `n` messages on `topic` from another node at `qos`, payloads "0",
    /// "1", ...
    fn numbered(topic: &str, n: usize, qos: QoS) -> Vec<Message> {
        (0..n)
            .map(|i| {
                let mut m = message(topic, b"");
                m.qos = qos;
                m.payload = Bytes::from(i.to_string());
                m
            })
            .collect()
    }

    /// The packet ids and payloads of what session `key` has in flight,
    /// and the payloads of its pending messages, oldest first.
    fn flows(shard: &Shard, key: SessionKey) -> (Vec<(u16, String)>, Vec<String>) {
        let text = |m: &Message| String::from_utf8_lossy(&m.payload).into_owned();
        shard.sessions[key as usize]
            .state
            .flows
            .as_deref()
            .map(|f| {
                let inflight = f.inflight.iter().map(|i| (i.packet_id, text(&i.message)));
                (inflight.collect(), f.pending.iter().map(text).collect())
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_qos1_run_from_another_node_keeps_order_packet_ids_and_the_inflight_window() {
        let config = Config {
            max_inflight_messages: 3,
            ..Config::default()
        };
        let mut shard = testing::shard_with(0, 1, config);
        let mut one = attach_client(&mut shard, "one", "t/#", QoS::AtLeastOnce, None);
        let mut two = attach_client(&mut shard, "two", "t/#", QoS::ExactlyOnce, None);
        let mut zero = attach_client(&mut shard, "zero", "t/#", QoS::AtMostOnce, None);
        shard.flush_dirty(); // the SUBACKs
        // One message in flight to `one` before: its ids go on from 2.
        shard.route_from_cluster(Some("t/#"), &[message("t/0", b"before")]);
        let _ = one.publishes();
        // A run of QoS 1 messages and a QoS 2 one, all to one topic.
        let mut run = numbered("t/1", 6, QoS::AtLeastOnce);
        run[5].qos = QoS::ExactlyOnce;
        shard.route_from_cluster(Some("t/#"), &run);
        let pair = |id: u16, p: &str| (id, p.to_owned());
        let texts = |ps: &[&str]| -> Vec<String> { ps.iter().map(|p| (*p).to_owned()).collect() };
        // Per subscriber, each message its own packet id, in order, within
        // the window; the rest pending, in order.
        let want = (
            vec![pair(1, "before"), pair(2, "0"), pair(3, "1")],
            texts(&["2", "3", "4", "5"]),
        );
        assert_eq!(flows(&shard, one.key), want);
        assert_eq!(flows(&shard, two.key), want);
        let last_pending = |shard: &Shard, key: SessionKey| {
            shard.sessions[key as usize]
                .state
                .flows
                .as_deref()
                .and_then(|f| f.pending.back().map(|m| m.qos))
        };
        assert_eq!(last_pending(&shard, one.key), Some(QoS::AtLeastOnce));
        assert_eq!(last_pending(&shard, two.key), Some(QoS::ExactlyOnce));
        assert_eq!(shard.stats.publish_sent_by_qos, [7, 6, 0]);
        shard.flush_dirty();
        let sent = |got: Vec<(String, Vec<u8>, QoS)>| {
            got.into_iter()
                .map(|(_, p, q)| (String::from_utf8_lossy(&p).into_owned(), q))
                .collect::<Vec<_>>()
        };
        let at = |ps: &[&str], q: QoS| -> Vec<(String, QoS)> {
            ps.iter().map(|p| ((*p).to_owned(), q)).collect()
        };
        assert_eq!(
            sent(one.publishes()),
            at(&["before", "0", "1"], QoS::AtLeastOnce)
        );
        assert_eq!(
            sent(two.publishes()),
            at(&["before", "0", "1"], QoS::AtLeastOnce)
        );
        assert_eq!(
            sent(zero.publishes()),
            at(&["before", "0", "1", "2", "3", "4", "5"], QoS::AtMostOnce),
            "downgraded to the QoS granted, every message, in order"
        );
        // The acknowledgements let the pending ones in, with the next ids.
        let Shard {
            sessions, limits, ..
        } = &mut shard;
        for id in 1..=3 {
            assert!(sessions[one.key as usize].on_puback(id, limits));
        }
        let want = (
            vec![pair(4, "2"), pair(5, "3"), pair(6, "4")],
            texts(&["5"]),
        );
        assert_eq!(flows(&shard, one.key), want);
    }

    #[test]
    fn a_qos1_run_from_another_node_over_the_queue_limit_drops_the_rest_and_counts_it() {
        let config = Config {
            max_inflight_messages: 1,
            max_queued_messages: 2,
            ..Config::default()
        };
        let mut shard = testing::shard_with(0, 1, config);
        let mut client = attach_client(&mut shard, "c", "t", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        shard.route_from_cluster(Some("t"), &numbered("t", 5, QoS::AtLeastOnce));
        let want = (
            vec![(1, "0".to_owned())],
            vec!["1".to_owned(), "2".to_owned()],
        );
        assert_eq!(flows(&shard, client.key), want, "one in flight, two queued");
        assert_eq!(shard.stats.publish_sent_by_qos, [0, 1, 0]);
        assert_eq!(shard.stats.publish_dropped, 2);
        shard.flush_dirty();
        assert_eq!(payloads(&client.publishes()), ["0"]);
    }

    #[test]
    fn a_qos1_run_through_two_filters_of_a_session_reaches_it_once() {
        let mut shard = testing::shard();
        let mut both = attach_client(&mut shard, "both", "t/#", QoS::AtLeastOnce, None);
        also_subscribe(&mut shard, both.key, "t/+", QoS::ExactlyOnce);
        shard.flush_dirty();
        let _ = both.publishes();
        let run = numbered("t/1", 4, QoS::ExactlyOnce);
        // NATS gives the node one copy per matching subscription.
        for filter in ["t/#", "t/+"] {
            shard.route_from_cluster(Some(filter), &run);
        }
        shard.flush_dirty();
        let got = both.publishes();
        assert_eq!(payloads(&got), ["0", "1", "2", "3"], "once, through t/#");
        assert!(
            got.iter().all(|m| m.2 == QoS::ExactlyOnce),
            "the highest QoS granted"
        );
    }

    #[test]
    fn a_run_from_another_node_a_session_may_not_read_is_counted_per_message() {
        let acl = testing::acl_file();
        let mut shard = testing::shard_with_acl(0, 1, &acl);
        // "anon" may not read secret/anon; "other" may.
        let _anon = attach_client(&mut shard, "anon", "secret/#", QoS::AtLeastOnce, None);
        let mut other = attach_client(&mut shard, "other", "secret/#", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            shard.route_from_cluster(Some("secret/#"), &numbered("secret/anon", 3, qos));
        }
        assert_eq!(shard.stats.read_denied, 6, "each message of both runs");
        shard.flush_dirty();
        assert_eq!(payloads(&other.publishes()), ["0", "1", "2", "0", "1", "2"]);
    }

    /// A persistent session of `shard` (which has a session journal) for
    /// `client_id`, subscribed to `filter` at QoS 2 and journalled, online
    /// or offline; its key and image alias.
    fn journalled(
        shard: &mut Shard,
        client_id: &str,
        filter: &str,
        online: bool,
    ) -> (SessionKey, crate::store::record::Alias) {
        let key = testing::attach(shard, client_id, filter, QoS::ExactlyOnce);
        let session = &mut shard.sessions[key as usize];
        session.clean_session = false;
        if !online {
            session.detach();
        }
        shard.journal_session(key);
        (key, shard.persist_stamps[&key])
    }

    /// A queue or sent record as a test compares it: kind, message id,
    /// the sessions' references as text.
    type Refs = (&'static str, u64, String);

    /// The records of `records` about messages: each message's id and
    /// payload, and the queue and sent records.
    fn message_records(records: &[Record]) -> (Vec<(u64, Bytes)>, Vec<Refs>) {
        let mut messages = Vec::new();
        let mut refs = Vec::new();
        for record in records {
            match record {
                Record::Message(mid, m) => messages.push((*mid, m.payload.clone())),
                Record::Queue(mid, queued) => refs.push(("queue", *mid, format!("{queued:?}"))),
                Record::Sent(mid, sent) => refs.push(("sent", *mid, format!("{sent:?}"))),
                _ => {}
            }
        }
        (messages, refs)
    }

    #[test]
    fn a_message_from_another_node_kept_by_persistent_sessions_is_journalled_once() {
        let mut shard = testing::shard();
        let journal = testing::unwritten_journal(&mut shard);
        let (online, online_alias) = journalled(&mut shard, "online", "t/#", true);
        let (_, offline_alias) = journalled(&mut shard, "offline", "t/#", false);
        let mut plain = attach_client(&mut shard, "plain", "t/#", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        let before = journal.pending_records().len();
        let mut qos2 = message("t/1", b"two");
        qos2.qos = QoS::ExactlyOnce;
        let messages = [message("t/1", b"one"), qos2];
        shard.route_from_cluster(Some("t/#"), &messages);
        let records = journal.pending_records();
        let (stored, refs) = message_records(&records[before..]);
        let payloads: Vec<Bytes> = stored.iter().map(|m| m.1.clone()).collect();
        assert_eq!(
            payloads,
            [Bytes::from_static(b"one"), Bytes::from_static(b"two")],
            "each message once for the shard, in order"
        );
        let (one, two) = (stored[0].0, stored[1].0);
        let queue = |mid, qos| ("queue", mid, format!("{:?}", [(offline_alias, qos)]));
        let sent = |mid, id: u16, qos| ("sent", mid, format!("{:?}", [(online_alias, id, qos)]));
        assert_eq!(
            refs,
            [
                queue(one, QoS::AtLeastOnce),
                sent(one, 1, QoS::AtLeastOnce),
                queue(two, QoS::ExactlyOnce),
                sent(two, 2, QoS::ExactlyOnce),
            ],
            "the offline session queued both, the online one sent both"
        );
        let conn_id = shard.sessions[online as usize]
            .link
            .as_ref()
            .map(|l| l.conn_id)
            .unwrap();
        assert!(
            shard.held_out.waits(online, conn_id),
            "the QoS 2 PUBLISH waits for the record of its packet id"
        );
        shard.flush_dirty();
        assert_eq!(plain.publishes().len(), 2, "a clean session as before");
        // A message nobody journalled keeps writes nothing.
        let before = journal.pending_records().len();
        let mut qos0 = message("t/1", b"zero");
        qos0.qos = QoS::AtMostOnce;
        shard.route_from_cluster(Some("t/#"), &[qos0.clone(), qos0]);
        assert_eq!(journal.pending_records().len(), before);
    }

    #[test]
    fn a_shared_message_from_another_node_kept_by_a_persistent_member_is_journalled_once() {
        let mut shard = testing::shard();
        let journal = testing::unwritten_journal(&mut shard);
        let (_, alias) = journalled(&mut shard, "member", "$share/g/t", false);
        assert_eq!(shard.shared.members(), 1);
        let before = journal.pending_records().len();
        let share = ByteString::from("$share/g/t");
        shard.deliver_shared_from_cluster(vec![(share, message("t", b"one"))]);
        let (stored, refs) = message_records(&journal.pending_records()[before..]);
        assert_eq!(stored.len(), 1);
        let queued = format!("{:?}", [(alias, QoS::AtLeastOnce)]);
        assert_eq!(refs, [("queue", stored[0].0, queued)]);
    }

    #[test]
    fn a_session_image_carries_subscriptions_options_and_queued_messages() {
        let mut shard = testing::shard();
        let client = attach_client(&mut shard, "x", "a/+", QoS::AtLeastOnce, None);
        let key = client.key;
        {
            let session = &mut shard.sessions[key as usize];
            let options = SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: false,
                retain_handling: RetainHandling::SendAtSubscribe,
            };
            session.set_subscription_options(
                SharedFilter::from("a/+"),
                &options,
                NonZeroU32::new(7),
            );
            let flows = session.state.flows.get_or_insert_with(Box::default);
            for payload in [&b"one"[..], b"two", b"three"] {
                flows.pending.push_back(Message::new(
                    "a/b".into(),
                    Bytes::copy_from_slice(payload),
                    QoS::AtLeastOnce,
                    true,
                ));
            }
        }
        let state = shard.sessions[key as usize].state.clone();
        let image = encode_image("x", &state, MAX_IMAGE);
        let back = decode_image(&image).unwrap();
        assert_eq!(stored_subscriptions(&back), stored_subscriptions(&state));
        let payloads = |s: &SessionState| -> Vec<Bytes> {
            s.flows
                .as_ref()
                .map(|f| f.pending.iter().map(|m| m.payload.clone()).collect())
                .unwrap_or_default()
        };
        assert_eq!(payloads(&back), payloads(&state));
        assert!(
            back.flows
                .as_ref()
                .unwrap()
                .pending
                .iter()
                .all(|m| !m.retain),
            "RETAIN cleared, as after a restart"
        );
        // Too large: the oldest messages go first.
        let small = encode_image("x", &state, image.len() - 1);
        assert_eq!(
            payloads(&decode_image(&small).unwrap()),
            vec![Bytes::from_static(b"two"), Bytes::from_static(b"three")]
        );
        // Bytes that are no image are refused.
        assert!(decode_image(&image[..image.len() - 1]).is_err());
        assert!(decode_image(&image[image.len() - 20..]).is_err());
        assert!(decode_image(&[]).is_err());
    }

    /// A session's flows travel with its image: what was in flight comes
    /// back in flight with its packet id and phase (resent with DUP, or
    /// PUBREL, at the attach, MQTT 3.1.1 §4.4), the incoming QoS 2 ids
    /// awaiting PUBREL stay awaited (a resent PUBLISH is a duplicate), the
    /// rest stays pending; also with a tail appended, and the oldest left
    /// out with their flows when the image is too large.
    #[test]
    fn a_session_image_carries_its_flows_in_flight_and_awaiting_pubrel() {
        use crate::session::Inflight;
        let mut shard = testing::shard();
        let client = attach_client(&mut shard, "f", "a/+", QoS::ExactlyOnce, None);
        let session = &mut shard.sessions[client.key as usize];
        let flows = session.state.flows.get_or_insert_with(Box::default);
        let inflight = |packet_id, payload: &'static [u8], qos, phase| {
            let mut m = message("a/b", payload);
            m.qos = qos;
            Inflight {
                packet_id,
                message: m,
                phase,
                stored: 0,
                journalled: false,
            }
        };
        flows.inflight.push_back(inflight(
            7,
            b"acked-not",
            QoS::AtLeastOnce,
            Phase::AwaitPubAck,
        ));
        flows.inflight.push_back(inflight(
            9,
            b"published",
            QoS::ExactlyOnce,
            Phase::AwaitPubRec,
        ));
        flows.inflight.push_back(inflight(
            11,
            b"pubrecd",
            QoS::ExactlyOnce,
            Phase::AwaitPubComp,
        ));
        flows.pending.push_back(message("a/b", b"pending"));
        flows.awaiting_rel.extend([3, 5]);
        let state = session.state.clone();
        let flows_of = |s: &SessionState| {
            let f = s.flows.as_deref().unwrap();
            let inflight: Vec<(u16, Bytes, QoS, Phase)> = f
                .inflight
                .iter()
                .map(|f| {
                    (
                        f.packet_id,
                        f.message.payload.clone(),
                        f.message.qos,
                        f.phase,
                    )
                })
                .collect();
            let pending: Vec<Bytes> = f.pending.iter().map(|m| m.payload.clone()).collect();
            (inflight, pending, f.awaiting_rel.clone())
        };
        let image = encode_image("f", &state, MAX_IMAGE);
        let back = decode_image(&image).unwrap();
        assert_eq!(flows_of(&back), flows_of(&state));
        assert_eq!(
            back.flows.as_deref().unwrap().unjournalled,
            3,
            "journalled anew where the session is kept"
        );
        // The new owner's tail goes after the pending ones.
        let appended =
            crate::cluster::tail::append_to_image(&image, &[message("a/c", b"tail")]).unwrap();
        let (inflight, pending, awaiting) = flows_of(&decode_image(&appended).unwrap());
        assert_eq!(inflight, flows_of(&state).0);
        assert_eq!(
            pending,
            [Bytes::from_static(b"pending"), Bytes::from_static(b"tail")]
        );
        assert_eq!(awaiting, [3, 5]);
        // Too large: the oldest message in flight is left out, and its flow.
        let small = encode_image("f", &state, image.len() - 1);
        let (inflight, pending, awaiting) = flows_of(&decode_image(&small).unwrap());
        let ids: Vec<u16> = inflight.iter().map(|f| f.0).collect();
        assert_eq!(ids, [9, 11]);
        assert_eq!(pending, [Bytes::from_static(b"pending")]);
        assert_eq!(awaiting, [3, 5]);
        // Without flows, the image is what an older node wrote: messages
        // and the image only (which such a node reads).
        let mut plain = state.clone();
        let f = plain.flows.as_deref_mut().unwrap();
        f.inflight.clear();
        f.awaiting_rel.clear();
        let records = crate::cluster::tail::records(&encode_image("f", &plain, MAX_IMAGE)).unwrap();
        assert!(
            records
                .iter()
                .all(|r| matches!(r, Record::SessionImage(_) | Record::Message(..)))
        );
    }

    /// The new owner appends the merged tail of a move to the image the old
    /// owner sent (cluster::tail): the shard reads it back with those
    /// messages queued after the image's own, at their QoS; the tail code
    /// reads the image's plain filters.
    #[test]
    fn a_tail_appended_to_a_session_image_is_queued_after_its_messages() {
        let mut shard = testing::shard();
        let client = attach_client(&mut shard, "m", "a/+", QoS::AtLeastOnce, None);
        let session = &mut shard.sessions[client.key as usize];
        session.subscribe(SharedFilter::from("$share/g/b"), QoS::AtLeastOnce);
        let flows = session.state.flows.get_or_insert_with(Box::default);
        flows.pending.push_back(message("a/b", b"queued"));
        let state = session.state.clone();
        let image = encode_image("m", &state, MAX_IMAGE);
        let filters = crate::cluster::tail::image_filters(&image).unwrap();
        assert_eq!(
            filters,
            [(ByteString::from("a/+"), QoS::AtLeastOnce)],
            "shared ones left out"
        );
        let mut two = message("a/c", b"tail 2");
        two.qos = QoS::ExactlyOnce;
        let tail = [message("a/c", b"tail 1"), two];
        let appended = crate::cluster::tail::append_to_image(&image, &tail).unwrap();
        let back = decode_image(&appended).unwrap();
        let got: Vec<(Bytes, QoS)> = back
            .flows
            .as_ref()
            .map(|f| {
                f.pending
                    .iter()
                    .map(|m| (m.payload.clone(), m.qos))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            got,
            [
                (Bytes::from_static(b"queued"), QoS::AtLeastOnce),
                (Bytes::from_static(b"tail 1"), QoS::AtLeastOnce),
                (Bytes::from_static(b"tail 2"), QoS::ExactlyOnce),
            ]
        );
        assert_eq!(stored_subscriptions(&back), stored_subscriptions(&state));
        assert!(crate::cluster::tail::append_to_image(&image[..3], &tail).is_err());
    }

    /// A session the bridge is handing to another node takes no message
    /// from NATS (its collector has them), the others do; once the mark
    /// goes, it takes them again.
    #[test]
    fn a_session_being_handed_over_takes_nothing_from_nats() {
        let mut shard = testing::shard();
        let mut moving = attach_client(&mut shard, "moving", "t/#", QoS::AtLeastOnce, None);
        let mut other = attach_client(&mut shard, "other", "t/#", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        shard.cluster_handing.insert(ByteString::from("moving"));
        shard.route_from_cluster(Some("t/#"), &[message("t/1", b"during")]);
        shard.flush_dirty();
        assert!(moving.publishes().is_empty());
        assert_eq!(other.publishes().len(), 1);
        shard.cluster_handing.remove("moving");
        shard.route_from_cluster(Some("t/#"), &[message("t/1", b"after")]);
        shard.flush_dirty();
        assert_eq!(payloads(&moving.publishes()), ["after"]);
    }

    /// Of a batch the bridge sends with doubles named
    /// (`ToShard::DeliverExcept`), the session named does not get those
    /// again, every other session does, and the rest reach it in order;
    /// the session is not left marked.
    #[test]
    fn a_message_named_as_a_double_skips_only_that_session() {
        let mut shard = testing::shard();
        let mut moved = attach_client(&mut shard, "moved", "t/#", QoS::AtLeastOnce, None);
        let mut other = attach_client(&mut shard, "other", "t/#", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        let batch = [
            message("t/1", b"1"),
            message("t/1", b"2"),
            message("t/1", b"3"),
            message("t/1", b"4"),
        ];
        let except = [
            (0, ByteString::from("moved")),
            (2, ByteString::from("moved")),
        ];
        shard.route_from_cluster_except(Some("t/#"), &batch, &except);
        shard.flush_dirty();
        assert_eq!(payloads(&moved.publishes()), ["2", "4"]);
        assert_eq!(payloads(&other.publishes()), ["1", "2", "3", "4"]);
        assert!(shard.cluster_handing.is_empty());
        assert_eq!(shard.stats.cluster_doubles_dropped, 2);
        // The escaped subject the same way.
        let escaped = [message("t/a b", b"5"), message("t/a b", b"6")];
        shard.route_from_cluster_except(None, &escaped, &[(1, ByteString::from("moved"))]);
        shard.flush_dirty();
        assert_eq!(payloads(&moved.publishes()), ["5"]);
        assert_eq!(payloads(&other.publishes()), ["5", "6"]);
    }

    /// On the escaped subject too a session being handed over takes
    /// nothing (its collector has it; on the code before it took it, and
    /// the new owner got it again from the tail), the others do.
    #[test]
    fn a_session_being_handed_over_takes_nothing_from_the_escaped_subject() {
        let mut shard = testing::shard();
        let mut moving = attach_client(&mut shard, "moving", "t/#", QoS::AtLeastOnce, None);
        let mut other = attach_client(&mut shard, "other", "t/#", QoS::AtLeastOnce, None);
        shard.flush_dirty();
        shard.cluster_handing.insert(ByteString::from("moving"));
        shard.route_from_cluster(None, &[message("t/a b", b"during")]);
        shard.flush_dirty();
        assert!(moving.publishes().is_empty());
        assert_eq!(payloads(&other.publishes()), ["during"]);
        shard.cluster_handing.remove("moving");
        shard.route_from_cluster(None, &[message("t/a b", b"after")]);
        shard.flush_dirty();
        assert_eq!(payloads(&moving.publishes()), ["after"]);
    }

    /// A session the bridge hands to another node, taken by the claim of
    /// that take-over on its own shard: the claim reports what the shard
    /// had routed of every shard's publishes, its own routed but not handed
    /// on yet included: this node's other messages are not in the image
    /// (cluster::positions). Batches from another shard count as routed
    /// from their first message on. A claim of this node's own reports
    /// nothing.
    #[test]
    fn a_session_evicted_for_a_hand_over_reports_what_its_shard_routed() {
        use crate::cluster::link::{ClusterLink, Control};

        let mut shard = testing::shard();
        let (link, controls) = ClusterLink::for_tests(0);
        shard.cluster = Some(link);
        // Persistent sessions, whose state moves.
        let persistent = |shard: &mut Shard, id: &str| {
            let client = attach_client(shard, id, "t/#", QoS::AtLeastOnce, None);
            if let Some(session) = shard.sessions.get_mut(client.key as usize) {
                session.clean_session = false;
            }
            client
        };
        let _moving = persistent(&mut shard, "moving");
        let batch = Arc::new(vec![message("t/1", b"a"), message("t/1", b"b")]);
        shard.route_batch_from(&batch, (1, 1));
        shard.publish(message("t/2", b"handed on"));
        let (_, first) = shard.take_numbered_batch().expect("a batch");
        assert_eq!(first, 1);
        shard.publish(message("t/2", b"not yet"));
        shard.cluster_handing.insert(ByteString::from("moving"));
        // Another node's take-over claims it here.
        shard.start_claim_for(ByteString::from("moving"), false, true);
        let seen = std::iter::from_fn(|| controls.try_recv().ok())
            .find_map(|c| match c {
                Control::Seen { client_id, seen } if client_id == "moving" => Some(seen),
                _ => None,
            })
            .expect("reported");
        assert!(seen.routed(1, 2) && !seen.routed(1, 3));
        assert!(seen.routed(0, 2) && !seen.routed(0, 3));
        // Not handed over: nothing reported.
        let _again = persistent(&mut shard, "again");
        shard.start_claim_for(ByteString::from("again"), false, false);
        assert!(
            std::iter::from_fn(|| controls.try_recv().ok())
                .all(|c| !matches!(c, Control::Seen { .. }))
        );
    }

    #[test]
    fn a_subscriptions_image_carries_the_filters_and_options_only_and_is_bounded() {
        let mut shard = testing::shard();
        let client = attach_client(&mut shard, "p", "a/+", QoS::AtLeastOnce, None);
        let session = &mut shard.sessions[client.key as usize];
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::SendAtSubscribe,
        };
        session.set_subscription_options(SharedFilter::from("a/+"), &options, NonZeroU32::new(9));
        session.subscribe(SharedFilter::from("$share/g/b/#"), QoS::AtMostOnce);
        let flows = session.state.flows.get_or_insert_with(Box::default);
        flows.pending.push_back(message("a/b", b"queued"));
        let state = session.state.clone();
        let image = subscriptions_image("p", &state).unwrap();
        let back = decode_image(&image).unwrap();
        assert_eq!(stored_subscriptions(&back), stored_subscriptions(&state));
        assert!(
            back.flows.as_ref().is_none_or(|f| f.pending.is_empty()),
            "no messages in it"
        );
        // Over the bound: none, and the cluster's record goes.
        let mut many = SessionState::default();
        for i in 0..700 {
            many.subscriptions.push((
                SharedFilter::from(format!("{i:0>100}").as_str()),
                QoS::AtMostOnce,
            ));
        }
        assert!(subscriptions_image("p", &many).is_none());
    }

    /// A take-over by another node whose bridge stopped waiting before the
    /// shard got to hand the session over ([`Ticket::give_up`]) keeps the
    /// session here, with its subscriptions and queue, under the take-over's
    /// claim; one the bridge still waits for hands it over and releases it.
    #[test]
    fn a_hand_over_the_bridge_gave_up_on_keeps_the_session_here() {
        let mut shard = testing::shard();
        for (id, given_up) in [("kept", true), ("moved", false)] {
            // A persistent session of `id`, offline, one message queued.
            shard.home_claim(ByteString::from(id), 0, u64::MAX, false);
            let mut session = Session::new(ByteString::from(id), false, SessionState::default());
            session.claim = u64::MAX;
            session.subscribe(SharedFilter::from("a/+"), QoS::AtLeastOnce);
            let flows = session.state.flows.get_or_insert_with(Box::default);
            flows.pending.push_back(message("a/b", b"queued"));
            shard.insert_session(session);
            // Another node's take-over claims it here.
            let token = shard.start_claim(ByteString::from(id), false);
            let (state, _) = shard.hand_over_claimed(id, token);
            assert!(state.is_some(), "{id}: the claim took the state");
            assert!(shard.session_key(id).is_none());
            let ticket = Ticket::new();
            if given_up {
                assert!(ticket.give_up());
            }
            let answer = shard.hand_over_if_awaited(id, token, state, &ticket);
            let here = shard
                .session_key(id)
                .map(|key| &shard.sessions[key as usize]);
            if given_up {
                assert_eq!(answer, HandOver::Unavailable { token });
                let here = here.expect("kept here");
                assert_eq!(here.claim, token, "as the take-over's claim");
                assert_eq!(&*here.state.subscriptions[0].0, "a/+");
                assert_eq!(here.state.flows.as_ref().map(|f| f.pending.len()), Some(1));
            } else {
                let HandOver::Moved(Some(image)) = answer else {
                    panic!("{id}: moved with its image: {answer:?}");
                };
                assert!(here.is_none(), "gone from here");
                let back = decode_image(&image).unwrap();
                assert_eq!(back.flows.map(|f| f.pending.len()), Some(1));
            }
        }
    }

    #[test]
    fn an_escaped_message_is_matched_in_full_and_never_stored_as_retained() {
        let mut shard = testing::shard();
        let mut sub = attach_client(&mut shard, "s", "#", QoS::AtMostOnce, None);
        shard.flush_dirty();
        let m = Message {
            retain: true,
            ..message("a b", b"y")
        };
        shard.route_from_cluster(None, std::slice::from_ref(&m));
        shard.flush_dirty();
        assert_eq!(sub.publishes().len(), 1);
        assert_eq!(shard.retained.len(), 0);
    }
}
