//! Session ownership across nodes (docs/design/cluster.md §9): which node
//! holds each client id, in the JetStream KV bucket `<root>_sessions`,
//! changed only by compare-and-set on the record's revision.
//!
//! A CONNECT, once its id is its own on the node, asks the bridge
//! ([`claim`]): `create` the record (a new id: one KV write); or, if it
//! names this node's incarnation, keep it; or, if it names another node,
//! ask that node to hand the session over (`<root>.c.<node>.takeover`,
//! served by [`serve_takeovers`]): the owner ends it there (the old
//! connection closes as a take-over) and answers with its state, and this
//! node then `update`s the record at the revision it read. A node that
//! does not answer because nobody serves its subject (NATS "no responders":
//! its connection is gone) or is not heard for `node_ttl` is dead: its
//! record is taken over fresh. A record that moved meanwhile (the
//! compare-and-set failed) is read again. A clean session's end deletes
//! the record at the revision this node wrote ([`released`]), never a newer
//! owner's.
//!
//! With `kv_replicas = 3` a KV read (a direct get) may be answered by a
//! follower that has not yet applied the latest write. A read followed by
//! a compare-and-set may be stale (the write then fails and the record is
//! read again); every decision taken on a read alone uses a leader read
//! ([`leader_entry`]): a claim finding the id this node's, the
//! re-assertions after an outage (which close or keep sessions), and a
//! dead owner's subscriptions record (from any replica while the leader
//! does not answer: a stale one is only a miss).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::{RequestErrorKind, client::RequestError};
use bytes::Bytes;
use bytestring::ByteString;
use futures_lite::StreamExt;
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterError;
use crate::cluster::bridge::{Bridge, Shared, open_bucket};
use crate::cluster::kept::{Images, Kept};
use crate::cluster::link::{ClaimAnswer, ClaimRequest, HandOver, Ticket, ToShard};
use crate::cluster::retained;
use crate::cluster::tail;
use crate::config::cluster::PartitionMode;

/// Longest the bridge works on one claim, counted from the start of the
/// CONNECT's claim (the shard sets [`ClaimRequest::deadline`] from it),
/// before it answers [`ClaimAnswer::Unavailable`]: every KV call of the
/// claim and the wait on the previous owner are cut off there, not each
/// given a timeout of its own. Below the 10 s a CONNECT waits for its
/// whole claim, so the answer arrives before the connection gives up.
pub const CLAIM_DEADLINE: Duration = Duration::from_secs(8);
/// Pause before another try after a KV error or an owner that did not
/// answer (it may be a moment from answering, or from being declared dead).
const RETRY: Duration = Duration::from_millis(200);
/// Longest a leader read ([`leader_entry`]) waits: a stream that is
/// electing a leader (its server died) leaves the request unanswered until
/// the client's 10 s request timeout, past [`CLAIM_DEADLINE`]; bounded, the
/// claim tries again after [`RETRY`] and is granted once the new leader
/// (a few seconds) answers.
const LEADER_READ: Duration = Duration::from_secs(1);
/// Largest record value: a node name (64 bytes), an incarnation and a few
/// fields in JSON; refused by the bucket if larger.
const MAX_RECORD_SIZE: usize = 512;
/// Longest an owner's shard takes to hand a session over before the owner
/// answers without state (the shard is stuck).
const SHARD_ANSWER: Duration = Duration::from_secs(2);
/// Largest session image of subscriptions kept per persistent session in
/// the subscriptions bucket (about 500 filters of 100 bytes): a session
/// with more has no record there, so a node's death leaves it a fresh
/// session (Session Present 0: the client subscribes again) rather than a
/// part of its subscriptions.
pub const MAX_SUBSCRIPTIONS_RECORD: usize = 64 * 1024;
/// Bytes before the image in a subscriptions value: the revision of the
/// ownership record it belongs to (u64, little-endian).
const SUBSCRIPTIONS_HEADER: usize = 8;
/// How long an owner keeps the state it handed over, for another node
/// that asks for the same record revision (two nodes racing for one id,
/// or one whose claim was cut off before its compare-and-set was applied
/// and whose client asks again, there or elsewhere: whichever wins the
/// compare-and-set has the state): as long as a requester keeps what its
/// claim got ([`KEPT_TTL`]), so a retry finds the state on either node.
const HANDED_TTL: Duration = KEPT_TTL;
/// Most bytes of handed-over state an owner keeps for [`HANDED_TTL`]; the
/// oldest goes first beyond it.
const HANDED_MAX_BYTES: usize = 64 << 20;
/// How long a node keeps the state a claim of its own received but gave to
/// no connection (`Tables::kept`): the claim's deadline passed with its
/// compare-and-set's outcome unknown, or the grant reached the shard after
/// the connection stopped waiting. The client got CONNACK 0x03 and
/// connects again after its back-off (clients wait seconds, doubling: a
/// minute covers several tries), here or on another node, which asks this
/// one.
const KEPT_TTL: Duration = Duration::from_secs(60);
/// Most bytes of such state a node keeps for [`KEPT_TTL`]; the oldest goes
/// first beyond it (the client then gets a fresh session).
const KEPT_MAX_BYTES: usize = 64 << 20;
/// Pause before looking again whether an id's previous hand-over ended.
const HANDING_POLL: Duration = Duration::from_millis(5);
/// How long after this node handed an id's session to another node a
/// claim here that finds the record still naming this node waits for it
/// to move ([`HandedAway`]): the requester writes it one KV round trip
/// after the answer, and its claim (which must also fit the tail's 2 s
/// in [`CLAIM_DEADLINE`]) gives up on it only at its deadline. Past this
/// the requester's write is taken as lost (cut off, or it lost its
/// compare-and-set): the claim here writes the record itself, by
/// compare-and-set, with the state kept for racers. Within the claim's
/// deadline with room for the take-over from the requester that follows
/// when the record did move (its request and tail, 2 s each at most).
const HANDED_SETTLE: Duration = SHARD_ANSWER;
// The wait fits a claim's deadline with room for the take-over after it
// (its request and its tail, 2 s each at most).
const _: () =
    assert!(HANDED_SETTLE.as_millis() + 2 * SHARD_ANSWER.as_millis() < CLAIM_DEADLINE.as_millis());
/// Pause between reads of a record while waiting for it to move off this
/// node after a hand-over (a few reads for a requester's normal write).
const HANDED_POLL: Duration = Duration::from_millis(20);
/// Pause between re-assertion passes (after the link returns, while some
/// id granted during the outage is not settled).
const REASSERT_EVERY: Duration = Duration::from_secs(1);

/// A client id this node owns in the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    /// The shard of the claim that holds it.
    pub shard: usize,
    /// The claim's token there.
    pub token: u64,
    /// The record's revision this node wrote or read.
    pub revision: u64,
}

/// A record of the sessions bucket (JSON: written at connect rate, readable
/// with `nats kv get`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Layout version: 1.
    pub v: u8,
    /// The owning node.
    pub node: String,
    /// The owning node's incarnation.
    pub inc: String,
    /// Whether the session is a clean one (its record goes when it ends).
    pub clean: bool,
    /// Unix milliseconds of the claim.
    pub at: u64,
}

/// A take-over request to an owning node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeoverRequest {
    /// The client id.
    pub id: String,
    /// The new CONNECT's CleanSession: the state is dropped, not sent.
    pub clean: bool,
    /// The requesting node, for the log.
    pub from: String,
    /// The revision of the record the requester read (0 from an older
    /// node): the state handed for it is kept and given to every requester
    /// of that revision until one wins the compare-and-set.
    #[serde(default)]
    pub rev: u64,
}

/// A client id this node granted while the link was down (`serve`), with
/// no record: re-asserted once the link returns.
#[derive(Debug, Clone)]
pub(super) struct Unregistered {
    /// The shard of the claim.
    shard: usize,
    /// The claim's token there.
    token: u64,
    /// Unix milliseconds of the grant: the later of two grants of one id
    /// wins (as the later CONNECT does on one broker).
    at: u64,
    /// The CONNECT's CleanSession.
    clean: bool,
    /// Its subscriptions' image, once told (persistent sessions).
    image: Option<Bytes>,
}

/// The bridge's ownership tables besides [`Owned`].
#[derive(Debug)]
pub(super) struct Tables {
    /// The subscriptions bucket, once it is open.
    subscriptions: Option<kv::Store>,
    /// Writes to it, in order (key, value; None: delete).
    writes: Option<async_channel::Sender<(String, Option<Bytes>)>>,
    /// Ids granted while the link was down, by client id.
    unregistered: HashMap<ByteString, Unregistered>,
    /// Owned ids to check once the link is back, by client id.
    to_check: HashMap<ByteString, Owned>,
    /// State handed over recently, by client id, with the record revision
    /// the requester read (`TakeoverRequest::rev`).
    handed: Images,
    /// State a claim of this node received and gave to no connection, by
    /// client id ([`refused`], [`unclaimed`]), with the revision of the
    /// record it was handed for (one below the revision this node wrote,
    /// for a grant that came late): this node's to give for that record
    /// (whose owner may hold nothing any more) and for any later record
    /// naming this node (the cut-off write may have been applied). The
    /// next grant of the id here takes it (and gives it where the record
    /// is this node's already or its owner had nothing), as does the next
    /// node that asks this one for the session.
    kept: Images,
    /// Ids being handed over now: from a take-over request's start until
    /// the shard answered it (after the answer the requester got, if this
    /// bridge stopped waiting for the shard first).
    handing: HashSet<ByteString>,
    /// Ids whose session this node handed to another node, until a claim
    /// here writes the record or [`HANDED_TTL`] passes: the record still
    /// names this node until the requester's compare-and-set lands, and a
    /// claim here must not read that as "this node's" ([`HandedAway`]).
    handed_away: HandedAway,
    /// Ids granted to a claim of this node whose answer waits for room in
    /// its shard's queue, or for the tail of the session's move
    /// (cluster::tail), how many such answers: granted, not yet attaching;
    /// a take-over request for one waits until the answer is in the queue.
    answering: HashMap<ByteString, u32>,
    /// Persistent sessions restored from the store, to re-assert.
    restored: Vec<Restored>,
    /// The claims of each id this node is deciding, in the order they
    /// reached the bridge: only the newest takes the ownership.
    claiming: Claiming,
    /// Per id, the claim of this node last granted with a state (shard,
    /// token) and when, until its shard settles that state: attaches it
    /// (`Control::Subscriptions` of that claim), gives it back
    /// ([`unclaimed`]: superseded there before the grant came) or ends the
    /// session ([`released`]). A later claim here that finds the record
    /// this node's waits for that first ([`settling`]); one not settled
    /// within [`SHARD_ANSWER`] is not waited for.
    sent: Sent,
}

impl Default for Tables {
    fn default() -> Self {
        Tables {
            subscriptions: None,
            writes: None,
            unregistered: HashMap::new(),
            to_check: HashMap::new(),
            handed: Images::new(HANDED_TTL, HANDED_MAX_BYTES),
            kept: Images::new(KEPT_TTL, KEPT_MAX_BYTES),
            handing: HashSet::new(),
            handed_away: HandedAway::default(),
            answering: HashMap::new(),
            restored: Vec::new(),
            claiming: Claiming::default(),
            sent: Sent::default(),
        }
    }
}

/// A persistent session restored from the store at start-up.
#[derive(Debug)]
pub(super) struct Restored {
    /// The client id.
    client_id: ByteString,
    /// The shard that holds it.
    shard: usize,
    /// Its claim token there.
    token: u64,
    /// Its subscriptions' image.
    image: Option<Bytes>,
}

/// The claims of each client id that the bridge is deciding, numbered in
/// the order they reached it. A shard asks the bridge only while its claim
/// holds the id on the node (`shard::registry`), and a later claim of the
/// id on the node asks only once that one is superseded: so, of one id's
/// claims, the one that reached the bridge last is the node's newest, the
/// one that holds (or is to hold) the session. Two such claims race in the
/// bucket (each finds the record this node's once the other wrote it);
/// only the newest may then take the ownership ([`Owned`]): an older one
/// taking it would leave the live session's release and subscriptions
/// writes matching nobody.
///
/// The state an older one got (a previous owner's session, handed to it
/// because its write landed first) is the newest's to have: it is kept
/// ([`Tables::kept`]) for the newest's grant to take, unless a claim
/// later than the older one took the ownership already: that one's
/// session is newer than the state, which must then never be given
/// ([`Claiming::overtaken`]).
#[derive(Debug, Default)]
pub(super) struct Claiming {
    /// Per id, while any of its claims is being decided.
    ids: HashMap<ByteString, Deciding>,
    /// The number of the next claim received.
    next: u64,
}

/// The claims of one id being decided ([`Claiming`]).
#[derive(Debug, Default, Clone, Copy)]
struct Deciding {
    /// How many.
    count: u32,
    /// The number of the last one received: the newest.
    last: u64,
    /// The number of the latest one that took the ownership (0: none).
    took: u64,
}

impl Claiming {
    /// A claim of `client_id` reached the bridge: its number.
    fn received(&mut self, client_id: &ByteString) -> u64 {
        self.next += 1;
        let entry = self.ids.entry(client_id.clone()).or_default();
        entry.count += 1;
        entry.last = self.next;
        self.next
    }

    /// Whether claim `number` of `client_id` is the last one received.
    fn newest(&self, client_id: &str, number: u64) -> bool {
        self.ids.get(client_id).is_none_or(|d| d.last == number)
    }

    /// Claim `number` of `client_id` took the ownership.
    fn took(&mut self, client_id: &str, number: u64) {
        if let Some(d) = self.ids.get_mut(client_id) {
            d.took = d.took.max(number);
        }
    }

    /// Whether a claim of `client_id` later than `number` took the
    /// ownership: the state claim `number` got is older than its session.
    fn overtaken(&self, client_id: &str, number: u64) -> bool {
        self.ids.get(client_id).is_some_and(|d| d.took > number)
    }

    /// A claim of `client_id` was decided.
    fn decided(&mut self, client_id: &str) {
        if let Some(d) = self.ids.get_mut(client_id) {
            d.count = d.count.saturating_sub(1);
            if d.count == 0 {
                self.ids.remove(client_id);
            }
        }
    }
}

/// What claim `number` of `request`'s id does once its write made the id
/// this node's (or it found it so), with the state it got (`got`).
#[derive(Debug, PartialEq, Eq)]
enum Granting {
    /// It is the newest ([`Claiming`]) and owns the id now: with what was
    /// kept for the id (taken out of [`Tables::kept`]).
    Newest(Option<Kept>),
    /// A later claim of the id is the newest: it settles the ownership, and
    /// `got` was kept for it unless one later than this one took the
    /// ownership already (true: kept). This claim's shard drops its
    /// grant.
    Superseded(bool),
}

impl Tables {
    /// Settles whether claim `number` of `client_id`, granted with `got`,
    /// takes the ownership ([`Granting`]), at `now`. The caller records
    /// the ownership for [`Granting::Newest`].
    fn granting(
        &mut self,
        client_id: &ByteString,
        number: u64,
        got: Option<&Kept>,
        now: Instant,
    ) -> Granting {
        if self.claiming.newest(client_id, number) {
            self.claiming.took(client_id, number);
            return Granting::Newest(self.kept.take(client_id, now));
        }
        Granting::Superseded(self.keep_for_later(client_id, number, got, now))
    }

    /// Keeps `got`, the state claim `number` of `client_id` got and gives
    /// to no connection (refused, or superseded), for the id's next grant
    /// here or the next node that asks this one, at `now`; unless a later
    /// claim of the id already took the ownership (its session is newer).
    /// Whether it was kept.
    fn keep_for_later(
        &mut self,
        client_id: &ByteString,
        number: u64,
        got: Option<&Kept>,
        now: Instant,
    ) -> bool {
        let Some(got) = got else {
            return false;
        };
        if self.claiming.overtaken(client_id, number) {
            debug!(
                "cluster: state of {client_id:?} dropped: a later claim here owns the id with a newer session"
            );
            return false;
        }
        let got = Kept {
            at: now,
            ..got.clone()
        };
        debug!(
            "cluster: {} bytes of state of {client_id:?} kept for its next claim",
            got.image.len()
        );
        self.kept.keep(client_id.clone(), got, now);
        true
    }
}

/// The claims of this node last granted a state, per id ([`Tables::sent`]).
#[derive(Debug, Default)]
pub(super) struct Sent {
    /// Per id: the claim (shard, token) and when its grant left.
    ids: HashMap<ByteString, ((usize, u64), Instant)>,
}

impl Sent {
    /// A grant with a state left for `claim` of `client_id` at `now` (it
    /// replaces an earlier one; those left [`SHARD_ANSWER`] ago go).
    fn sent(&mut self, client_id: &ByteString, claim: (usize, u64), now: Instant) {
        self.ids
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < SHARD_ANSWER);
        self.ids.insert(client_id.clone(), (claim, now));
    }

    /// Whether a state sent to another claim of `client_id` than `claim`
    /// is not settled at `now`, less than [`SHARD_ANSWER`] after it left.
    fn settling(&self, client_id: &str, claim: (usize, u64), now: Instant) -> bool {
        self.ids.get(client_id).is_some_and(|&(to, at)| {
            to != claim && now.saturating_duration_since(at) < SHARD_ANSWER
        })
    }

    /// The shard of `claim` settled the state sent to it.
    fn settled(&mut self, client_id: &str, claim: (usize, u64)) {
        if self.ids.get(client_id).is_some_and(|&(to, _)| to == claim) {
            self.ids.remove(client_id);
        }
    }
}

/// The ids whose session this node handed to another node
/// ([`Tables::handed_away`]). Between the hand-over and the requester's
/// compare-and-set the record still names this node, at the revision
/// this node held: a CONNECT here then found the id nowhere on the node
/// and the record this node's, and was granted a fresh session beside
/// the one moving away (two sessions of one id). A claim here that finds
/// the record naming this node while an entry is here waits instead
/// ([`Handed::Settling`]) until the record moves (it then takes the
/// session back from its new node as any take-over, Session Present 1),
/// or, past [`HANDED_SETTLE`], writes the record itself by
/// compare-and-set at the revision it read ([`Handed::Reclaim`]): the
/// requester's write, if it still comes, then fails, and the requester
/// reads the record again and asks this node. Exactly one of the two
/// writes wins, so the session ends up on one node.
#[derive(Debug, Default)]
pub(super) struct HandedAway {
    /// Per id: the record revision the requester read (0: a node that
    /// does not send it) and when the shard's hand-over was answered.
    ids: HashMap<ByteString, (u64, Instant)>,
}

/// What a claim here does that finds the record of an id naming this
/// node ([`HandedAway::on_record`]).
#[derive(Debug, PartialEq, Eq)]
enum Handed {
    /// Nothing was handed away: the id is this node's (granted as before).
    No,
    /// Handed away less than [`HANDED_SETTLE`] ago: read the record again
    /// after [`HANDED_POLL`].
    Settling,
    /// Handed away longer ago, the record unmoved: write it by
    /// compare-and-set, with the state kept for racers of this revision.
    Reclaim(u64),
}

impl HandedAway {
    /// The session of `client_id` went to another node that read the
    /// record at `revision`, at `now` (an earlier entry of the id is
    /// replaced; those older than [`HANDED_TTL`] go).
    fn handed(&mut self, client_id: &ByteString, revision: u64, now: Instant) {
        self.ids
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < HANDED_TTL);
        self.ids.insert(client_id.clone(), (revision, now));
    }

    /// What a claim of `client_id` that finds the record naming this node
    /// does at `now` ([`Handed`]).
    fn on_record(&self, client_id: &str, now: Instant) -> Handed {
        match self.ids.get(client_id) {
            Some(&(_, at)) if now.saturating_duration_since(at) < HANDED_SETTLE => Handed::Settling,
            Some(&(revision, at)) if now.saturating_duration_since(at) < HANDED_TTL => {
                Handed::Reclaim(revision)
            }
            _ => Handed::No,
        }
    }

    /// A claim here wrote the record of `client_id`: whatever was handed
    /// before is settled (a requester's write at an older revision fails).
    fn written(&mut self, client_id: &str) {
        self.ids.remove(client_id);
    }
}

/// The subscriptions bucket's name under cluster root `root`: per
/// persistent session, the image of its subscriptions, for the node its
/// client reconnects to if its owner dies.
pub fn subscriptions_bucket(root: &str) -> String {
    format!("{root}_session_subs")
}

/// The sessions bucket's name under cluster root `root`.
pub fn bucket(root: &str) -> String {
    format!("{root}_sessions")
}

/// The key of `client_id` (as a retained topic's: any UTF-8 string maps to
/// a valid key of fixed length).
pub fn key(client_id: &str) -> String {
    retained::key(client_id)
}

/// The subject an owning node `node` serves take-over requests on.
pub fn takeover_subject(root: &str, node: &str) -> String {
    format!("{root}.c.{node}.takeover")
}

/// Milliseconds since the Unix epoch, now.
fn unix_ms_now() -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(wall.as_millis()).unwrap_or(u64::MAX)
}

/// Opens (or creates) the sessions and subscriptions buckets, retrying
/// until they are there, then re-asserts records after link outages.
pub(super) async fn sessions_loop(bridge: Shared, replicas: usize) {
    let (client, root, status) = {
        let b = bridge.borrow();
        (b.client.clone(), b.root.clone(), b.status.clone())
    };
    let name = subscriptions_bucket(&root);
    let size = MAX_SUBSCRIPTIONS_RECORD + SUBSCRIPTIONS_HEADER;
    let subscriptions = open_bucket(&client, &status, &name, replicas, size).await;
    let (writes, queue) = async_channel::unbounded();
    tokio::task::spawn_local(write_subscriptions(
        status.clone(),
        subscriptions.clone(),
        queue,
    ));
    {
        let mut b = bridge.borrow_mut();
        b.ownership.subscriptions = Some(subscriptions);
        b.ownership.writes = Some(writes);
    }
    let name = bucket(&root);
    let store = open_bucket(&client, &status, &name, replicas, MAX_RECORD_SIZE).await;
    info!("cluster: session ownership in bucket {name}");
    bridge.borrow_mut().sessions = Some(store);
    reassert_loop(bridge).await;
}

/// Writes the subscriptions records one after the other (a session's
/// changes in the order they were made); while the link is down they are
/// dropped and counted (the record then lags until the next change).
async fn write_subscriptions(
    status: std::sync::Arc<crate::cluster::link::ClusterStatus>,
    store: kv::Store,
    queue: async_channel::Receiver<(String, Option<Bytes>)>,
) {
    while let Ok((key, value)) = queue.recv().await {
        let done = match (status.link_up(), value) {
            (false, _) => Err("the link is down".to_string()),
            (true, Some(value)) => store
                .put(&key, value)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            (true, None) => store.delete(&key).await.map_err(|e| e.to_string()),
        };
        match done {
            Ok(()) => status
                .figures
                .cluster_subscription_records
                .fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                debug!("cluster: subscriptions record not written: {e}");
                status
                    .figures
                    .cluster_kv_errors
                    .fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Queues the subscriptions record of `client_id` for the ownership record
/// at `revision` (None: delete it).
fn write_record(b: &Bridge, client_id: &str, revision: u64, image: Option<&Bytes>) {
    let Some(writes) = &b.ownership.writes else {
        return;
    };
    let value = image.map(|image| {
        let mut value = Vec::with_capacity(SUBSCRIPTIONS_HEADER + image.len());
        value.extend_from_slice(&revision.to_le_bytes());
        value.extend_from_slice(image);
        Bytes::from(value)
    });
    let _ = writes.try_send((key(client_id), value));
}

/// The latest entry of `key` in `store`, read from the bucket's stream
/// leader (JetStream's `STREAM.MSG.GET`, not the direct get a KV `entry`
/// uses when the bucket allows it, which any replica answers, possibly
/// before it has the latest write): what the leader has is what every
/// compare-and-set is checked against. `None` when the key has no entry.
async fn leader_entry(store: &kv::Store, key: &str) -> Result<Option<kv::Entry>, ClusterError> {
    let subject = format!("{}{key}", store.prefix);
    let read = store.stream.get_last_raw_message_by_subject(&subject);
    let message = match tokio::time::timeout(LEADER_READ, read).await {
        Ok(Ok(message)) => message,
        Ok(Err(e)) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Ok(Err(e)) => return Err(ClusterError::LeaderRead(e)),
        Err(_) => return Err(ClusterError::LeaderReadTimeout(LEADER_READ)),
    };
    // A message without the header is a plain put (as async-nats reads it).
    let operation = message
        .headers
        .get("KV-Operation")
        .and_then(|op| op.as_str().parse().ok())
        .unwrap_or(Operation::Put);
    Ok(Some(kv::Entry {
        bucket: store.name.clone(),
        key: key.to_string(),
        value: message.payload,
        revision: message.sequence,
        delta: 0,
        created: message.time,
        operation,
        seen_current: false,
    }))
}

/// The subscriptions a dead owner left for `key`, if its record belongs to
/// the ownership record at `revision` (an older one is stale).
async fn left_subscriptions(bridge: &Shared, key: &str, revision: u64) -> Option<Bytes> {
    let store = bridge.borrow().ownership.subscriptions.clone()?;
    // From the leader; while it does not answer (a server died, the stream
    // elects a new one) from any replica: a stale record has an older
    // revision, so it is only a miss (a fresh session), never wrong.
    let read = match leader_entry(&store, key).await {
        Ok(entry) => Ok(entry),
        Err(e) => {
            debug!("cluster: subscriptions record {key} not read from the leader: {e}");
            store.entry(key).await.map_err(|e| e.to_string())
        }
    };
    match read {
        Ok(Some(entry)) if entry.operation == Operation::Put => {
            let value = entry.value;
            let header = value.get(..SUBSCRIPTIONS_HEADER)?;
            let written = u64::from_le_bytes(header.try_into().ok()?);
            (written == revision).then(|| value.slice(SUBSCRIPTIONS_HEADER..))
        }
        Ok(_) => None,
        Err(e) => {
            debug!("cluster: subscriptions record {key} unreadable: {e}");
            None
        }
    }
}

/// The subscriptions of claim `(shard, token)`'s persistent session are
/// now `image`: written to the cluster if that claim owns the id (kept
/// for the re-assertion if it was granted without a record).
pub(super) fn subscriptions(
    bridge: &Shared,
    client_id: &ByteString,
    shard: usize,
    token: u64,
    image: Option<Bytes>,
) {
    let mut b = bridge.borrow_mut();
    // Told at the attach: a state its grant brought is the session's.
    settled(&mut b, client_id, shard, token);
    if let Some(owned) = b.owned.get(client_id)
        && owned.shard == shard
        && owned.token == token
    {
        write_record(&b, client_id, owned.revision, image.as_ref());
        b.moving.subscribed(client_id, image);
    } else if let Some(u) = b.ownership.unregistered.get_mut(client_id)
        && u.shard == shard
        && u.token == token
    {
        u.image = image;
    }
}

/// The header an owning node sets on its answer to a take-over request
/// when it could not end the session in time ([`HandOver::Unavailable`]):
/// the requester refuses the CONNECT (an older node that does not know it
/// reads the empty answer as nothing to move, as it always did).
const UNAVAILABLE_HEADER: &str = "Fanmq-Takeover-Unavailable";

/// How an owning node answered a take-over request.
enum Asked {
    /// It answered: the session image (empty: nothing to move).
    State(Bytes),
    /// It could not end the session in time (its disk stalls): it keeps it.
    Unavailable,
    /// Nobody serves its subject: the node is gone.
    Gone,
    /// No answer in time.
    Silent,
}

/// Starts deciding a claim (in a task of its own), numbered in the order
/// claims reach the bridge ([`Claiming`]).
pub(super) fn start_claim(bridge: &Shared, request: ClaimRequest) {
    let number = bridge
        .borrow_mut()
        .ownership
        .claiming
        .received(&request.client_id);
    tokio::task::spawn_local(claim(bridge.clone(), request, number));
}

/// Decides claim `number` and answers it.
async fn claim(bridge: Shared, request: ClaimRequest, number: u64) {
    let answer = decide(&bridge, &request, number).await;
    debug!(
        "cluster: claim {number} of {:?} (shard {} token {}) answered: {}",
        request.client_id,
        request.shard,
        request.token,
        match &answer {
            ClaimAnswer::Granted(None) => "granted fresh",
            ClaimAnswer::Granted(Some(_)) => "granted with a state",
            ClaimAnswer::Recovered(_) => "recovered",
            ClaimAnswer::Unavailable => "unavailable",
        }
    );
    {
        let mut b = bridge.borrow_mut();
        b.ownership.claiming.decided(&request.client_id);
        let owns = b
            .owned
            .get(&request.client_id)
            .is_some_and(|o| (o.shard, o.token) == (request.shard, request.token));
        if owns && let ClaimAnswer::Granted(Some(image)) | ClaimAnswer::Recovered(image) = &answer {
            let claim = (request.shard, request.token);
            b.ownership
                .sent
                .sent(&request.client_id, claim, Instant::now());
            // The session's filters for a hand-over before its shard
            // reports them.
            b.moving.granted(&request.client_id, image);
        }
    }
    let status = bridge.borrow().status.clone();
    let f = &status.figures;
    match &answer {
        ClaimAnswer::Granted(_) | ClaimAnswer::Recovered(_) => {
            f.cluster_claims.fetch_add(1, Ordering::Relaxed);
        }
        // Withdrawn: its shard sends no CONNACK for it.
        ClaimAnswer::Unavailable if request.withdrawn.is_withdrawn() => {}
        ClaimAnswer::Unavailable => {
            f.cluster_claims_unavailable.fetch_add(1, Ordering::Relaxed);
        }
    }
    // In the shard's queue, ahead of anything the bridge sends it after the
    // grant: a full queue keeps it in the shard's backlog, which nothing
    // later passes (cluster::backlog: a delivery for the session then finds
    // the claim attaching); a take-over request for the id, which may go to
    // another shard, waits while this answer waits for room
    // (`Tables::answering`), so it never reaches the shard first.
    let published = bridge
        .borrow_mut()
        .local
        .take_watched(&request.client_id, request.token)
        .map(Box::new);
    let answer = ToShard::Claimed {
        token: request.token,
        answer,
        published,
    };
    let Some(in_queue) = bridge.borrow().to_shards.control(request.shard, answer) else {
        return;
    };
    let id = request.client_id;
    answering(&bridge, &id, true);
    // The connection may have gone meanwhile; its claim then ends on the
    // shard (a closed queue: the shard is gone).
    // Closed once it is in the queue.
    let _ = in_queue.recv().await;
    answering(&bridge, &id, false);
}

/// A grant of `client_id` here is on its way to its shard's queue (`on`),
/// or there (`Tables::answering`).
fn answering(bridge: &Shared, client_id: &ByteString, on: bool) {
    let mut b = bridge.borrow_mut();
    if on {
        *b.ownership.answering.entry(client_id.clone()).or_insert(0) += 1;
    } else if let Some(n) = b.ownership.answering.get_mut(client_id) {
        *n -= 1;
        if *n == 0 {
            b.ownership.answering.remove(client_id);
        }
    }
}

/// Whether the state a grant of this node sent to another claim of the
/// request's id than this one ([`Tables::sent`]) is not settled by its
/// shard yet, for at most [`SHARD_ANSWER`]: that claim may have been
/// superseded there (by this one's CONNECT) before its grant came, and
/// then gives the state back for this claim to take.
fn settling(bridge: &Shared, request: &ClaimRequest) -> bool {
    let claim = (request.shard, request.token);
    let b = bridge.borrow();
    b.ownership
        .sent
        .settling(&request.client_id, claim, Instant::now())
}

/// The state sent to claim `(shard, token)` of `client_id` is settled
/// ([`Tables::sent`]).
fn settled(b: &mut Bridge, client_id: &str, shard: usize, token: u64) {
    b.ownership.sent.settled(client_id, (shard, token));
}

/// `work`, cut off at a claim's `deadline`: None once it has passed.
async fn by<T>(deadline: Instant, work: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout_at(deadline.into(), work).await.ok()
}

/// Waits [`RETRY`], or less up to a claim's `deadline`.
async fn pause(deadline: Instant) {
    tokio::time::sleep_until(deadline.min(Instant::now() + RETRY).into()).await;
}

/// Works out who owns the id now, taking it over where needed, by the
/// request's deadline (every KV call and the wait on the previous owner
/// cut off there): past it, [`ClaimAnswer::Unavailable`].
async fn decide(bridge: &Shared, request: &ClaimRequest, number: u64) -> ClaimAnswer {
    let deadline = request.deadline;
    let (client, root, node, incarnation, status, mode, timeout) = {
        let b = bridge.borrow();
        (
            b.client.clone(),
            b.root.clone(),
            b.node.clone(),
            b.incarnation.clone(),
            b.status.clone(),
            b.partition_mode,
            b.takeover_timeout,
        )
    };
    // The bucket is opened right after the link comes up: wait for it a
    // little, as a CONNECT at start may come first.
    let store = loop {
        let store = bridge.borrow().sessions.clone();
        match store {
            Some(store) if status.link_up() => break store,
            _ if !status.link_up() => {
                return match mode {
                    PartitionMode::Serve => {
                        status
                            .figures
                            .cluster_unregistered
                            .fetch_add(1, Ordering::Relaxed);
                        debug!(
                            "cluster: link down: {:?} granted without a record",
                            request.client_id
                        );
                        let mut b = bridge.borrow_mut();
                        let now = Instant::now();
                        // Superseded on this node: the later claim's grant
                        // is the one recorded. Else the session granted
                        // here is newer than a state kept for an earlier
                        // claim, which no one may give any more.
                        let granting = b.ownership.granting(&request.client_id, number, None, now);
                        if let Granting::Superseded(_) = granting {
                            return ClaimAnswer::Granted(None);
                        }
                        b.ownership.unregistered.insert(
                            request.client_id.clone(),
                            Unregistered {
                                shard: request.shard,
                                token: request.token,
                                at: unix_ms_now(),
                                clean: request.clean_session,
                                image: None,
                            },
                        );
                        ClaimAnswer::Granted(None)
                    }
                    PartitionMode::Fence => ClaimAnswer::Unavailable,
                };
            }
            _ if Instant::now() >= deadline => return ClaimAnswer::Unavailable,
            _ => pause(deadline).await,
        }
    };
    let key = key(&request.client_id);
    let record = Record {
        v: 1,
        node: node.clone(),
        inc: incarnation.clone(),
        clean: request.clean_session,
        at: unix_ms_now(),
    };
    let value = Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
    let kv_error = |e: &dyn std::fmt::Display| {
        status
            .figures
            .cluster_kv_errors
            .fetch_add(1, Ordering::Relaxed);
        debug!("cluster: sessions bucket: {e}");
    };
    // The state a previous owner sent, with the revision of the record it
    // was sent for (kept if a later compare-and-set fails and the record
    // is read again).
    let mut state: Option<Kept> = None;
    // The node that handed `state` over, which collects the tail of its
    // move (cluster::tail).
    let mut handed_by: Option<String> = None;
    // Past the deadline (checked at each turn, and every call below cut
    // off there): unavailable. A cut-off `create` or `update` may still
    // have been applied by the server; the record then names this node,
    // and the client's next CONNECT here finds it this node's: the state
    // this claim got is kept for it ([`refused`]).
    // Whether this claim waited for the record of a session this node
    // handed away to move (logged once).
    let mut waited_for_move = false;
    loop {
        if Instant::now() >= deadline {
            return refused(bridge, request, number, state);
        }
        if request.withdrawn.is_withdrawn() {
            return withdrawn(bridge, request, number, state);
        }
        let Some(created) = by(deadline, store.create(&key, value.clone())).await else {
            return refused(bridge, request, number, state);
        };
        match created {
            Ok(revision) => {
                // A state kept for an earlier claim stood for a record
                // that is gone (its session ended): dropped.
                return match own(bridge, request, number, revision, state.as_ref()) {
                    Granting::Newest(_) => ClaimAnswer::Granted(state.map(|s| s.image)),
                    Granting::Superseded(_) => ClaimAnswer::Granted(None),
                };
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                kv_error(&e);
                pause(deadline).await;
                continue;
            }
        }
        // Any replica may answer (a stale record makes the compare-and-set
        // below fail, and the record is read again), except where the
        // record says the id is this node's already: granted without a
        // compare-and-set, so that is confirmed from the leader.
        let Some(read) = by(deadline, store.entry(&key)).await else {
            return refused(bridge, request, number, state);
        };
        let entry = match read {
            Ok(Some(entry)) => entry,
            // Deleted between the two calls: create again.
            Ok(None) => continue,
            Err(e) => {
                kv_error(&e);
                pause(deadline).await;
                continue;
            }
        };
        let owner = match entry.operation {
            Operation::Delete | Operation::Purge => None,
            Operation::Put => serde_json::from_slice::<Record>(&entry.value).ok(),
        };
        debug!(
            "cluster: claim {number} of {:?} (shard {} token {}): record at revision {} names {:?}",
            request.client_id,
            request.shard,
            request.token,
            entry.revision,
            owner.as_ref().map(|o| o.node.as_str())
        );
        // Superseded on its shard meanwhile (by another node's take-over
        // there, which came before this record): nothing here waits for
        // the id any more.
        if request.withdrawn.is_withdrawn() {
            return withdrawn(bridge, request, number, state);
        }
        let mut took_over = false;
        // Whether this claim writes a record naming this node, by
        // compare-and-set, because the session went to another node whose
        // own write has not come ([`Handed::Reclaim`]); and whether the
        // state it takes is the copy kept for racers (not kept if the
        // write fails: the record is then another node's).
        let mut reclaiming = false;
        let mut from_handed = false;
        // Whether the previous owner's state is gone (dead node, or an
        // earlier run of this one): its subscriptions record may give
        // them back.
        let mut orphaned = false;
        if let Some(owner) = owner {
            if owner.node == node && owner.inc == incarnation {
                // This node may be handing the session to another node, or
                // have handed it, whose write of the record has not come:
                // the outcome first ([`HandedAway`]).
                if bridge
                    .borrow()
                    .ownership
                    .handing
                    .contains(&request.client_id)
                {
                    tokio::time::sleep(HANDING_POLL).await;
                    continue;
                }
                let handed = bridge
                    .borrow()
                    .ownership
                    .handed_away
                    .on_record(&request.client_id, Instant::now());
                match handed {
                    Handed::No => {}
                    Handed::Settling => {
                        if !waited_for_move {
                            waited_for_move = true;
                            debug!(
                                "cluster: claim {number} of {:?} waits for the record of the session handed away to move",
                                request.client_id
                            );
                        }
                        tokio::time::sleep_until(deadline.min(Instant::now() + HANDED_POLL).into())
                            .await;
                        continue;
                    }
                    Handed::Reclaim(revision) => {
                        debug!(
                            "cluster: claim {number} of {:?}: the node it was handed to did not write the record: written here",
                            request.client_id
                        );
                        reclaiming = true;
                        if state.is_none() {
                            let mut b = bridge.borrow_mut();
                            state = b
                                .ownership
                                .handed
                                .get(&request.client_id, Instant::now())
                                .filter(|h| h.revision == revision && !request.clean_session)
                                .map(|h| Kept {
                                    revision: entry.revision,
                                    at: Instant::now(),
                                    ..h.clone()
                                });
                            from_handed = state.is_some();
                        }
                    }
                }
            }
            if owner.node == node && owner.inc == incarnation && !reclaiming {
                // Already this node's (a reconnect here, or a take-over
                // between this node's shards), if the leader says so too.
                let Some(latest) = by(deadline, leader_entry(&store, &key)).await else {
                    return refused(bridge, request, number, state);
                };
                match latest {
                    Ok(Some(latest)) if latest.revision == entry.revision => {}
                    Ok(_) => continue,
                    Err(e) => {
                        kv_error(&e);
                        pause(deadline).await;
                        continue;
                    }
                }
                // Superseded during that read: it must not take the
                // ownership (its session's end would never release it).
                if request.withdrawn.is_withdrawn() {
                    return withdrawn(bridge, request, number, state);
                }
                if state.is_none() && settling(bridge, request) {
                    // The record may be the write of an earlier claim
                    // here whose grant brought the session's state to a
                    // shard where this claim's CONNECT superseded it: the
                    // state then comes back ([`unclaimed`]) for this claim
                    // to take. Once settled, the record is read again.
                    while settling(bridge, request) {
                        if Instant::now() >= deadline {
                            return refused(bridge, request, number, state);
                        }
                        tokio::time::sleep(HANDING_POLL).await;
                    }
                    continue;
                }
                let kept = match own(bridge, request, number, entry.revision, state.as_ref()) {
                    Granting::Newest(kept) => kept,
                    Granting::Superseded(_) => return ClaimAnswer::Granted(None),
                };
                if state.is_some() {
                    return ClaimAnswer::Granted(state.map(|s| s.image));
                }
                // A state an earlier claim here got and gave to nobody
                // (its write was applied after all, or its grant came
                // late): this record, later than the one it was handed
                // for, is what that claim wrote.
                let kept = kept.filter(|k| k.revision < entry.revision);
                return resumed(bridge, request, kept);
            }
            // Another node, or an earlier run of this one (whose state is
            // gone, or restored here from its store).
            orphaned = owner.node == node && !reclaiming;
            if owner.node != node {
                // The owner's answer is awaited up to the claim's deadline
                // at most.
                let left = deadline.saturating_duration_since(Instant::now());
                let asked = ask(
                    &client,
                    &root,
                    &owner.node,
                    (&request.client_id, request.clean_session, entry.revision),
                    &node,
                    timeout.min(left),
                );
                match asked.await {
                    Asked::Unavailable => {
                        debug!(
                            "cluster: node {} could not hand {:?} over in time",
                            owner.node, request.client_id
                        );
                        return refused(bridge, request, number, state);
                    }
                    Asked::State(image) => {
                        took_over = true;
                        if !image.is_empty() {
                            handed_by = Some(owner.node.clone());
                            state = Some(Kept {
                                revision: entry.revision,
                                image,
                                recovered: false,
                                at: Instant::now(),
                            });
                        } else if state.is_none() {
                            // The owner has nothing left for this record
                            // (it handed the session to an earlier claim
                            // of this node, cut off before its write, and
                            // its copy for racers expired): this node may
                            // have kept it.
                            state = kept_for(bridge, &request.client_id, entry.revision);
                        }
                    }
                    Asked::Gone => {
                        if state.is_none() {
                            state = kept_for(bridge, &request.client_id, entry.revision);
                        }
                        orphaned = true;
                        debug!(
                            "cluster: node {} is gone: {:?} taken fresh",
                            owner.node, request.client_id
                        );
                    }
                    Asked::Silent => {
                        if alive(bridge, &owner.node) {
                            pause(deadline).await;
                            continue;
                        }
                        if state.is_none() {
                            state = kept_for(bridge, &request.client_id, entry.revision);
                        }
                        orphaned = true;
                        debug!(
                            "cluster: node {} not heard for the node timeout: {:?} taken fresh",
                            owner.node, request.client_id
                        );
                    }
                }
            }
        }
        let left = if orphaned && !request.clean_session && state.is_none() {
            by(deadline, left_subscriptions(bridge, &key, entry.revision))
                .await
                .flatten()
        } else {
            None
        };
        // A dead owner's subscriptions, as a state this claim got.
        let recovered = left.clone().map(|image| Kept {
            revision: entry.revision,
            image,
            recovered: true,
            at: Instant::now(),
        });
        if request.withdrawn.is_withdrawn() {
            return withdrawn(bridge, request, number, state.or(recovered));
        }
        let Some(updated) = by(deadline, store.update(&key, value.clone(), entry.revision)).await
        else {
            return refused(bridge, request, number, state.or(recovered));
        };
        match updated {
            Ok(revision) => {
                debug!(
                    "cluster: claim {number} of {:?} wrote the record at revision {revision}",
                    request.client_id
                );
                if took_over {
                    status
                        .figures
                        .cluster_takeovers
                        .fetch_add(1, Ordering::Relaxed);
                }
                if from_handed {
                    // This claim's session holds it now: no racer of the
                    // old revision gets it.
                    bridge
                        .borrow_mut()
                        .ownership
                        .handed
                        .take(&request.client_id, Instant::now());
                }
                let got = state.as_ref().or(recovered.as_ref());
                let kept = match own(bridge, request, number, revision, got) {
                    Granting::Newest(kept) => kept,
                    Granting::Superseded(_) => return ClaimAnswer::Granted(None),
                };
                if kept.is_some() && kept == state {
                    status
                        .figures
                        .cluster_claim_states_given
                        .fetch_add(1, Ordering::Relaxed);
                }
                if let Some(left) = left {
                    status
                        .figures
                        .cluster_recovered
                        .fetch_add(1, Ordering::Relaxed);
                    return ClaimAnswer::Recovered(left);
                }
                if reclaiming {
                    // What the hand-over collected since its mark goes
                    // back to the session (before, it was lost for it).
                    // A take-over request from another node meanwhile
                    // waits until the grant is in the shard's queue.
                    let claim = (request.shard, request.token);
                    let image = state.take().map(|s| s.image);
                    answering(bridge, &request.client_id, true);
                    let image = tail::reclaim(bridge, &request.client_id, claim, image).await;
                    answering(bridge, &request.client_id, false);
                    return ClaimAnswer::Granted(image);
                }
                if took_over
                    && !request.clean_session
                    && let (Some(s), Some(from)) = (state.as_mut(), &handed_by)
                {
                    let claim = (from.as_str(), request.shard, request.token, deadline);
                    let image = s.image.clone();
                    // Granted: a take-over request from another node
                    // meanwhile waits until the grant is in the shard's
                    // queue (nothing awaits between the end of this and
                    // the send), so it takes the state the grant brings.
                    answering(bridge, &request.client_id, true);
                    s.image = tail::complete(bridge, &request.client_id, claim, image).await;
                    answering(bridge, &request.client_id, false);
                }
                return ClaimAnswer::Granted(state.map(|s| s.image));
            }
            // The record moved meanwhile: read it again.
            Err(e) => {
                debug!(
                    "cluster: record of {:?} moved ({e}), reading it again",
                    request.client_id
                );
                if from_handed {
                    // Another node's now: the copy for racers stays theirs.
                    state = None;
                }
            }
        }
    }
}

/// Whether node `name` counts as alive: heard within `node_ttl`, or not
/// yet heard while this node has been up for less than `node_ttl`.
fn alive(bridge: &Shared, name: &str) -> bool {
    let b = bridge.borrow();
    match b.nodes.get(name) {
        Some(at) => at.elapsed() < b.node_ttl,
        None => b.started.elapsed() < b.node_ttl,
    }
}

/// Records that the claim of `request` (number `number`) owns its id at
/// `revision`, and takes out what was kept for the id ([`Tables::kept`]):
/// whatever this grant brings is the session's state from now on. Unless
/// a later claim of the id reached the bridge meanwhile ([`Claiming`]):
/// this one is superseded on the node (its shard gets the grant without
/// a state, and drops it), the ownership is the later one's, and the
/// state this one got (`got`) is kept for it ([`Tables::granting`]).
fn own(
    bridge: &Shared,
    request: &ClaimRequest,
    number: u64,
    revision: u64,
    got: Option<&Kept>,
) -> Granting {
    let mut b = bridge.borrow_mut();
    // Written here (or found this node's with nothing handed away): a
    // session handed away before is settled.
    b.ownership.handed_away.written(&request.client_id);
    let granting = b
        .ownership
        .granting(&request.client_id, number, got, Instant::now());
    match &granting {
        Granting::Superseded(kept) => {
            debug!(
                "cluster: claim of {:?} superseded on this node: the ownership stays a later claim's",
                request.client_id
            );
            if *kept {
                b.status
                    .figures
                    .cluster_claim_states_kept
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Granting::Newest(_) => {
            b.ownership.unregistered.remove(&request.client_id);
            b.owned.insert(
                request.client_id.clone(),
                Owned {
                    shard: request.shard,
                    token: request.token,
                    revision,
                },
            );
            if got.is_some() {
                // The state is this claim's from now, though its grant
                // may still wait (for the tail of a move, `tail::complete`):
                // a later claim here that finds the record this node's
                // meanwhile waits for it to settle ([`settling`]), rather
                // than granting a fresh session and leaving this state
                // with nobody to give it back to ([`unclaimed`]).
                b.ownership.sent.sent(
                    &request.client_id,
                    (request.shard, request.token),
                    Instant::now(),
                );
            }
        }
    }
    granting
}

/// A claim refused: past its deadline, or the owner could not hand the
/// session over. The state it got (`got`: a previous owner's, or a dead
/// one's subscriptions) is kept for the client's next claim, here or on
/// a node that asks this one ([`Tables::kept`]): a cut-off write may have
/// been applied, and then nobody else holds the state any more. Not if a
/// later claim of the id here (this one is `number`) owns it already
/// ([`Tables::keep_for_later`]).
fn refused(bridge: &Shared, request: &ClaimRequest, number: u64, got: Option<Kept>) -> ClaimAnswer {
    debug!(
        "cluster: claim of {:?} refused (its deadline passed, or the owner could not hand the session over)",
        request.client_id
    );
    keep_got(bridge, request, number, got);
    ClaimAnswer::Unavailable
}

/// A claim withdrawn by its shard ([`ClaimRequest::withdrawn`]): superseded
/// there, by a later CONNECT of the id on this node (which asks for itself)
/// or another node's take-over (whose state came from this node): it takes
/// nothing more, and what it got is kept as a refused claim's is (for the
/// later claim, or the next node that asks this one). The answer reaches a
/// claim its shard superseded, which drops it.
fn withdrawn(
    bridge: &Shared,
    request: &ClaimRequest,
    number: u64,
    got: Option<Kept>,
) -> ClaimAnswer {
    debug!(
        "cluster: claim {number} of {:?} withdrawn: superseded on its shard",
        request.client_id
    );
    keep_got(bridge, request, number, got);
    ClaimAnswer::Unavailable
}

/// Keeps `got`, the state claim `number` of `request` got and gives to no
/// connection ([`refused`], [`withdrawn`]), for the id's next claim.
fn keep_got(bridge: &Shared, request: &ClaimRequest, number: u64, got: Option<Kept>) {
    if let Some(got) = got.filter(|_| !request.clean_session) {
        let mut b = bridge.borrow_mut();
        let now = Instant::now();
        if b.ownership
            .keep_for_later(&request.client_id, number, Some(&got), now)
        {
            b.status
                .figures
                .cluster_claim_states_kept
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What this node kept for `client_id` for the record at `revision`, the
/// one a previous owner now has nothing for (left in the table: the grant
/// takes it, [`own`]).
fn kept_for(bridge: &Shared, client_id: &str, revision: u64) -> Option<Kept> {
    let mut b = bridge.borrow_mut();
    b.ownership
        .kept
        .get(client_id, Instant::now())
        .filter(|k| k.revision == revision && !k.recovered)
        .cloned()
}

/// The answer to a claim of `request` that finds the id this node's: with
/// `kept`, the state an earlier claim here got and gave to nobody
/// (counted), as it would have been answered.
fn resumed(bridge: &Shared, request: &ClaimRequest, kept: Option<Kept>) -> ClaimAnswer {
    let Some(kept) = kept.filter(|_| !request.clean_session) else {
        return ClaimAnswer::Granted(None);
    };
    bridge
        .borrow()
        .status
        .figures
        .cluster_claim_states_given
        .fetch_add(1, Ordering::Relaxed);
    debug!(
        "cluster: {:?} resumed with the state an earlier claim here kept",
        request.client_id
    );
    if kept.recovered {
        ClaimAnswer::Recovered(kept.image)
    } else {
        ClaimAnswer::Granted(Some(kept.image))
    }
}

/// The grant `answer` of claim `(shard, token)`, with a session state,
/// reached the shard after that claim's connection stopped waiting
/// (`Control::Unclaimed`): the state is kept for the id's next claim as a refused
/// claim's is ([`Tables::kept`]), if that claim still owns the id (a
/// later claim granted meanwhile holds a newer session: dropped, logged).
/// Unless a session of that claim stays on its shard (`held`), the record
/// names a session nobody holds: it is released once the state has
/// expired with nobody claiming the id.
pub(super) fn unclaimed(
    bridge: &Shared,
    client_id: ByteString,
    (shard, token): (usize, u64),
    answer: ClaimAnswer,
    held: bool,
) {
    let (image, recovered) = match answer {
        ClaimAnswer::Granted(Some(image)) => (image, false),
        ClaimAnswer::Recovered(image) => (image, true),
        ClaimAnswer::Granted(None) | ClaimAnswer::Unavailable => return,
    };
    let mut b = bridge.borrow_mut();
    // Given back: kept below for the id's next claim, or dropped.
    settled(&mut b, &client_id, shard, token);
    let Some(owned) = b
        .owned
        .get(&client_id)
        .copied()
        .filter(|o| o.shard == shard && o.token == token)
    else {
        debug!("cluster: late state of {client_id:?} dropped: the id was claimed again meanwhile");
        return;
    };
    let now = Instant::now();
    b.status
        .figures
        .cluster_claim_states_kept
        .fetch_add(1, Ordering::Relaxed);
    let kept = Kept {
        // Given for the record this node wrote and any later one.
        revision: owned.revision.saturating_sub(1),
        image,
        recovered,
        at: now,
    };
    b.ownership.kept.keep(client_id.clone(), kept, now);
    drop(b);
    if held {
        return;
    }
    let bridge = bridge.clone();
    tokio::task::spawn_local(async move {
        tokio::time::sleep(KEPT_TTL).await;
        // Nobody claimed it (a claim here, or another node's take-over,
        // changes or removes the ownership): the state has expired.
        let unchanged = bridge.borrow().owned.get(&client_id) == Some(&owned);
        if unchanged {
            debug!("cluster: the state kept for {client_id:?} expired: its record goes");
            released(&bridge, client_id, shard, token);
        }
    });
}

/// Asks node `owner` to hand the session of `(client id, CleanSession,
/// record revision read)` over.
async fn ask(
    client: &async_nats::Client,
    root: &str,
    owner: &str,
    (client_id, clean, rev): (&str, bool, u64),
    me: &str,
    timeout: Duration,
) -> Asked {
    let body = TakeoverRequest {
        id: client_id.to_string(),
        clean,
        from: me.to_string(),
        rev,
    };
    let payload = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let asked = client.request(takeover_subject(root, owner), payload);
    match tokio::time::timeout(timeout, asked).await {
        Ok(Ok(answer))
            if answer
                .headers
                .as_ref()
                .is_some_and(|h| h.get(UNAVAILABLE_HEADER).is_some()) =>
        {
            Asked::Unavailable
        }
        Ok(Ok(answer)) => Asked::State(answer.payload),
        Ok(Err(e)) if no_responders(&e) => Asked::Gone,
        Ok(Err(e)) => {
            debug!("cluster: take-over request to {owner}: {e}");
            Asked::Silent
        }
        Err(_) => Asked::Silent,
    }
}

/// Whether a request failed because nobody serves its subject.
fn no_responders(e: &RequestError) -> bool {
    e.kind() == RequestErrorKind::NoResponders
}

/// The session of claim `(shard, token)` ended on this node: its record
/// goes if that claim still owns it, at the revision this node knows (a
/// newer owner's record stays).
pub(super) fn released(bridge: &Shared, client_id: ByteString, shard: usize, token: u64) {
    let (owned, store, status) = {
        let mut b = bridge.borrow_mut();
        settled(&mut b, &client_id, shard, token);
        if b.ownership
            .unregistered
            .get(&client_id)
            .is_some_and(|u| u.shard == shard && u.token == token)
        {
            b.ownership.unregistered.remove(&client_id);
        }
        let owned = match b.owned.get(&client_id) {
            Some(o) if o.shard == shard && o.token == token => b.owned.remove(&client_id),
            _ => None,
        };
        if let Some(o) = &owned {
            // Its subscriptions go with it.
            write_record(&b, &client_id, o.revision, None);
            b.moving.subscribed(&client_id, None);
        }
        (owned, b.sessions.clone(), b.status.clone())
    };
    let (Some(owned), Some(store)) = (owned, store) else {
        return;
    };
    tokio::task::spawn_local(async move {
        let key = key(&client_id);
        if let Err(e) = store
            .delete_expect_revision(&key, Some(owned.revision))
            .await
        {
            // A newer owner's record, or the link is down (the record is
            // then taken over by the next CONNECT as this node's own).
            debug!("cluster: record of {client_id:?} not deleted: {e}");
            status
                .figures
                .cluster_kv_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// Serves the take-over requests other nodes send this node.
pub(super) async fn serve_takeovers(bridge: Shared) {
    let (client, subject) = {
        let b = bridge.borrow();
        (b.client.clone(), takeover_subject(&b.root, &b.node))
    };
    let mut requests = match client.subscribe(subject.clone()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!("cluster: cannot subscribe to {subject}: take-over across nodes is off: {e}");
            return;
        }
    };
    while let Some(msg) = requests.next().await {
        let (Some(reply), Ok(request)) = (
            msg.reply,
            serde_json::from_slice::<TakeoverRequest>(&msg.payload),
        ) else {
            debug!("cluster: invalid take-over request on {subject} dropped");
            continue;
        };
        tokio::task::spawn_local(hand_over(bridge.clone(), request, reply));
    }
}

/// Ends the session of the request's id on this node and answers with its
/// image (empty: nothing to move).
async fn hand_over(bridge: Shared, request: TakeoverRequest, reply: async_nats::Subject) {
    let client_id = ByteString::from(request.id.as_str());
    // One hand-over of an id at a time, until its shard is done with it
    // (also after this bridge stopped waiting for the shard, see
    // `late_answer`): a second one would supersede the first's claim on
    // the shard and take the state from it, unkept, or find nothing there
    // while the first holds the state and hand over an empty session. One
    // whose shard is not done within SHARD_ANSWER (stuck, or its disk
    // stalls) makes this one unavailable too: the session is still here.
    debug!(
        "cluster: node {} asks for {client_id:?} (record revision {})",
        request.from, request.rev
    );
    let waiting = Instant::now();
    while !bridge
        .borrow_mut()
        .ownership
        .handing
        .insert(client_id.clone())
    {
        if waiting.elapsed() >= SHARD_ANSWER {
            debug!("cluster: {client_id:?}: its shard is not done with an earlier hand-over");
            let client = bridge.borrow().client.clone();
            answer_unavailable(&client, reply, &client_id).await;
            return;
        }
        tokio::time::sleep(HANDING_POLL).await;
    }
    // A grant of the id here on its way to its shard (a merge of a move
    // here, or a take-back, appending what its own collector has to the
    // state) goes first, before this hand-over's collector opens: one
    // opened meanwhile would collect those messages too, and the next
    // node would get them twice; and its filters are known once it is
    // granted (`Moving::granted`). Bounded as the wait below.
    while bridge.borrow().ownership.answering.contains_key(&client_id)
        && waiting.elapsed() < SHARD_ANSWER
    {
        tokio::time::sleep(HANDING_POLL).await;
    }
    let (client, queue, shard, owned) = {
        let mut b = bridge.borrow_mut();
        // No longer this node's: its end here must not delete the record.
        let owned = b.owned.remove(&client_id);
        let n = b.to_shards.len().max(1);
        let shard = retained::key(&client_id)
            .bytes()
            .next()
            .map_or(0, usize::from)
            % n;
        (
            b.client.clone(),
            b.to_shards.has(shard).then(|| b.to_shards.clone()),
            shard,
            owned,
        )
    };
    // What NATS brings for the session from here on is collected for its
    // new node (cluster::tail).
    let collecting = match queue {
        Some(_) => tail::collect_for_hand_over(&bridge, &client_id, request.clean).await,
        None => None,
    };
    let (answer, answered) = async_channel::bounded(1);
    let ticket = Ticket::new();
    // Whether the shard is done with the id once the match below ends
    // (not when this bridge gave up waiting: `late_answer` then ends the
    // hand-over).
    let mut shard_done = true;
    let image = match queue {
        Some(to_shards) => {
            let asked = ToShard::Takeover {
                client_id: client_id.clone(),
                clean_session: request.clean,
                answer,
                ticket: ticket.clone(),
            };
            let wait = async {
                // A grant of the id to this node still on its way to the
                // shard goes first: the shard then hands over the state
                // the grant brought, not what it held before.
                while bridge.borrow().ownership.answering.contains_key(&client_id) {
                    tokio::time::sleep(HANDING_POLL).await;
                }
                // In order with the marks before it (cluster::backlog).
                to_shards.control(shard, asked);
                answered.recv().await.ok()
            };
            // A shard bounds its answer below SHARD_ANSWER; one stuck past
            // it (its thread blocked) has not ended the session either, and
            // keeps it if it gets that far later (the ticket): the claim
            // that holds it then is learnt from its late answer.
            match tokio::time::timeout(SHARD_ANSWER, wait).await {
                Ok(Some(answer)) => answer,
                Ok(None) => HandOver::Moved(None),
                Err(_) if ticket.give_up() => {
                    let late =
                        late_answer(bridge.clone(), client_id.clone(), owned, shard, answered);
                    tokio::task::spawn_local(late);
                    shard_done = false;
                    HandOver::Unavailable { token: 0 }
                }
                // The shard answered just now: its answer is in the queue,
                // or about to be (sent right after the ticket moved).
                Err(_) => answered
                    .recv()
                    .await
                    .unwrap_or(HandOver::Unavailable { token: 0 }),
            }
        }
        None => HandOver::Moved(None),
    };
    let image = match image {
        HandOver::Moved(image) => image,
        HandOver::Unavailable { token } => {
            tail::hand_over_ended(&bridge, &client_id, collecting, false);
            {
                let mut b = bridge.borrow_mut();
                if shard_done {
                    b.ownership.handing.remove(&client_id);
                }
                // Still this node's: the session (if any) stays on the
                // shard, as that claim's, under the record this node holds;
                // unless a CONNECT here took the id meanwhile (refused for
                // that, `token` 0), and its grant owns it already.
                if let Some(mut o) = owned {
                    if token != 0 {
                        (o.shard, o.token) = (shard, token);
                    }
                    b.owned.entry(client_id.clone()).or_insert(o);
                }
            }
            answer_unavailable(&client, reply, &client_id).await;
            return;
        }
    };
    let image = kept_or(&bridge, &client_id, &request, image.map(Bytes::from));
    let image = kept_for_racers(&bridge, &client_id, &request, image);
    tail::hand_over_ended(&bridge, &client_id, collecting, image.is_some());
    {
        // Gone from here, though the record names this node until the
        // requester writes it: a claim here meanwhile waits for that.
        let mut b = bridge.borrow_mut();
        b.ownership
            .handed_away
            .handed(&client_id, request.rev, Instant::now());
        b.ownership.handing.remove(&client_id);
    }
    debug!(
        "cluster: {client_id:?} taken over by node {} ({} bytes of state)",
        request.from,
        image.as_ref().map_or(0, Bytes::len)
    );
    let payload = image.unwrap_or_default();
    if let Err(e) = client.publish(reply, payload).await {
        debug!("cluster: take-over answer for {client_id:?} not sent: {e}");
    }
}

/// Answers a take-over request on `reply` that this node cannot end the
/// session of `client_id` in time ([`UNAVAILABLE_HEADER`]).
async fn answer_unavailable(
    client: &async_nats::Client,
    reply: async_nats::Subject,
    client_id: &str,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(UNAVAILABLE_HEADER, "1");
    if let Err(e) = client
        .publish_with_headers(reply, headers, Bytes::new())
        .await
    {
        debug!("cluster: take-over answer for {client_id:?} not sent: {e}");
    }
}

/// The answer of a shard that the bridge gave up waiting for (its ticket
/// says so, so the shard keeps the session): the claim that holds the
/// session on `shard`, which the node's ownership of `client_id` is moved
/// to if it is still the one `owned` from before the request (so that the
/// session's end deletes the record, and its subscriptions are written).
/// The hand-over ends with it (`Tables::handing`): until the shard is
/// done, it may hold the session's state outside its registry, and the
/// next hand-over would find nothing there.
async fn late_answer(
    bridge: Shared,
    client_id: ByteString,
    owned: Option<Owned>,
    shard: usize,
    answered: async_channel::Receiver<HandOver>,
) {
    // Closed: the shard dropped the request (it is gone, or it never got
    // it).
    let answer = answered.recv().await;
    let mut b = bridge.borrow_mut();
    b.ownership.handing.remove(&client_id);
    if let Ok(HandOver::Unavailable { token }) = answer
        && let Some(o) = b.owned.get_mut(&client_id)
        && token != 0
        && Some(*o) == owned
    {
        (o.shard, o.token) = (shard, token);
    }
}

/// The state to answer a take-over request with: what the shard handed
/// (`image`), kept for [`HANDED_TTL`] for other requesters of the same
/// record revision; or, when the shard had nothing (it handed the session
/// to an earlier requester of that revision, whose compare-and-set may
/// lose), what was kept. So whichever racer wins the record has the state.
fn kept_for_racers(
    bridge: &Shared,
    client_id: &ByteString,
    request: &TakeoverRequest,
    image: Option<Bytes>,
) -> Option<Bytes> {
    let now = Instant::now();
    let mut b = bridge.borrow_mut();
    let handed = &mut b.ownership.handed;
    if request.clean || request.rev == 0 {
        return image;
    }
    let Some(image) = image else {
        return handed
            .get(client_id, now)
            .filter(|h| h.revision == request.rev)
            .map(|h| h.image.clone());
    };
    let kept = Kept {
        revision: request.rev,
        image: image.clone(),
        recovered: false,
        at: now,
    };
    handed.keep(client_id.clone(), kept, now);
    Some(image)
}

/// The state to answer a take-over request with, before it is kept for
/// racers: what this node kept for the id ([`Tables::kept`]: a claim of
/// its own got it and gave it to nobody), if the record the requester
/// read is later than the one it was handed for (the record this node's
/// cut-off or late claim wrote, naming it); else `image`, the shard's.
/// Kept, it wins over the shard's: every grant here takes it out, so a
/// session the shard holds beside it is an older copy. Taken either way:
/// the session leaves this node.
fn kept_or(
    bridge: &Shared,
    client_id: &ByteString,
    request: &TakeoverRequest,
    image: Option<Bytes>,
) -> Option<Bytes> {
    let mut b = bridge.borrow_mut();
    match b.ownership.kept.take(client_id, Instant::now()) {
        Some(kept) if !request.clean && (request.rev == 0 || kept.revision < request.rev) => {
            b.status
                .figures
                .cluster_claim_states_given
                .fetch_add(1, Ordering::Relaxed);
            debug!(
                "cluster: {client_id:?} handed to node {} with the state a claim here kept",
                request.from
            );
            Some(kept.image)
        }
        _ => image,
    }
}

/// Ends the session of `client_id` on this node as a take-over (its
/// connection closes, MQTT 5.0 with DISCONNECT 0x8E; its state is
/// dropped): another node owns the id. Its release deletes nothing.
fn drop_here(b: &mut Bridge, client_id: &ByteString, shard: usize) {
    b.owned.remove(client_id);
    b.moving.subscribed(client_id, None);
    b.status
        .figures
        .cluster_reassert_lost
        .fetch_add(1, Ordering::Relaxed);
    let (answer, _) = async_channel::bounded(1);
    let dropped = ToShard::Takeover {
        client_id: client_id.clone(),
        clean_session: true,
        answer,
        // Nobody waits for the answer, and the session is to end anyway.
        ticket: Ticket::new(),
    };
    // Never dropped: a full queue keeps it in its backlog.
    b.to_shards.control(shard, dropped);
}

/// The record of this node for an id, as JSON.
fn record_value(b: &Bridge, clean: bool, at: u64) -> Bytes {
    let record = Record {
        v: 1,
        node: b.node.clone(),
        inc: b.incarnation.clone(),
        clean,
        at,
    };
    Bytes::from(serde_json::to_vec(&record).unwrap_or_default())
}

/// What a re-assertion found.
enum Settled {
    /// Done: the id is this node's, or dropped here.
    Done,
    /// Not now (a KV error, an owner that did not answer): next pass.
    Later,
}

/// Re-asserts the records of this node after the link returns: every id
/// granted without a record (created, or resolved against the node that
/// holds it now), and every id owned before (a record that moved to
/// another node meanwhile ends the session here); and the sessions
/// restored from the store at start-up. One pass per [`REASSERT_EVERY`]
/// while something is left, one KV operation after the other.
async fn reassert_loop(bridge: Shared) {
    let status = bridge.borrow().status.clone();
    let connects = || status.figures.cluster_connects.load(Ordering::Relaxed);
    let mut seen = connects();
    loop {
        tokio::time::sleep(REASSERT_EVERY).await;
        if !status.link_up() {
            continue;
        }
        if connects() != seen {
            seen = connects();
            let mut b = bridge.borrow_mut();
            let owned: Vec<_> = b.owned.iter().map(|(id, o)| (id.clone(), *o)).collect();
            b.ownership.to_check.extend(owned);
        }
        let (checks, grants): (Vec<_>, Vec<_>) = {
            let b = bridge.borrow();
            (
                b.ownership
                    .to_check
                    .iter()
                    .map(|(id, o)| (id.clone(), *o))
                    .collect(),
                b.ownership
                    .unregistered
                    .iter()
                    .map(|(id, u)| (id.clone(), u.clone()))
                    .collect(),
            )
        };
        let restored = std::mem::take(&mut bridge.borrow_mut().ownership.restored);
        for r in restored {
            if let Settled::Later = reassert_restored(&bridge, &r).await {
                bridge.borrow_mut().ownership.restored.push(r);
            }
        }
        for (client_id, grant) in grants {
            if let Settled::Done = reassert_grant(&bridge, &client_id, &grant).await {
                let mut b = bridge.borrow_mut();
                if b.ownership
                    .unregistered
                    .get(&client_id)
                    .is_some_and(|u| u.token == grant.token && u.shard == grant.shard)
                {
                    b.ownership.unregistered.remove(&client_id);
                }
            }
        }
        // Last: there may be many, and duplicates of the ids above come
        // first.
        for (client_id, owned) in checks {
            if let Settled::Done = check_owned(&bridge, &client_id, owned).await {
                bridge.borrow_mut().ownership.to_check.remove(&client_id);
            }
        }
    }
}

/// An id this node owned before the outage: still its record, or the
/// session here ends (another node took the id over meanwhile).
async fn check_owned(bridge: &Shared, client_id: &ByteString, owned: Owned) -> Settled {
    let Some(store) = bridge.borrow().sessions.clone() else {
        return Settled::Later;
    };
    let entry = match leader_entry(&store, &key(client_id)).await {
        Ok(entry) => entry,
        Err(e) => {
            debug!("cluster: record of {client_id:?} not checked: {e}");
            return Settled::Later;
        }
    };
    let mut b = bridge.borrow_mut();
    if b.owned.get(client_id) != Some(&owned) {
        // Released or claimed again meanwhile.
        return Settled::Done;
    }
    let Some(entry) = entry.filter(|e| e.operation == Operation::Put) else {
        return Settled::Done;
    };
    if entry.revision == owned.revision {
        return Settled::Done;
    }
    let holder = serde_json::from_slice::<Record>(&entry.value).ok();
    if holder.is_some_and(|r| r.node == b.node && r.inc == b.incarnation) {
        return Settled::Done;
    }
    info!(
        "cluster: {client_id:?} was taken over by another node while the link was down: closed here"
    );
    drop_here(&mut b, client_id, owned.shard);
    Settled::Done
}

/// An id granted without a record while the link was down: created; or,
/// if another node holds it now, the later grant of the two wins (ties:
/// the greater node name): this node takes the record over, or ends its
/// own session of the id as a take-over.
async fn reassert_grant(bridge: &Shared, client_id: &ByteString, grant: &Unregistered) -> Settled {
    let (store, client, root, node, value, timeout) = {
        let b = bridge.borrow();
        let Some(store) = b.sessions.clone() else {
            return Settled::Later;
        };
        (
            store,
            b.client.clone(),
            b.root.clone(),
            b.node.clone(),
            record_value(&b, grant.clean, grant.at),
            b.takeover_timeout,
        )
    };
    let key = key(client_id);
    let revision = match store.create(&key, value.clone()).await {
        Ok(revision) => revision,
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
            let entry = match leader_entry(&store, &key).await {
                Ok(Some(entry)) => entry,
                Ok(None) => return Settled::Later,
                Err(e) => {
                    debug!("cluster: record of {client_id:?} unreadable: {e}");
                    return Settled::Later;
                }
            };
            let holder = match entry.operation {
                Operation::Put => serde_json::from_slice::<Record>(&entry.value).ok(),
                Operation::Delete | Operation::Purge => None,
            };
            if let Some(holder) = holder.filter(|h| h.node != node) {
                if (holder.at, holder.node.as_str()) > (grant.at, node.as_str()) {
                    info!(
                        "cluster: {client_id:?} was connected on node {} later: closed here",
                        holder.node
                    );
                    drop_here(&mut bridge.borrow_mut(), client_id, grant.shard);
                    return Settled::Done;
                }
                let asked = ask(
                    &client,
                    &root,
                    &holder.node,
                    (client_id, true, entry.revision),
                    &node,
                    timeout,
                );
                if let Asked::Silent = asked.await
                    && alive(bridge, &holder.node)
                {
                    return Settled::Later;
                }
            }
            match store.update(&key, value, entry.revision).await {
                Ok(revision) => revision,
                Err(e) => {
                    debug!("cluster: record of {client_id:?} moved ({e}): next pass");
                    return Settled::Later;
                }
            }
        }
        Err(e) => {
            debug!("cluster: record of {client_id:?} not created: {e}");
            return Settled::Later;
        }
    };
    let mut b = bridge.borrow_mut();
    b.status
        .figures
        .cluster_reasserted
        .fetch_add(1, Ordering::Relaxed);
    let owned = Owned {
        shard: grant.shard,
        token: grant.token,
        revision,
    };
    b.owned.insert(client_id.clone(), owned);
    let image = b
        .ownership
        .unregistered
        .get(client_id)
        .and_then(|u| u.image.clone());
    if !grant.clean {
        write_record(&b, client_id, revision, image.as_ref());
    }
    Settled::Done
}

/// A persistent session restored from the store at start-up (claim
/// `(shard, token)`), queued for the next re-assertion pass: its record is
/// created if absent and taken back from an earlier run of this node; if
/// another node holds it, the client went there while this node was down:
/// the copy here is stale and dropped.
pub(super) fn restored(
    bridge: &Shared,
    client_id: ByteString,
    shard: usize,
    token: u64,
    image: Option<Bytes>,
) {
    bridge.borrow_mut().ownership.restored.push(Restored {
        client_id,
        shard,
        token,
        image,
    });
}

/// One try at re-asserting a restored session's record.
async fn reassert_restored(bridge: &Shared, r: &Restored) -> Settled {
    let Some(store) = bridge.borrow().sessions.clone() else {
        return Settled::Later;
    };
    if bridge.borrow().owned.contains_key(&r.client_id) {
        // A CONNECT here claimed it first.
        return Settled::Done;
    }
    let key = key(&r.client_id);
    let value = record_value(&bridge.borrow(), false, unix_ms_now());
    let written = match store.create(&key, value.clone()).await {
        Ok(revision) => Ok(revision),
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
            match leader_entry(&store, &key).await {
                Ok(Some(entry)) => {
                    let holder = match entry.operation {
                        Operation::Put => serde_json::from_slice::<Record>(&entry.value).ok(),
                        Operation::Delete | Operation::Purge => None,
                    };
                    let me = bridge.borrow().node.clone();
                    match holder {
                        Some(h) if h.node != me => {
                            info!(
                                "cluster: restored session {:?} is node {}'s now: dropped here",
                                r.client_id, h.node
                            );
                            drop_here(&mut bridge.borrow_mut(), &r.client_id, r.shard);
                            return Settled::Done;
                        }
                        _ => store
                            .update(&key, value, entry.revision)
                            .await
                            .map_err(|e| e.to_string()),
                    }
                }
                Ok(None) => Err("deleted meanwhile".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(e) => Err(e.to_string()),
    };
    let revision = match written {
        Ok(revision) => revision,
        Err(e) => {
            debug!(
                "cluster: restored session {:?} not re-asserted yet: {e}",
                r.client_id
            );
            return Settled::Later;
        }
    };
    let mut b = bridge.borrow_mut();
    if b.owned.contains_key(&r.client_id) {
        return Settled::Done;
    }
    let owned = Owned {
        shard: r.shard,
        token: r.token,
        revision,
    };
    b.owned.insert(r.client_id.clone(), owned);
    write_record(&b, &r.client_id, revision, r.image.as_ref());
    b.status
        .figures
        .cluster_reasserted
        .fetch_add(1, Ordering::Relaxed);
    Settled::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim's calls end at its deadline, not each after a timeout of its
    /// own: one that does not come back yields None there, one that comes
    /// back first its value; the pause between tries ends at the deadline.
    #[test]
    fn a_claims_calls_and_pauses_are_cut_off_at_its_deadline() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let start = Instant::now();
            let deadline = start + Duration::from_millis(50);
            let never = std::future::pending::<()>();
            assert_eq!(by(deadline, never).await, None);
            let cut = start.elapsed();
            assert!(cut >= Duration::from_millis(50), "{cut:?}");
            assert!(cut < RETRY, "cut at the deadline: {cut:?}");
            let later = Instant::now() + Duration::from_secs(60);
            assert_eq!(by(later, async { 7 }).await, Some(7));
            // A pause near the deadline is cut short.
            let start = Instant::now();
            pause(start + Duration::from_millis(20)).await;
            assert!(start.elapsed() < RETRY, "{:?}", start.elapsed());
        });
    }

    /// Of one id's claims being decided, only the last received is the
    /// newest, also once it is decided while an older one is not (the
    /// older one's late grant must not take the ownership); an id's entry
    /// goes with its last claim, and other ids are apart.
    #[test]
    fn only_the_last_claim_of_an_id_received_is_its_newest() {
        let mut claiming = Claiming::default();
        let (a, b) = (ByteString::from("a"), ByteString::from("b"));
        let older = claiming.received(&a);
        assert!(claiming.newest(&a, older));
        let newer = claiming.received(&a);
        let other = claiming.received(&b);
        assert!(!claiming.newest(&a, older));
        assert!(claiming.newest(&a, newer) && claiming.newest(&b, other));
        claiming.decided(&a);
        assert!(
            !claiming.newest(&a, older),
            "the newer one was decided first"
        );
        claiming.decided(&a);
        assert!(!claiming.ids.contains_key("a"), "nothing left for a");
        assert!(claiming.newest(&b, other));
        claiming.decided(&b);
        assert!(claiming.ids.is_empty());
        // A claim decided with no entry (never counted) changes nothing.
        claiming.decided(&a);
        assert!(claiming.ids.is_empty());
    }

    /// The state a superseded claim got (its write landed first) is kept
    /// for the newest claim of the id, whose grant takes it; unless a
    /// claim later than the superseded one took the ownership already
    /// (its session is newer): then neither its grant nor its refusal
    /// keeps it, also once a still later claim is received. The newest
    /// refused keeps what it got for the id's next claim.
    #[test]
    fn a_superseded_claims_state_goes_to_the_newest_unless_a_later_one_owns_the_id() {
        let mut tables = Tables::default();
        let a = ByteString::from("a");
        let now = Instant::now();
        let state = Kept {
            revision: 4,
            image: Bytes::from_static(b"queued"),
            recovered: false,
            at: now,
        };
        let older = tables.claiming.received(&a);
        let newer = tables.claiming.received(&a);
        assert_eq!(
            tables.granting(&a, older, Some(&state), now),
            Granting::Superseded(true)
        );
        assert_eq!(
            tables.granting(&a, newer, None, now),
            Granting::Newest(Some(state.clone())),
            "the newest takes it"
        );
        assert!(tables.kept.get("a", now).is_none());
        tables.claiming.decided(&a);
        tables.claiming.decided(&a);

        // The newest granted first, without the state.
        let older = tables.claiming.received(&a);
        let newer = tables.claiming.received(&a);
        assert_eq!(
            tables.granting(&a, newer, None, now),
            Granting::Newest(None)
        );
        tables.claiming.decided(&a);
        assert_eq!(
            tables.granting(&a, older, Some(&state), now),
            Granting::Superseded(false)
        );
        assert!(!tables.keep_for_later(&a, older, Some(&state), now));
        let latest = tables.claiming.received(&a);
        assert!(
            !tables.keep_for_later(&a, older, Some(&state), now),
            "still older than the session granted"
        );
        assert!(tables.kept.get("a", now).is_none());
        tables.claiming.decided(&a);
        // The newest refused: kept for the next claim, which takes it.
        assert!(tables.keep_for_later(&a, latest, Some(&state), now));
        tables.claiming.decided(&a);
        assert!(tables.claiming.ids.is_empty());
        let next = tables.claiming.received(&a);
        assert_eq!(
            tables.granting(&a, next, None, now),
            Granting::Newest(Some(state))
        );
        // Nothing to keep.
        assert!(!tables.keep_for_later(&a, next, None, now));
    }

    /// A state sent to a claim is waited for by the id's other claims
    /// until that claim's shard settles it, or SHARD_ANSWER passes; a
    /// settle of another claim changes nothing; other ids are apart.
    #[test]
    fn a_state_sent_to_a_claim_is_waited_for_until_settled_or_too_old() {
        let mut sent = Sent::default();
        let (a, b) = (ByteString::from("a"), ByteString::from("b"));
        let now = Instant::now();
        sent.sent(&a, (0, 9), now);
        assert!(sent.settling("a", (1, 4), now), "another claim waits");
        assert!(!sent.settling("a", (0, 9), now), "not the claim itself");
        assert!(!sent.settling("b", (1, 4), now));
        sent.settled("a", (1, 4));
        assert!(sent.settling("a", (1, 4), now), "not that claim's");
        sent.settled("a", (0, 9));
        assert!(!sent.settling("a", (1, 4), now));
        sent.sent(&a, (0, 10), now);
        assert!(!sent.settling("a", (1, 4), now + SHARD_ANSWER), "too old");
        // An old one goes when another is sent.
        sent.sent(&b, (0, 11), now + SHARD_ANSWER);
        assert!(!sent.ids.contains_key("a"));
        assert!(sent.settling("b", (1, 4), now + SHARD_ANSWER));
    }

    /// A claim that finds the record naming this node right after this
    /// node handed the id's session to another node waits for the record
    /// to move (the requester's compare-and-set) for HANDED_SETTLE, then
    /// writes the record itself with the copy of that revision; past
    /// HANDED_TTL (or once a claim here wrote the record) nothing was
    /// handed: granted as this node's, as before. A later hand-over of
    /// the id starts anew; other ids are apart, and old entries go.
    #[test]
    fn a_claim_finding_the_record_of_a_session_handed_away_waits_then_reclaims() {
        let mut away = HandedAway::default();
        let (a, b) = (ByteString::from("a"), ByteString::from("b"));
        let now = Instant::now();
        assert_eq!(away.on_record("a", now), Handed::No);
        away.handed(&a, 7, now);
        assert_eq!(away.on_record("a", now), Handed::Settling);
        assert_eq!(away.on_record("b", now), Handed::No, "another id");
        let settled = now + HANDED_SETTLE;
        assert_eq!(away.on_record("a", settled), Handed::Reclaim(7));
        assert_eq!(away.on_record("a", now + HANDED_TTL), Handed::No);
        // A claim here wrote the record: settled.
        away.written("a");
        assert_eq!(away.on_record("a", now), Handed::No);
        // Handed again later: a new wait, for the new revision.
        away.handed(&a, 9, settled);
        assert_eq!(away.on_record("a", settled), Handed::Settling);
        assert_eq!(
            away.on_record("a", settled + HANDED_SETTLE),
            Handed::Reclaim(9)
        );
        // Entries past HANDED_TTL go when another is added.
        away.handed(&b, 3, settled + HANDED_TTL);
        assert!(!away.ids.contains_key("a"));
        assert_eq!(away.on_record("b", settled + HANDED_TTL), Handed::Settling);
    }

    #[test]
    fn records_and_requests_read_back_and_keys_are_valid() {
        let record = Record {
            v: 1,
            node: "a".into(),
            inc: "0123456789abcdef".into(),
            clean: false,
            at: 5,
        };
        let text = serde_json::to_vec(&record).unwrap();
        assert_eq!(
            std::str::from_utf8(&text).unwrap(),
            r#"{"v":1,"node":"a","inc":"0123456789abcdef","clean":false,"at":5}"#
        );
        assert_eq!(serde_json::from_slice::<Record>(&text).unwrap(), record);
        for id in ["", "x", "a.b c/#", &"é".repeat(100)] {
            let k = key(id);
            assert_eq!(k.len(), 43);
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
        }
        assert_eq!(takeover_subject("fanmq", "n1"), "fanmq.c.n1.takeover");
        assert_eq!(bucket("fanmq"), "fanmq_sessions");
        assert_eq!(subscriptions_bucket("fanmq"), "fanmq_session_subs");
        // A request of a node without `rev` still reads (revision 0: the
        // state it gets is not kept for racers).
        let old: TakeoverRequest =
            serde_json::from_str(r#"{"id":"x","clean":false,"from":"b"}"#).unwrap();
        assert_eq!(old.rev, 0);
    }
}
