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

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{CreateErrorKind, Operation};
use async_nats::{RequestErrorKind, client::RequestError};
use bytes::Bytes;
use bytestring::ByteString;
use futures_lite::StreamExt;
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::cluster::bridge::{Shared, open_bucket};
use crate::cluster::link::{ClaimAnswer, ClaimRequest, ToShard};
use crate::cluster::retained;
use crate::config::cluster::PartitionMode;

/// Longest the bridge works on one claim before it answers
/// [`ClaimAnswer::Unavailable`]: below the 10 s a CONNECT waits for its
/// claim, so the answer arrives before the connection gives up.
pub const CLAIM_DEADLINE: Duration = Duration::from_secs(8);
/// Pause before another try after a KV error or an owner that did not
/// answer (it may be a moment from answering, or from being declared dead).
const RETRY: Duration = Duration::from_millis(200);
/// Largest record value: a node name (64 bytes), an incarnation and a few
/// fields in JSON; refused by the bucket if larger.
const MAX_RECORD_SIZE: usize = 512;
/// Longest an owner's shard takes to hand a session over before the owner
/// answers without state (the shard is stuck).
const SHARD_ANSWER: Duration = Duration::from_secs(2);

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

/// Opens (or creates) the sessions bucket, retrying until it is there.
pub(super) async fn sessions_loop(bridge: Shared, replicas: usize) {
    let (client, root, status) = {
        let b = bridge.borrow();
        (b.client.clone(), b.root.clone(), b.status.clone())
    };
    let name = bucket(&root);
    let store = open_bucket(&client, &status, &name, replicas, MAX_RECORD_SIZE).await;
    info!("cluster: session ownership in bucket {name}");
    bridge.borrow_mut().sessions = Some(store);
}

/// How an owning node answered a take-over request.
enum Asked {
    /// It answered: the session image (empty: nothing to move).
    State(Bytes),
    /// Nobody serves its subject: the node is gone.
    Gone,
    /// No answer in time.
    Silent,
}

/// Decides a claim and answers it.
pub(super) async fn claim(bridge: Shared, request: ClaimRequest) {
    let answer = decide(&bridge, &request).await;
    let status = bridge.borrow().status.clone();
    let f = &status.figures;
    match &answer {
        ClaimAnswer::Granted(_) => f.cluster_claims.fetch_add(1, Ordering::Relaxed),
        ClaimAnswer::Unavailable => f.cluster_claims_unavailable.fetch_add(1, Ordering::Relaxed),
    };
    // The connection may have gone meanwhile; its claim then ends on the
    // shard.
    let _ = request.answer.try_send(answer);
}

/// Works out who owns the id now, taking it over where needed.
async fn decide(bridge: &Shared, request: &ClaimRequest) -> ClaimAnswer {
    let deadline = Instant::now() + CLAIM_DEADLINE;
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
                        ClaimAnswer::Granted(None)
                    }
                    PartitionMode::Fence => ClaimAnswer::Unavailable,
                };
            }
            _ if Instant::now() > deadline => return ClaimAnswer::Unavailable,
            _ => tokio::time::sleep(RETRY).await,
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
    // The state a previous owner sent (kept if a later compare-and-set
    // fails and the record is read again).
    let mut state: Option<Bytes> = None;
    loop {
        if Instant::now() > deadline {
            return ClaimAnswer::Unavailable;
        }
        match store.create(&key, value.clone()).await {
            Ok(revision) => {
                own(bridge, request, revision);
                return ClaimAnswer::Granted(state);
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                kv_error(&e);
                tokio::time::sleep(RETRY).await;
                continue;
            }
        }
        let entry = match store.entry(&key).await {
            Ok(Some(entry)) => entry,
            // Deleted between the two calls: create again.
            Ok(None) => continue,
            Err(e) => {
                kv_error(&e);
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let owner = match entry.operation {
            Operation::Delete | Operation::Purge => None,
            Operation::Put => serde_json::from_slice::<Record>(&entry.value).ok(),
        };
        let mut took_over = false;
        if let Some(owner) = owner {
            if owner.node == node && owner.inc == incarnation {
                // Already this node's (a reconnect here, or a take-over
                // between this node's shards).
                own(bridge, request, entry.revision);
                return ClaimAnswer::Granted(state);
            }
            // Another node, or an earlier run of this one (whose state is
            // gone, or restored here from its store).
            if owner.node != node {
                match ask(&client, &root, &owner.node, request, &node, timeout).await {
                    Asked::State(image) => {
                        took_over = true;
                        if !image.is_empty() {
                            state = Some(image);
                        }
                    }
                    Asked::Gone => {
                        debug!(
                            "cluster: node {} is gone: {:?} taken fresh",
                            owner.node, request.client_id
                        );
                    }
                    Asked::Silent => {
                        if alive(bridge, &owner.node) {
                            tokio::time::sleep(RETRY).await;
                            continue;
                        }
                        debug!(
                            "cluster: node {} not heard for the node timeout: {:?} taken fresh",
                            owner.node, request.client_id
                        );
                    }
                }
            }
        }
        match store.update(&key, value.clone(), entry.revision).await {
            Ok(revision) => {
                own(bridge, request, revision);
                if took_over {
                    status
                        .figures
                        .cluster_takeovers
                        .fetch_add(1, Ordering::Relaxed);
                }
                return ClaimAnswer::Granted(state);
            }
            // The record moved meanwhile: read it again.
            Err(e) => debug!(
                "cluster: record of {:?} moved ({e}), reading it again",
                request.client_id
            ),
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

/// Records that the claim of `request` owns its id at `revision`.
fn own(bridge: &Shared, request: &ClaimRequest, revision: u64) {
    bridge.borrow_mut().owned.insert(
        request.client_id.clone(),
        Owned {
            shard: request.shard,
            token: request.token,
            revision,
        },
    );
}

/// Asks node `owner` to hand the session of the request's id over.
async fn ask(
    client: &async_nats::Client,
    root: &str,
    owner: &str,
    request: &ClaimRequest,
    me: &str,
    timeout: Duration,
) -> Asked {
    let body = TakeoverRequest {
        id: request.client_id.to_string(),
        clean: request.clean_session,
        from: me.to_string(),
    };
    let payload = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let asked = client.request(takeover_subject(root, owner), payload);
    match tokio::time::timeout(timeout, asked).await {
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
        let owned = match b.owned.get(&client_id) {
            Some(o) if o.shard == shard && o.token == token => b.owned.remove(&client_id),
            _ => None,
        };
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
    let client_id = ByteString::from(request.id);
    let (client, queue) = {
        let mut b = bridge.borrow_mut();
        // No longer this node's: its end here must not delete the record.
        b.owned.remove(&client_id);
        let n = b.to_shards.len().max(1);
        let shard = retained::key(&client_id)
            .bytes()
            .next()
            .map_or(0, usize::from)
            % n;
        (b.client.clone(), b.to_shards.get(shard).cloned())
    };
    let (answer, answered) = async_channel::bounded(1);
    let image = match queue {
        Some(queue) => {
            let asked = ToShard::Takeover {
                client_id: client_id.clone(),
                clean_session: request.clean,
                answer,
            };
            let wait = async {
                queue.send(asked).await.ok()?;
                answered.recv().await.ok().flatten()
            };
            tokio::time::timeout(SHARD_ANSWER, wait)
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    debug!(
        "cluster: {client_id:?} taken over by node {} ({} bytes of state)",
        request.from,
        image.as_ref().map_or(0, Vec::len)
    );
    let payload = image.map(Bytes::from).unwrap_or_default();
    if let Err(e) = client.publish(reply, payload).await {
        debug!("cluster: take-over answer for {client_id:?} not sent: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
