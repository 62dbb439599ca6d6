//! Client ids across shards: home shards, claims and take-over
//! (docs/ARCHITECTURE.md, "Client ids and take-over across shards").
//!
//! Every client id has a *home shard* (a hash of the id modulo the number of
//! shards) that knows which shard holds its session, live or offline. A CONNECT
//! on shard A *claims* the id at its home; the home records A (unless A is the
//! home itself: its own sessions and claims say so, and a record would cost
//! ~90 bytes per client) and, if the session lives on shard B, tells B to
//! *evict* it: B closes the old connection (take-over, §3.1.4) and hands the
//! session state straight to A, which resumes it. The home shard serialises claims for an id, so two
//! simultaneous CONNECTs end with exactly one winner: the later claim evicts
//! the earlier one, even if that one has not finished connecting yet.
//!
//! # The owner is a claim, not a shard
//!
//! The home records the *claim* that owns the id (its shard and token), and
//! an eviction names that claim. Messages from the home to a shard and from
//! that shard's connections to the home travel on different channels, so an
//! eviction meant for an older claim can reach a shard after a newer claim
//! for the same id was made there; evicting "whatever holds the id" there
//! took the newer one (two claims superseding each other: no CONNACK, or two
//! sessions). The owning claim stays the owner through every stage: waiting
//! for its answer, answered but not yet attached by its connection task, and
//! attached as a session ([`Session::claim`]); a release names it too, so a
//! late release cannot forget a newer owner on the same shard.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytestring::ByteString;
use log::debug;

use crate::cluster::link::{ClaimAnswer, Withdrawn};
use crate::cluster::ownership::CLAIM_DEADLINE;
use crate::cluster::positions::Seen;
use crate::mesh::ShardMsg;
use crate::observe::counters::Counters;
use crate::protocol::message::Message;
use crate::protocol::v3::QoS;
use crate::session::link::CloseReason;
use crate::session::{Delivery, Limits, Session, SessionState};
use crate::shard::cluster::{copy_qos, decode_image};
use crate::shard::lend::ClaimLend;
use crate::shard::{Ctx, Shard};

/// How long a CONNECT waits for its whole claim to be answered, by the
/// node's shards and in a cluster by the bridge (one deadline for both),
/// before it is refused as server unavailable (the other shards are stuck
/// or shutting down, or the cluster did not answer).
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// Most claims of a shard whose connection stopped waiting for the
/// cluster's answer that the shard remembers until that answer comes
/// ([`Registry::given_up`]); beyond it the oldest is released in the
/// cluster at once (its answer, if it comes, is then dropped).
const MAX_GIVEN_UP: usize = 1024;

/// Longest a connection whose claim took its session from a shard of this
/// cluster node waits, after the node's and the cluster's answers, for the
/// bridge's lend of each of the session's filters (`ToShard::Lent`,
/// shard::lend) before it attaches anyway (logged: it may miss what only
/// the lend brings). The lend follows the old shard's message in the
/// bridge's queue: it comes within milliseconds unless the bridge is
/// stuck.
const LEND_WAIT: Duration = Duration::from_secs(2);

// The bridge answers a claim by its deadline, `CLAIM_DEADLINE` after the
// claim started, so the answer arrives while the connection still waits.
const _: () = assert!(CLAIM_DEADLINE.as_millis() < CLAIM_TIMEOUT.as_millis());

/// Errors of a claim.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// A later CONNECT with the same client id won while this one waited.
    #[error("a newer connection took over the client id")]
    Superseded,
    /// No answer in time: CONNACK 0x03 Server unavailable.
    #[error("no answer from the client id's home shard in time")]
    TimedOut,
    /// The cluster could not say who owns the id (the owning node did not
    /// answer, JetStream is unreachable, or the node is fenced): CONNACK
    /// 0x03 Server unavailable.
    #[error("the cluster could not grant the client id in time")]
    ClusterUnavailable,
}

/// The outcome of a claim, once answered.
#[derive(Debug)]
enum Outcome {
    /// Granted, with the session state to resume if there is one.
    Granted(Option<SessionState>),
    /// A later claim for the same id won.
    Superseded,
}

/// The claim that holds a client id: the shard it was made on and its token
/// there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    /// The shard of the claim.
    shard: usize,
    /// The claim's token on that shard.
    token: u64,
}

/// A claim made by a connection on this shard, waiting for its answer.
#[derive(Debug)]
struct PendingClaim {
    /// The client id claimed.
    client_id: ByteString,
    /// The answer, once it came.
    outcome: Option<Outcome>,
    /// The connection task to wake when it comes.
    waker: Option<Waker>,
    /// A later claim that must receive this one's state when it arrives:
    /// (shard, token, its CleanSession flag).
    superseded_by: Option<(usize, u64, bool)>,
    /// The connection stopped waiting (timed out or went away); the answer,
    /// when it comes, is kept as an offline session or released instead.
    abandoned: bool,
    /// In a cluster, once the node's answer came: the cluster's answer,
    /// once it came (`Shard::cluster_claim_answered`). Granted, the claim
    /// is *attaching*: `outcome` holds the state its connection attaches,
    /// which a take-over before that gets instead, and which messages for
    /// the session meanwhile are queued in.
    cluster: Option<ClusterAnswer>,
    /// In a cluster, once the claim asked the bridge: set when a later
    /// claim supersedes it, so that the bridge stops deciding it (its
    /// connection will attach nothing).
    withdrawn: Option<Withdrawn>,
    /// Made for another node's take-over (`claim_on_node_within`'s
    /// `away`): the state it gets leaves the node, and what the node
    /// routed beyond it goes in the bridge's tail (cluster::positions), so
    /// it catches up nothing and is never attaching. Every other claim's
    /// state comes from a shard of this node (a move inside the node:
    /// between shards, or on one), which only its catch-up and attaching
    /// keep whole.
    away: bool,
    /// A move inside a cluster node: what the bridge's lend of the
    /// session's filters brought for this claim (shard::lend).
    lend: Option<ClaimLend>,
}

/// What the cluster answered a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClusterAnswer {
    /// The id is this node's (`ClaimAnswer::Granted`, `Recovered`).
    Granted,
    /// No decision (`ClaimAnswer::Unavailable`).
    Unavailable,
}

/// A claim whose connection stopped waiting before the cluster answered.
#[derive(Debug)]
struct GivenUp {
    /// The claim's token.
    token: u64,
    /// Its client id.
    client_id: ByteString,
    /// Whether a later claim of the id on this node superseded it (it
    /// holds no session, and the later claim's grant settles the record:
    /// a grant without a state releases nothing).
    superseded: bool,
}

/// This shard's part of the client-id registry.
#[derive(Debug, Default)]
pub struct Registry {
    /// For client ids homed here and held by *another* shard: the claim
    /// that holds it there. An id held here has no entry: this shard's own
    /// sessions ([`Shard::session_key`]) and claims say where it is (they
    /// are made here in the order the home sees them). An entry is a clone
    /// of the id (32 bytes) and the owner (16), at 2.2 buckets per entry
    /// when the table has just doubled: about 105 bytes per client. With one
    /// shard the table stays empty; with N shards it holds the (N-1)/N of
    /// the ids homed here that live elsewhere.
    homes: AHashMap<ByteString, Owner>,
    /// Claims of this shard's connections waiting for an answer, by token.
    claims: AHashMap<u64, PendingClaim>,
    /// Claims granted with a session state that their connections have
    /// not attached yet (by the cluster; outside one, by the node: a
    /// take-over, from another shard or this one), whose states keep what
    /// this shard routes meanwhile (the claim may have gone since: pruned
    /// when read). Empty but for an instant around a take-over: one test
    /// per routed message.
    attaching: Vec<u64>,
    /// Claims whose connection stopped waiting for the cluster's answer
    /// ([`CLAIM_TIMEOUT`]), oldest first: the answer,
    /// if it comes, hands the state it brought back to the bridge or
    /// releases the record (`Shard::cluster_claim_answered`). At most
    /// [`MAX_GIVEN_UP`]; empty unless the bridge is late.
    given_up: VecDeque<GivenUp>,
    /// Claims with a lend begun before their state came, which keep the
    /// lent filters' batches as they come (`Shard::took_from_cluster`;
    /// pruned when read). Empty but for an instant around a move inside a
    /// cluster node: one test per batch from NATS.
    lending: Vec<u64>,
    /// Next claim token.
    next_token: u64,
}

impl Registry {
    /// Number of client ids homed on this shard and held by another shard.
    #[cfg(test)]
    pub fn homed_elsewhere(&self) -> usize {
        self.homes.len()
    }
}

/// The home shard of a client id: FNV-1a of its bytes modulo the shard count
/// (a fixed function, so every shard computes the same home).
pub fn home_shard(client_id: &str, nr_shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % nr_shards.max(1) as u64) as usize
}

/// Claims `client_id` for a new connection on this shard and waits for the
/// answer: the claim's token (the session's [`Session::claim`]) and the
/// previous session's state to resume (None: start fresh). In a cluster,
/// once the id is this claim's on the node, the cluster is asked too
/// (docs/design/cluster.md §9): another node holding the id hands its
/// state over, which then replaces any state held here.
///
/// One deadline, [`CLAIM_TIMEOUT`] from now, covers the node's answer and
/// the cluster's: the bridge is asked to answer by [`CLAIM_DEADLINE`] from
/// now (its KV calls and its wait on another node cut off there), so its
/// answer, "unavailable" at worst, comes before the connection gives up.
///
/// # Errors
/// [`RegistryError::Superseded`] when a later connection took the id first,
/// [`RegistryError::TimedOut`] when the node did not answer in
/// [`CLAIM_TIMEOUT`], [`RegistryError::ClusterUnavailable`] when the
/// cluster could not decide, or did not answer by then.
pub async fn claim(
    ctx: &Ctx,
    client_id: ByteString,
    clean_session: bool,
) -> Result<(u64, Option<SessionState>), RegistryError> {
    let started = Instant::now();
    let in_cluster = ctx.shard.borrow().cluster.is_some();
    let token = claim_on_node(ctx, client_id.clone(), clean_session).await?;
    // A claim superseded before its connection task ran asks the cluster
    // nothing: the bridge takes the last claim of an id it receives for
    // the node's newest (`cluster::ownership`), so only a claim that holds
    // the id on the node may ask.
    if !in_cluster || superseded(&ctx.shard.borrow(), token) {
        return match take_outcome(&mut ctx.shard.borrow_mut(), token) {
            Outcome::Granted(state) => Ok((token, state)),
            Outcome::Superseded => Err(RegistryError::Superseded),
        };
    }
    // The claim stays pending on the node while the cluster decides, and
    // until its connection attaches it: a take-over meanwhile (a local
    // CONNECT, or another node's request) supersedes it as it would any
    // waiting claim. The bridge's answer is applied to it in the order of
    // the shard's queue (`Shard::cluster_claim_answered`), so what the
    // bridge sends after the grant finds it granted, with its state.
    let withdrawn = Withdrawn::new();
    let asked = match &ctx.shard.borrow().cluster {
        Some(link) => link.claim(
            &client_id,
            clean_session,
            (token, &withdrawn),
            started + CLAIM_DEADLINE,
        ),
        None => return Err(RegistryError::ClusterUnavailable),
    };
    if let Some(claim) = ctx.shard.borrow_mut().registry.claims.get_mut(&token) {
        claim.withdrawn = Some(withdrawn);
    }
    let answered = if asked {
        let wait = poll_fn(|cx| {
            let mut shard = ctx.shard.borrow_mut();
            match shard.registry.claims.get_mut(&token) {
                Some(claim)
                    if claim.cluster.is_none()
                        && !matches!(claim.outcome, Some(Outcome::Superseded)) =>
                {
                    claim.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        });
        let left = (started + CLAIM_TIMEOUT).saturating_duration_since(Instant::now());
        glommio::timer::timeout(left, async {
            wait.await;
            Ok(())
        })
        .await
        .is_ok()
    } else {
        // The bridge thread is gone (it could not start): the node serves
        // its local clients only, as with the link down.
        true
    };
    if asked && answered {
        wait_for_lend(ctx, token).await;
    }
    let mut shard = ctx.shard.borrow_mut();
    let cluster = shard.registry.claims.get(&token).and_then(|c| c.cluster);
    let granted = !asked || (answered && cluster == Some(ClusterAnswer::Granted));
    let state = match take_outcome(&mut shard, token) {
        Outcome::Granted(state) => state,
        Outcome::Superseded => {
            if asked && cluster.is_none() {
                // A later CONNECT here took the id while the cluster
                // decided: a state this claim's grant brings is the later
                // claim's (`Shard::late_cluster_answer`).
                shard.await_late_answer(client_id, token, true);
            }
            return Err(RegistryError::Superseded);
        }
    };
    if !granted {
        if asked && !answered {
            // The cluster's answer may still come.
            shard.cluster_gave_up(client_id, token, state);
        } else {
            // Keep what was held here, as for a claim nobody waits for.
            shard.keep_or_release(client_id, token, state);
        }
        return Err(RegistryError::ClusterUnavailable);
    }
    Ok((token, state.filter(|_| !clean_session)))
}

/// Waits until the claim `token`, granted with a state that a shard of this
/// node let go, has the bridge's lend of each of the session's plain
/// filters (shard::lend), at most [`LEND_WAIT`]: attached before, the
/// session would miss what the old shard got after it had gone, which only
/// the lend brings. Nothing to wait for without such a state.
async fn wait_for_lend(ctx: &Ctx, token: u64) {
    let wait = poll_fn(|cx| {
        let mut shard = ctx.shard.borrow_mut();
        match shard.registry.claims.get_mut(&token) {
            Some(PendingClaim {
                outcome: Some(Outcome::Granted(Some(state))),
                lend: Some(lend),
                waker,
                ..
            }) if lend.waits(state) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    });
    if glommio::timer::timeout(LEND_WAIT, async {
        wait.await;
        Ok(())
    })
    .await
    .is_err()
    {
        log::info!(
            "shard {}: claim {token}: the lend of its filters did not come within {LEND_WAIT:?}: it may miss messages of other nodes",
            ctx.id
        );
    }
}

/// Claims `client_id` on this node only (no cluster) and waits until the
/// claim `token` returned is answered; the outcome stays in the pending
/// claim until [`take_outcome`], so the claim stays supersedable meanwhile.
///
/// # Errors
/// [`RegistryError::TimedOut`] when no answer came in [`CLAIM_TIMEOUT`].
pub async fn claim_on_node(
    ctx: &Ctx,
    client_id: ByteString,
    clean_session: bool,
) -> Result<u64, RegistryError> {
    claim_on_node_within(ctx, client_id, clean_session, CLAIM_TIMEOUT, false)
        .await
        .map_err(|_| RegistryError::TimedOut)
}

/// [`claim_on_node`] waiting `within` at most: the claim's token, as the
/// error when it was not answered in time (the claim is then abandoned: a
/// late answer parks a persistent session offline as that claim's).
/// `away`: the claim is another node's take-over's
/// ([`PendingClaim::away`]).
pub async fn claim_on_node_within(
    ctx: &Ctx,
    client_id: ByteString,
    clean_session: bool,
    within: Duration,
    away: bool,
) -> Result<u64, u64> {
    let token = ctx
        .shard
        .borrow_mut()
        .start_claim_for(client_id, clean_session, away);
    ctx.send_outbox();
    // Answered already (this shard is the id's home and nothing had to be
    // taken over from another shard: every claim on one shard): no timer
    // to arm and drop, which cost each CONNECT a few allocations and the
    // reactor's timer bookkeeping.
    let answered = ctx
        .shard
        .borrow()
        .registry
        .claims
        .get(&token)
        .is_none_or(|pending| pending.outcome.is_some());
    if answered {
        return Ok(token);
    }
    let wait = poll_fn(|cx| {
        let mut shard = ctx.shard.borrow_mut();
        let Some(pending) = shard.registry.claims.get_mut(&token) else {
            return Poll::Ready(Ok(()));
        };
        if pending.outcome.is_some() {
            return Poll::Ready(Ok(()));
        }
        pending.waker = Some(cx.waker().clone());
        Poll::Pending
    });
    if glommio::timer::timeout(within, wait).await.is_err() {
        // Keep the claim, marked abandoned: a late answer is then kept offline
        // (see `claim_answered`), so a persistent session is not lost.
        if let Some(claim) = ctx.shard.borrow_mut().registry.claims.get_mut(&token) {
            claim.abandoned = true;
            claim.waker = None;
        }
        return Err(token);
    }
    Ok(token)
}

/// Whether this shard's claim `token` lost its id to a later claim (gone:
/// superseded too).
fn superseded(shard: &Shard, token: u64) -> bool {
    shard
        .registry
        .claims
        .get(&token)
        .is_none_or(|c| matches!(c.outcome, Some(Outcome::Superseded)))
}

/// Takes the outcome of this shard's answered claim `token` (gone:
/// superseded).
fn take_outcome(shard: &mut Shard, token: u64) -> Outcome {
    match shard.registry.claims.remove(&token) {
        Some(PendingClaim {
            outcome: Some(outcome),
            ..
        }) => outcome,
        _ => Outcome::Superseded,
    }
}

impl Shard {
    /// Records a claim of `client_id` by a connection on this shard and
    /// sends it to the id's home (or serves it here when this is the home);
    /// returns its token. The answer arrives in [`Shard::claim_answered`].
    #[cfg(test)]
    pub fn start_claim(&mut self, client_id: ByteString, clean_session: bool) -> u64 {
        self.start_claim_for(client_id, clean_session, false)
    }

    /// [`Shard::start_claim`], for another node's take-over when `away`
    /// ([`PendingClaim::away`]).
    pub fn start_claim_for(
        &mut self,
        client_id: ByteString,
        clean_session: bool,
        away: bool,
    ) -> u64 {
        let token = self.registry.next_token;
        self.registry.next_token += 1;
        self.registry.claims.insert(
            token,
            PendingClaim {
                client_id: client_id.clone(),
                outcome: None,
                waker: None,
                superseded_by: None,
                abandoned: false,
                cluster: None,
                withdrawn: None,
                away,
                lend: None,
            },
        );
        let home = home_shard(&client_id, self.nr_shards);
        let new_shard = self.id;
        if home == self.id {
            self.home_claim(client_id, new_shard, token, clean_session);
        } else {
            self.outbox.push((
                home,
                ShardMsg::Claim {
                    client_id,
                    new_shard,
                    token,
                    clean_session,
                },
            ));
        }
        token
    }

    /// At the home shard: `new_shard` claims `client_id`.
    ///
    /// The previous owner is the claim in `homes`, which is told to go; or
    /// else this shard or no shard: [`Shard::evict`] then finds the id's
    /// session or owning claim here (and takes it over), or answers that
    /// there is nothing to resume.
    pub fn home_claim(
        &mut self,
        client_id: ByteString,
        new_shard: usize,
        token: u64,
        clean_session: bool,
    ) {
        let previous = if new_shard == self.id {
            self.registry.homes.remove(&client_id)
        } else {
            // A copy, not a clone: a clone would keep the connection's
            // buffer and the 24-byte shared header its first clone made
            // alive for as long as the record lives.
            let record = ByteString::from(&*client_id);
            let owner = Owner {
                shard: new_shard,
                token,
            };
            self.registry.homes.insert(record, owner)
        };
        match previous {
            // Records name only other shards (see `homes`).
            Some(owner) => self.outbox.push((
                owner.shard,
                ShardMsg::Evict {
                    client_id,
                    victim: Some(owner.token),
                    to_shard: new_shard,
                    token,
                    clean_session,
                },
            )),
            None => self.evict(&client_id, None, new_shard, token, clean_session),
        }
    }

    /// At the shard holding the id: the claim `victim` of this shard (None:
    /// whichever claim of this shard, the id's home, owns it) loses the id;
    /// close its connection and hand its state to the claim `(to_shard,
    /// token)`, now or, if it is still waiting for its own answer, when that
    /// comes.
    pub fn evict(
        &mut self,
        client_id: &str,
        victim: Option<u64>,
        to_shard: usize,
        token: u64,
        clean_session: bool,
    ) {
        let later = (to_shard, token, clean_session);
        // A claim not yet attached as a session: waiting for its answer, or
        // answered and its connection task not yet run. At the home, claims
        // are made in the order the home serves them, so the owner is the
        // one not superseded yet (never the new claim itself).
        let waiting = match victim {
            Some(victim) => Some(victim),
            None => self
                .registry
                .claims
                .iter()
                .find(|(t, c)| {
                    !(to_shard == self.id && **t == token)
                        && c.client_id == client_id
                        && c.superseded_by.is_none()
                        && !matches!(c.outcome, Some(Outcome::Superseded))
                })
                .map(|(t, _)| *t),
        };
        if let Some(waiting) = waiting
            && self.supersede(waiting, later)
        {
            return;
        }
        if let Some(key) = self.session_key(client_id)
            && victim.is_none_or(|v| self.sessions[key as usize].claim == v)
            && let keep = (!clean_session && !self.sessions[key as usize].clean_session)
            && let Some((session, lent)) =
                self.remove_session_to(key, keep.then_some((to_shard, token)))
        {
            if let Some(mut link) = session.link {
                debug!("client {client_id} taken over by a new connection");
                link.close(CloseReason::TakenOver);
            }
            // The old session ends here (§4.8.2: its shared messages go to
            // other members; a persistent one's drop waits for the shards
            // that take them, `Shard::journal_drop_after`).
            let handed = match (keep, session.clean_session) {
                (true, _) => None,
                (false, true) => {
                    self.pass_on_shared_backlog(&session.state);
                    None
                }
                (false, false) => self.hand_over_shared_backlog(&session.state),
            };
            let state = keep.then_some(session.state);
            if state.is_none() && !session.clean_session {
                // A clean start ends the persistent session (§3.1.2.4): its
                // CONNACK waits until that is durable (`held_out`).
                self.journal_drop_after(client_id, handed, Some((to_shard, token)));
                return;
            }
            self.answer_claim(to_shard, token, state, lent);
            return;
        }
        // The owner is gone (a clean session ended, its release on the way).
        self.answer_claim(to_shard, token, None, None);
    }

    /// The claim `token` of this shard, not yet attached, loses its id to
    /// the claim `later` (shard, token, CleanSession): if it is still
    /// waiting, `later` gets its state when its answer comes; if answered,
    /// its connection task finds it superseded and `later` gets the state
    /// now. False when there is no such claim (it is attached, or gone).
    fn supersede(&mut self, token: u64, later: (usize, u64, bool)) -> bool {
        let Some(claim) = self.registry.claims.get_mut(&token) else {
            return false;
        };
        if claim.superseded_by.is_some() {
            return false;
        }
        debug!(
            "claim {token} of {} superseded by claim {} of shard {}",
            claim.client_id, later.1, later.0
        );
        if let Some(withdrawn) = &claim.withdrawn {
            withdrawn.withdraw();
        }
        match claim.outcome.take() {
            None => {
                claim.superseded_by = Some(later);
                true
            }
            Some(Outcome::Granted(state)) => {
                claim.outcome = Some(Outcome::Superseded);
                if let Some(waker) = claim.waker.take() {
                    waker.wake();
                }
                let client_id = claim.client_id.clone();
                // What the state holds of NATS: up to the lend's position
                // while it waits for a lend (the lend brings the rest),
                // else what this shard took, which the attaching claim kept.
                let waiting = |l: &ClaimLend| state.as_ref().is_some_and(|s| l.waits(s));
                let after = match claim.lend.take() {
                    Some(lend) if waiting(&lend) => lend.after.unwrap_or(self.nats_seq),
                    _ => self.nats_seq,
                };
                self.pass_state_on(&client_id, state, later, after);
                true
            }
            Some(Outcome::Superseded) => {
                claim.outcome = Some(Outcome::Superseded);
                false
            }
        }
    }

    /// Passes `state`, granted to a superseded claim of `client_id`, on to
    /// the claim `later` (shard, token, CleanSession). A later clean start
    /// ends the persistent session instead, with a drop record here that
    /// its answer (hence its CONNACK) waits for: the shard that handed the
    /// state over wrote no drop (this shard was to write the next image),
    /// so without one a restart would bring back, from that shard's disk,
    /// a session the clean start ended. `after`: the number of the last
    /// NATS batch the state holds (the lend's position, shard::lend).
    fn pass_state_on(
        &mut self,
        client_id: &str,
        state: Option<SessionState>,
        (to, token, clean): (usize, u64, bool),
        after: u64,
    ) {
        match state {
            Some(_) if clean => {
                let lsn = self.journal_drop(client_id);
                self.answer_claim_after(lsn, to, token);
            }
            state => {
                let lent = state
                    .as_ref()
                    .and_then(|state| self.lend_interest(client_id, (to, token), state, after));
                self.answer_claim(to, token, state, lent)
            }
        }
    }

    /// The session state granted to a claim of this shard for `client_id`
    /// whose connection has not attached it yet (taken over from another
    /// shard, on its way to becoming a session here).
    pub fn granted_state_mut(&mut self, client_id: &str) -> Option<&mut SessionState> {
        self.registry
            .claims
            .values_mut()
            .filter(|c| c.client_id == client_id && c.superseded_by.is_none())
            .find_map(|c| match &mut c.outcome {
                Some(Outcome::Granted(Some(state))) => Some(state),
                _ => None,
            })
    }

    /// Answers the claim `token` of `shard`, locally or over the mesh; a
    /// state goes with what this shard has routed (all of which it holds,
    /// `ShardMsg::Claimed::routed`), and `lent`: the position of the lend
    /// of its filters, if the bridge was told one (shard::lend).
    pub(super) fn answer_claim(
        &mut self,
        shard: usize,
        token: u64,
        state: Option<SessionState>,
        lent: Option<u64>,
    ) {
        if shard == self.id {
            self.claim_answered_after(token, state, None, lent);
        } else {
            let routed = state.as_ref().map(|_| Box::new(self.seen()));
            self.outbox.push((
                shard,
                ShardMsg::Claimed {
                    token,
                    state: state.map(Box::new),
                    routed,
                    lent,
                },
            ));
        }
    }

    /// The answer to one of this shard's claims arrived, from this shard.
    #[cfg(test)]
    pub fn claim_answered(&mut self, token: u64, state: Option<SessionState>) {
        self.claim_answered_after(token, state, None, None);
    }

    /// The answer to one of this shard's claims arrived, with the state
    /// another shard took when it had routed `routed` of each shard's
    /// publishes (None: from this shard, which holds all it routed). What
    /// this shard routed beyond that reached no copy of the session (the
    /// old shard's router no longer had it, this one's not yet): the state
    /// takes it first ([`Shard::catch_up_state`]). The claim is then
    /// *attaching* (in a cluster until the bridge's answer too, which
    /// keeps it so when it grants the id here): what this shard routes
    /// until its connection attaches the state is kept in it
    /// ([`Shard::queue_for_attaching`]), and a take-over meanwhile gets
    /// the state with all of that. A claim for another node's take-over
    /// ([`PendingClaim::away`]) does neither: it reports to the bridge
    /// what the state holds, `routed` (cluster::positions), and the
    /// bridge's tail brings the rest. `lent`: the old shard told the
    /// bridge to lend the session's filters to this claim, and the number
    /// of the last NATS batch the state holds: the state takes what the
    /// lend brought before it came, and the claim what it brings after
    /// (shard::lend).
    pub fn claim_answered_after(
        &mut self,
        token: u64,
        mut state: Option<SessionState>,
        routed: Option<Seen>,
        lent: Option<u64>,
    ) {
        let Some(claim) = self.registry.claims.get_mut(&token) else {
            debug!("answer to unknown claim {token} dropped");
            return;
        };
        let away = claim.away;
        let lent_kept = match (&state, lent) {
            (Some(_), Some(after)) if !away => {
                let lend = claim.lend.get_or_insert_with(ClaimLend::default);
                lend.after = Some(after);
                lend.take_kept()
            }
            _ => {
                claim.lend = None;
                Vec::new()
            }
        };
        if away {
            // The state leaves the node: what it holds goes to the bridge
            // for the tail, which has what this node routed beyond it (a
            // catch-up here would send that twice). Reported here, not
            // where the state was taken: a claim between two shards
            // handed on a state that caught up on the way.
            let client_id = claim.client_id.clone();
            if let (Some(_), Some(link)) = (&state, &self.cluster) {
                let seen = routed.clone().unwrap_or_else(|| self.seen());
                link.evicted(&client_id, seen);
            }
        } else if let (Some(state), Some(routed)) = (&mut state, &routed) {
            self.catch_up_state(token, state, routed);
        }
        let Some(claim) = self.registry.claims.get_mut(&token) else {
            return;
        };
        if let Some(later) = claim.superseded_by.take() {
            claim.outcome = Some(Outcome::Superseded);
            if let Some(waker) = claim.waker.take() {
                waker.wake();
            }
            let client_id = claim.client_id.clone();
            if claim.abandoned {
                self.registry.claims.remove(&token);
            }
            // The state holds NATS's batches up to the lend's position
            // (what was kept here for it, the next lend brings again).
            let after = lent.unwrap_or(self.nats_seq);
            self.pass_state_on(&client_id, state, later, after);
            return;
        }
        if let Some(state) = &mut state {
            for (filter, batch) in &lent_kept {
                keep_batch(
                    state,
                    filter.as_deref(),
                    batch,
                    &self.limits,
                    &mut self.stats,
                );
            }
        }
        let Some(claim) = self.registry.claims.get_mut(&token) else {
            return;
        };
        if claim.abandoned {
            // The connection is gone.
            let client_id = claim.client_id.clone();
            self.registry.claims.remove(&token);
            self.keep_or_release(client_id, token, state);
            return;
        }
        let attaching = state.is_some() && !away;
        claim.outcome = Some(Outcome::Granted(state));
        if let Some(waker) = claim.waker.take() {
            waker.wake();
        }
        if attaching {
            self.registry.attaching.push(token);
        }
    }

    /// Keeps in `state` (handed to claim `token` by a shard that had routed
    /// `routed`) the QoS 1/2 messages this shard routed that `routed` has
    /// not, in the order routed, as an offline session keeps them: the
    /// batches it routed lately (`Shard::routed`, every shard's, kept with
    /// more than one shard), then its own not yet handed on. A ring that no
    /// longer reaches back to all of them (a move slower than
    /// `cluster::positions::RING_AGE`) is logged.
    fn catch_up_state(&mut self, token: u64, state: &mut SessionState, routed: &Seen) {
        let current = (self.id, self.handed_on, self.remote_batch.as_slice());
        let (missed, whole) = self.routed.missed(routed, current);
        if !whole {
            log::info!(
                "shard {}: claim {token}: the batches routed while the session moved are no longer all kept: it may miss some",
                self.id
            );
        }
        let missed: Vec<Message> = missed.into_iter().cloned().collect();
        for message in &missed {
            keep_for_claim_state(state, None, message, &self.limits, &mut self.stats);
        }
    }

    /// Whether this shard's answered claim `token` holds a session state
    /// (None: superseded, gone, or not answered).
    pub fn registry_claim_state(&self, token: u64) -> Option<bool> {
        match self.registry.claims.get(&token)?.outcome.as_ref()? {
            Outcome::Granted(state) => Some(state.is_some()),
            Outcome::Superseded => None,
        }
    }

    /// Takes the answer of this shard's claim `token` (see
    /// [`claim_on_node`]): `Some` with the state to resume when granted,
    /// `None` when a later claim superseded it.
    pub fn take_claim(&mut self, token: u64) -> Option<Option<SessionState>> {
        match take_outcome(self, token) {
            Outcome::Granted(state) => Some(state),
            Outcome::Superseded => None,
        }
    }

    /// The claim `token` of `client_id` was granted, but its connection
    /// will not attach it: the home shard points here, so park a persistent
    /// session's state offline so it is not lost, or release the id.
    pub fn keep_or_release(
        &mut self,
        client_id: ByteString,
        token: u64,
        state: Option<SessionState>,
    ) {
        match state {
            Some(state) => {
                let mut session = Session::new(client_id, false, state);
                session.claim = token;
                let _ = self.insert_session(session);
            }
            None => self.release(&client_id, token),
        }
    }

    /// The session of this shard's claim `token` ended: tell its home shard
    /// (and, in a cluster, the bridge: the id's record goes).
    pub fn release(&mut self, client_id: &str, token: u64) {
        if let Some(link) = &self.cluster {
            link.released(client_id, token);
        }
        self.release_on_node(client_id, token);
    }

    /// [`Shard::release`] for the node only: the cluster's record stays.
    fn release_on_node(&mut self, client_id: &str, token: u64) {
        let home = home_shard(client_id, self.nr_shards);
        let shard = self.id;
        if home == self.id {
            self.home_release(client_id, shard, token);
        } else {
            let client_id = ByteString::from(client_id);
            self.outbox.push((
                home,
                ShardMsg::Release {
                    client_id,
                    shard,
                    token,
                },
            ));
        }
    }

    /// At the home shard: the session of claim `token` on `shard` ended;
    /// forget it unless the id was claimed again meanwhile (by any shard,
    /// this one included). (A session on the home shard itself has no entry
    /// to forget.)
    pub fn home_release(&mut self, client_id: &str, shard: usize, token: u64) {
        if self.registry.homes.get(client_id) == Some(&Owner { shard, token }) {
            self.registry.homes.remove(client_id);
        }
    }

    /// The cluster's answer to this shard's claim `token`, applied in the
    /// order of the bridge's queue ([`claim`] waits for it). Granted, the
    /// claim is attaching: its outcome becomes the state its connection
    /// attaches (the previous owner node's, which replaces a copy held
    /// here; a dead owner's subscriptions only without one here), so that
    /// a take-over before the attach supersedes the claim with that state,
    /// and messages meanwhile are kept in it
    /// ([`Shard::queue_for_attaching`]). An answer for a claim gone or
    /// superseded meanwhile is dropped.
    #[cfg(test)]
    pub fn cluster_claim_answered(&mut self, token: u64, answer: ClaimAnswer) {
        self.cluster_claim_answered_after(token, answer, None);
    }

    /// [`Shard::cluster_claim_answered`] of a grant that brought another
    /// node's session, whose tail the bridge asked for when this node had
    /// published `published`: the claim also keeps what this shard routed
    /// since (`Shard::catch_up`).
    pub fn cluster_claim_answered_after(
        &mut self,
        token: u64,
        answer: ClaimAnswer,
        published: Option<Seen>,
    ) {
        let Some(claim) = self.registry.claims.get_mut(&token) else {
            self.late_cluster_answer(token, answer);
            return;
        };
        let local = match &mut claim.outcome {
            Some(Outcome::Granted(local)) if claim.cluster.is_none() => local.take(),
            _ => {
                // A later CONNECT here took the id, and its own grant
                // settles the record; a state this grant brought goes
                // back to the bridge, which keeps it for that grant to
                // take (docs/design/cluster.md §9). Answered: the claim's
                // connection task, when it runs, awaits no late answer.
                claim.cluster = Some(match answer {
                    ClaimAnswer::Unavailable => ClusterAnswer::Unavailable,
                    _ => ClusterAnswer::Granted,
                });
                debug!(
                    "cluster answer to claim {token}, superseded meanwhile: its state goes back"
                );
                let client_id = claim.client_id.clone();
                self.give_back(&client_id, token, answer, false);
                return;
            }
        };
        let client_id = claim.client_id.clone();
        let decoded = |image: &[u8], what: &str| match decode_image(image) {
            Ok(state) => Some(state),
            Err(e) => {
                debug!("client {client_id}: {what} unreadable: {e}");
                None
            }
        };
        let (answered, state) = match answer {
            ClaimAnswer::Granted(image) => {
                let moved = image.and_then(|i| decoded(&i, "session state from another node"));
                match moved {
                    Some(moved) => {
                        if local.is_some() {
                            // The cluster's owner had it last: the copy
                            // here is stale.
                            self.journal_drop(&client_id);
                        }
                        (ClusterAnswer::Granted, Some(moved))
                    }
                    None => (ClusterAnswer::Granted, local),
                }
            }
            // A copy held here is newer than what a dead owner left.
            ClaimAnswer::Recovered(image) => (
                ClusterAnswer::Granted,
                local.or_else(|| decoded(&image, "subscriptions left by a dead node")),
            ),
            ClaimAnswer::Unavailable => (ClusterAnswer::Unavailable, local),
        };
        let attaching = answered == ClusterAnswer::Granted && state.is_some();
        if let Some(claim) = self.registry.claims.get_mut(&token) {
            claim.outcome = Some(Outcome::Granted(state));
            claim.cluster = Some(answered);
            if let Some(waker) = claim.waker.take() {
                waker.wake();
            }
        }
        // (The node's answer made it attaching already if it brought a
        // state from this node.)
        self.registry.attaching.retain(|t| *t != token);
        if attaching {
            self.registry.attaching.push(token);
            if let Some(published) = &published {
                self.catch_up(token, published);
            }
        }
    }

    /// Keeps `messages` (this node's own, routed here before the grant
    /// of claim `token` made it attaching, `Shard::catch_up`) in the
    /// state of that claim if the cluster granted it here and its
    /// connection has not attached it yet, as
    /// [`Shard::queue_for_attaching`] does.
    pub(super) fn keep_for_claim(&mut self, token: u64, messages: &[Message]) {
        let Some(PendingClaim {
            outcome: Some(Outcome::Granted(Some(state))),
            cluster: Some(ClusterAnswer::Granted),
            ..
        }) = self.registry.claims.get_mut(&token)
        else {
            return;
        };
        for message in messages {
            keep_for_claim_state(state, None, message, &self.limits, &mut self.stats);
        }
    }

    /// The connection of claim `token` stopped waiting for the cluster's
    /// answer ([`CLAIM_TIMEOUT`]; it answers CONNACK 0x03): a copy held
    /// here (`state`) stays offline as that claim's session; without one
    /// the id is released on the node, not in the cluster, where the
    /// record may be about to name this claim. The answer, when it comes,
    /// settles it ([`Shard::cluster_claim_answered`]).
    fn cluster_gave_up(&mut self, client_id: ByteString, token: u64, state: Option<SessionState>) {
        self.await_late_answer(client_id.clone(), token, false);
        match state {
            Some(state) => self.keep_or_release(client_id, token, Some(state)),
            None => self.release_on_node(&client_id, token),
        }
    }

    /// Remembers claim `token` of `client_id`, which its connection no
    /// longer waits for (`superseded`: a later claim of the id here took
    /// it), until the cluster's answer comes ([`Registry::given_up`]).
    /// Beyond [`MAX_GIVEN_UP`] the oldest is forgotten, its record
    /// released at once (unless it was superseded: the later claim
    /// settles the record).
    fn await_late_answer(&mut self, client_id: ByteString, token: u64, superseded: bool) {
        let given_up = &mut self.registry.given_up;
        if given_up.len() >= MAX_GIVEN_UP
            && let Some(oldest) = given_up.pop_front()
            && !oldest.superseded
            && let Some(link) = &self.cluster
        {
            link.released(&oldest.client_id, oldest.token);
        }
        self.registry.given_up.push_back(GivenUp {
            token,
            client_id,
            superseded,
        });
    }

    /// The cluster's answer to claim `token`, which is no longer pending:
    /// if its connection gave up on it ([`Registry::given_up`]), a state
    /// it brought goes back to the bridge (kept there for the id's next
    /// claim, here or on another node: for a superseded claim, the later
    /// one), and a grant without one releases the record unless a
    /// session of the claim stays here, or a later claim of the id here
    /// superseded it. Else dropped.
    fn late_cluster_answer(&mut self, token: u64, answer: ClaimAnswer) {
        let given_up = &mut self.registry.given_up;
        let Some(GivenUp {
            client_id,
            superseded,
            ..
        }) = given_up
            .iter()
            .position(|g| g.token == token)
            .and_then(|at| given_up.remove(at))
        else {
            debug!("cluster answer to claim {token}, ended meanwhile, dropped");
            return;
        };
        debug!("cluster answer to claim {token} of {client_id}, after its connection gave up");
        let held = self
            .session_key(&client_id)
            .and_then(|key| self.sessions.get(key as usize))
            .is_some_and(|s| s.claim == token);
        match answer {
            ClaimAnswer::Granted(None) | ClaimAnswer::Unavailable => {
                if !held
                    && !superseded
                    && let Some(link) = &self.cluster
                {
                    link.released(&client_id, token);
                }
            }
            answer => self.give_back(&client_id, token, answer, held),
        }
    }

    /// Hands the state the cluster's grant `answer` to claim `token`
    /// brought (if any) back to the bridge: nobody here takes it
    /// (`Control::Unclaimed`; `held`: a session of that claim stays here).
    fn give_back(&self, client_id: &str, token: u64, answer: ClaimAnswer, held: bool) {
        if matches!(
            answer,
            ClaimAnswer::Granted(None) | ClaimAnswer::Unavailable
        ) {
            return;
        }
        if let Some(link) = &self.cluster {
            link.unclaimed(client_id, token, answer, held);
        }
    }

    /// Keeps `message` in the state of each claim granted here (by the
    /// node, `Shard::claim_answered_after`, and in a cluster not refused
    /// by the bridge, or granted by the bridge with another node's state)
    /// whose connection has not attached it yet ([`Registry::attaching`]),
    /// if the session takes it (from the NATS subscription of `filter` as
    /// `shard::cluster` routes it; `None`: through any matching filter), as
    /// an offline session keeps it: QoS 1 and 2, within the queue's limits.
    /// Otherwise it would reach neither the old shard or node, which handed
    /// the session over, nor the session here. `from_cluster`: the message
    /// came from NATS (a session being handed to another node is left
    /// out: its collector has it).
    pub(super) fn queue_for_attaching(
        &mut self,
        filter: Option<&str>,
        message: &Message,
        from_cluster: bool,
    ) {
        if self.registry.attaching.is_empty() || message.qos == QoS::AtMostOnce {
            return;
        }
        let Registry {
            claims, attaching, ..
        } = &mut self.registry;
        let handing = &self.cluster_handing;
        // Attaching from the node's answer (`Shard::claim_answered_after`)
        // until the bridge answers too, in a cluster.
        attaching.retain(|token| {
            claims.get(token).is_some_and(|c| {
                c.cluster.is_none_or(|a| a == ClusterAnswer::Granted)
                    && matches!(c.outcome, Some(Outcome::Granted(Some(_))))
            })
        });
        for token in attaching.iter() {
            let Some(PendingClaim {
                outcome: Some(Outcome::Granted(Some(state))),
                client_id,
                lend,
                ..
            }) = claims.get_mut(token)
            else {
                continue;
            };
            // From NATS through a filter whose lend is still to come: the
            // lend brings it (shard::lend).
            if from_cluster && lend.as_ref().is_some_and(|l| !l.takes(filter)) {
                continue;
            }
            // From NATS and being handed over (its collector has it), or
            // a message it got already: not again
            // (`Shard::route_from_cluster_except`). This node's own
            // messages it keeps: the state that leaves holds what this
            // shard routed (`PendingClaim::away`).
            if from_cluster && !handing.is_empty() && handing.contains(&**client_id) {
                continue;
            }
            keep_for_claim_state(state, filter, message, &self.limits, &mut self.stats);
        }
    }

    /// Whether a claim of this shard may be attaching
    /// ([`Registry::attaching`]; pruned when routed).
    pub(super) fn has_attaching(&self) -> bool {
        !self.registry.attaching.is_empty()
    }

    /// This shard took batch number `seq` from NATS (`ToShard::Deliver`),
    /// `messages` of the subscription of `filter`: the claims whose lend
    /// of that filter began before their state came keep it
    /// ([`Registry::lending`], shard::lend).
    pub(super) fn took_from_cluster(
        &mut self,
        seq: u64,
        filter: Option<&ByteString>,
        messages: &Arc<Vec<Message>>,
    ) {
        self.nats_seq = seq;
        if self.registry.lending.is_empty() {
            return;
        }
        let Registry {
            claims, lending, ..
        } = &mut self.registry;
        lending.retain(|token| {
            claims
                .get(token)
                .is_some_and(|c| c.outcome.is_none() && c.lend.is_some())
        });
        for token in lending.iter() {
            let Some(lend) = claims.get_mut(token).and_then(|c| c.lend.as_mut()) else {
                continue;
            };
            if lend.started(filter.map(|f| &**f)) && !lend.keep(filter, messages) {
                self.stats.publish_dropped += messages.len() as u64;
            }
        }
    }

    /// The bridge holds `filter` for this shard's claim `token` from now
    /// on (`ToShard::Lent`), and brought `batches`: that filter's since
    /// what the claim's state holds. With its state the claim takes them
    /// now, else keeps them (and the filter's next ones) until it comes;
    /// a claim that no longer waits for a state of this node drops them
    /// (shard::lend). `whole` false: the bridge no longer had them all.
    pub fn lent(
        &mut self,
        token: u64,
        filter: Option<ByteString>,
        batches: Vec<Arc<Vec<Message>>>,
        whole: bool,
    ) {
        let name = filter.as_deref().unwrap_or("the escaped subject");
        if !whole {
            log::info!(
                "shard {}: claim {token}: the batches of {name} since the session left its shard are no longer all kept: it may miss some",
                self.id
            );
        }
        let Shard {
            registry,
            limits,
            stats,
            ..
        } = self;
        let Some(claim) = registry.claims.get_mut(&token) else {
            debug!("lend of {name} for claim {token}, gone meanwhile, dropped");
            return;
        };
        if claim.away || claim.superseded_by.is_some() {
            return;
        }
        let lend = claim.lend.get_or_insert_with(ClaimLend::default);
        lend.start(filter.clone());
        if let Some(waker) = claim.waker.take() {
            waker.wake();
        }
        match &mut claim.outcome {
            None => {
                for batch in &batches {
                    if !lend.keep(filter.as_ref(), batch) {
                        stats.publish_dropped += batch.len() as u64;
                    }
                }
                if !registry.lending.contains(&token) {
                    registry.lending.push(token);
                }
            }
            Some(Outcome::Granted(Some(state))) => {
                for batch in &batches {
                    keep_batch(state, filter.as_deref(), batch, limits, stats);
                }
            }
            Some(_) => {}
        }
    }
}

/// Keeps `message` in `state`, held by a claim of this shard that has not
/// attached it yet, if the session takes it (from the NATS subscription of
/// `filter` as `shard::cluster` routes it; None: through any matching
/// filter), as an offline session keeps it: within the queue's limits
/// (`limits`), else counted dropped.
fn keep_for_claim_state(
    state: &mut SessionState,
    filter: Option<&str>,
    message: &Message,
    limits: &Limits,
    stats: &mut Counters,
) {
    let Some(granted) = copy_qos(state, filter, &message.topic) else {
        return;
    };
    if state.keep(message, granted, limits) == Delivery::Dropped {
        stats.publish_dropped += 1;
    }
}

/// [`keep_for_claim_state`] for the QoS 1/2 messages of `batch`, in order.
fn keep_batch(
    state: &mut SessionState,
    filter: Option<&str>,
    batch: &[Message],
    limits: &Limits,
    stats: &mut Counters,
) {
    for message in batch.iter().filter(|m| m.qos != QoS::AtMostOnce) {
        keep_for_claim_state(state, filter, message, limits, stats);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cluster::link::{ClusterLink, Control};
    use crate::config::Config;
    use crate::protocol::v3::{QoS, Subscribe};
    use crate::shard::SessionKey;

    use crate::shard::testing::shard;

    /// Connects `client_id` (persistent unless `clean`) and subscribes it to
    /// `filter`, as a connection does.
    fn connect(shard: &mut Shard, client_id: &str, clean: bool, filter: &str) -> SessionKey {
        // The claim at home (here); its answer goes to no waiting claim.
        shard.home_claim(ByteString::from(client_id), 0, u64::MAX, clean);
        let mut session = Session::new(ByteString::from(client_id), clean, SessionState::default());
        session.link = Some(crate::session::link::test_link());
        let key = shard.insert_session(session);
        let subscribe = Subscribe {
            packet_id: 1,
            filters: vec![(ByteString::from(filter), QoS::AtMostOnce)],
        };
        shard.subscribe(key, subscribe, None);
        key
    }

    /// Records a claim of this shard waiting for its answer.
    fn pending(shard: &mut Shard, client_id: &str, token: u64) {
        shard.registry.claims.insert(
            token,
            PendingClaim {
                client_id: ByteString::from(client_id),
                outcome: None,
                waker: None,
                superseded_by: None,
                abandoned: false,
                cluster: None,
                withdrawn: None,
                away: false,
                lend: None,
            },
        );
    }

    /// A claim answered on the node and superseded before its connection
    /// task ran counts as superseded (it then asks the cluster nothing:
    /// the bridge takes the last claim of an id it gets for the newest);
    /// the claim that took the id, and a gone one's, are told apart.
    #[test]
    fn a_claim_superseded_before_its_task_ran_is_told_so() {
        let mut shard = shard();
        pending(&mut shard, "raced", 1);
        shard.home_claim(ByteString::from("raced"), 0, 1, true);
        assert!(!superseded(&shard, 1), "granted on the node");
        pending(&mut shard, "raced", 2);
        shard.home_claim(ByteString::from("raced"), 0, 2, true);
        assert!(superseded(&shard, 1), "the later claim took the id");
        assert!(!superseded(&shard, 2));
        assert!(superseded(&shard, 3), "no such claim");
    }

    #[test]
    fn sessions_share_the_routers_filter_and_are_found_by_id() {
        let mut shard = shard();
        let a = connect(&mut shard, "client-a", true, "bench/fanout");
        let b = connect(&mut shard, "client-b", true, "bench/fanout");
        assert_eq!(shard.session_key("client-a"), Some(a));
        assert_eq!(shard.session_key("client-b"), Some(b));
        assert_eq!(shard.session_key("client-c"), None);
        let filter_of = |shard: &Shard, key: SessionKey| {
            shard.sessions[key as usize].state.subscriptions[0]
                .0
                .clone()
        };
        let (fa, fb) = (filter_of(&shard, a), filter_of(&shard, b));
        assert!(Arc::ptr_eq(&fa, &fb), "one filter string for both sessions");
        assert_eq!(&*fa, "bench/fanout");
        // Router's copy, two sessions, and the two clones here.
        assert_eq!(Arc::strong_count(&fa), 5);
        drop(fb);
        shard.remove_session(a);
        shard.remove_session(b);
        assert_eq!(Arc::strong_count(&fa), 1, "freed with the last subscriber");
        assert!(shard.router.is_empty());
        assert_eq!(shard.session_key("client-a"), None);
        assert!(shard.by_client_id.is_empty());
    }

    #[test]
    fn a_clean_start_that_ends_a_stored_session_is_answered_once_its_drop_is_durable() {
        let mut shard = shard();
        let journal = crate::shard::testing::unwritten_journal(&mut shard);
        connect(&mut shard, "kept", false, "t");
        connect(&mut shard, "other", false, "t");
        // A clean start for "kept": its session ends, the drop is journalled,
        // and the claim's answer (hence the CONNACK) waits for it.
        pending(&mut shard, "kept", 77);
        shard.home_claim(ByteString::from("kept"), 0, 77, true);
        assert!(shard.session_key("kept").is_none(), "the old session ended");
        let drop_lsn = journal.end_lsn();
        assert!(
            shard.registry.claims[&77].outcome.is_none(),
            "not answered before the drop is durable"
        );
        shard.release_held_out(drop_lsn - 1);
        assert!(shard.registry.claims[&77].outcome.is_none());
        shard.release_held_out(drop_lsn);
        assert!(matches!(
            shard.registry.claims[&77].outcome,
            Some(Outcome::Granted(None))
        ));
        // A persistent take-over hands the state over and waits for
        // nothing here (the new shard writes the session's image).
        pending(&mut shard, "other", 78);
        shard.home_claim(ByteString::from("other"), 0, 78, false);
        assert!(matches!(
            shard.registry.claims[&78].outcome,
            Some(Outcome::Granted(Some(_)))
        ));
    }

    #[test]
    fn a_take_over_by_another_node_is_answered_once_the_sessions_end_here_is_durable() {
        let mut shard = shard();
        let journal = crate::shard::testing::unwritten_journal(&mut shard);
        connect(&mut shard, "moved", false, "t");
        connect(&mut shard, "ended", false, "t");
        let durable = journal.end_lsn();
        // Another node resumes "moved": the claim its take-over makes here
        // (as the cluster's hand-over does) gets the state, the session
        // leaves this node, and its image goes only once the drop is
        // durable here.
        pending(&mut shard, "moved", 80);
        shard.home_claim(ByteString::from("moved"), 0, 80, false);
        let (state, lsn) = shard.hand_over_claimed("moved", 80);
        assert!(state.is_some(), "the state moves");
        assert!(
            lsn > durable,
            "the image waits for a record not yet durable"
        );
        assert_eq!(lsn, journal.end_lsn());
        assert!(matches!(
            journal.pending_records().last(),
            Some(crate::store::record::Record::SessionDrop(_, id)) if &**id == "moved"
        ));
        // Another node's clean start for "ended": the claim here is
        // answered only once the drop is durable, as a local one.
        pending(&mut shard, "ended", 81);
        shard.home_claim(ByteString::from("ended"), 0, 81, true);
        assert!(shard.registry.claims[&81].outcome.is_none(), "held");
        shard.release_held_out(journal.end_lsn());
        let (state, lsn) = shard.hand_over_claimed("ended", 81);
        assert!(state.is_none() && lsn == 0, "nothing moves, nothing waits");
        assert!(matches!(
            journal.pending_records().last(),
            Some(crate::store::record::Record::SessionDrop(_, id)) if &**id == "ended"
        ));
    }

    /// A persistent session handed to a claim of this shard that a clean
    /// start supersedes before it attaches (answered or still waiting) is
    /// ended here with a drop record, and the clean start's answer waits
    /// for it: the shard it came from wrote none, so without it a restart
    /// would bring the ended session back from that shard's disk.
    #[test]
    fn a_clean_start_that_supersedes_a_granted_state_ends_it_on_disk() {
        let mut shard = shard();
        let journal = crate::shard::testing::unwritten_journal(&mut shard);
        let drops = |journal: &crate::store::journal::Journal| {
            journal
                .pending_records()
                .iter()
                .filter(|r| matches!(r, crate::store::record::Record::SessionDrop(..)))
                .count()
        };
        // Answered: the state waits in the claim for its connection task.
        pending(&mut shard, "moved", 90);
        shard.claim_answered(90, Some(SessionState::default()));
        pending(&mut shard, "moved", 91);
        assert!(shard.supersede(90, (0, 91, true)));
        assert_eq!(drops(&journal), 1, "the session ends on disk here");
        assert!(shard.registry.claims[&91].outcome.is_none(), "held");
        shard.release_held_out(journal.end_lsn());
        assert!(matches!(
            shard.registry.claims[&91].outcome,
            Some(Outcome::Granted(None))
        ));
        // Still waiting: the state arrives after the clean start.
        pending(&mut shard, "waiting", 92);
        pending(&mut shard, "waiting", 93);
        assert!(shard.supersede(92, (0, 93, true)));
        shard.claim_answered(92, Some(SessionState::default()));
        assert_eq!(drops(&journal), 2);
        assert!(shard.registry.claims[&93].outcome.is_none(), "held");
        shard.release_held_out(journal.end_lsn());
        assert!(matches!(
            shard.registry.claims[&93].outcome,
            Some(Outcome::Granted(None))
        ));
        // A later persistent claim takes the state on: nothing ends.
        pending(&mut shard, "kept", 94);
        shard.claim_answered(94, Some(SessionState::default()));
        pending(&mut shard, "kept", 95);
        assert!(shard.supersede(94, (0, 95, false)));
        assert_eq!(drops(&journal), 2);
        assert!(matches!(
            shard.registry.claims[&95].outcome,
            Some(Outcome::Granted(Some(_)))
        ));
    }

    /// The payloads of the messages `state` keeps pending.
    fn pending_payloads(state: &SessionState) -> Vec<String> {
        state
            .flows
            .as_ref()
            .map(|f| {
                f.pending
                    .iter()
                    .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A QoS 1 message on `topic`.
    fn qos1(topic: &str, payload: &'static str) -> Message {
        Message::new(
            ByteString::from(topic),
            bytes::Bytes::from_static(payload.as_bytes()),
            QoS::AtLeastOnce,
            false,
        )
    }

    /// The image another node sends of a persistent session subscribed to
    /// `m/#` at QoS 1 with one message queued.
    fn image_of_moving() -> bytes::Bytes {
        let mut state = SessionState::default();
        state
            .subscriptions
            .push((crate::router::SharedFilter::from("m/#"), QoS::AtLeastOnce));
        let flows = state.flows.get_or_insert_with(Box::default);
        flows.pending.push_back(qos1("m/0", "queued"));
        bytes::Bytes::from(crate::shard::cluster::encode_image(
            "moving",
            &state,
            1 << 20,
        ))
    }

    /// Between the cluster's grant of a session moving here from another
    /// node and its connection attaching it, the claim holds the state
    /// (granted, attaching): messages for the session meanwhile, from other
    /// nodes or published here, are kept in it, and a take-over by a third
    /// node in that window gets that state, not what this node held before.
    #[test]
    fn a_cluster_grant_not_yet_attached_keeps_messages_and_hands_its_state_on() {
        let mut shard = shard();
        let _other = connect(&mut shard, "other", true, "m/#");
        // The node's own claim is answered (nothing held here); then the
        // cluster's grant, with the previous owner's state.
        pending(&mut shard, "moving", 50);
        shard.claim_answered(50, None);
        shard.cluster_claim_answered(50, ClaimAnswer::Granted(Some(image_of_moving())));
        assert_eq!(
            shard.registry.claims[&50].cluster,
            Some(ClusterAnswer::Granted)
        );
        // Messages before the connection attached: from another node on the
        // session's filter (held for the node by "other"), and from here;
        // QoS 0 is not kept for a session without a connection.
        shard.route_from_cluster(Some("m/#"), &[qos1("m/1", "from a node")]);
        shard.route(&qos1("m/2", "local"));
        let mut qos0 = qos1("m/3", "at most once");
        qos0.qos = QoS::AtMostOnce;
        shard.route(&qos0);
        // A third node takes it over now (its hand-over claims it here).
        pending(&mut shard, "moving", 51);
        shard.home_claim(ByteString::from("moving"), 0, 51, false);
        let (state, _) = shard.hand_over_claimed("moving", 51);
        let state = state.expect("the granted state moves on");
        assert_eq!(&*state.subscriptions[0].0, "m/#");
        assert_eq!(pending_payloads(&state), ["queued", "from a node", "local"]);
        // The connection granted first finds its claim superseded.
        assert!(matches!(take_outcome(&mut shard, 50), Outcome::Superseded));
        // Nothing is kept for a claim that is gone.
        shard.route(&qos1("m/4", "after"));
        assert!(shard.registry.attaching.is_empty());
    }

    /// A grant that brought another node's session, with what this node
    /// had published when it asked the old owner for the tail: the claim
    /// keeps, after the image, what this shard routed that was published
    /// later (from other shards, and its own, handed on or not yet), in
    /// the order routed, then what it routes after the grant; not what was
    /// published before (in the image or the tail), nor QoS 0, nor other
    /// topics.
    #[test]
    fn a_cluster_grant_keeps_what_the_shard_routed_since_the_tail_was_asked_for() {
        use crate::cluster::link::ClusterLink;
        use crate::cluster::positions::Seen;

        let mut shard = shard();
        let (link, _controls) = ClusterLink::for_tests(0);
        shard.cluster = Some(link);
        let mut zero = qos1("m/1", "at most once");
        zero.qos = QoS::AtMostOnce;
        let before = Arc::new(vec![qos1("m/1", "published"), qos1("m/1", "published too")]);
        shard.route_batch_from(&before, (1, 1));
        let after = Arc::new(vec![qos1("m/1", "after"), zero, qos1("x", "other topic")]);
        shard.route_batch_from(&after, (1, 3));
        shard.publish(qos1("m/2", "own, handed on"));
        assert!(shard.take_numbered_batch().is_some());
        shard.publish(qos1("m/2", "own, not yet"));
        let mut published = Seen::new(2);
        published.mark(1, 1, 2);
        pending(&mut shard, "moving", 80);
        shard.claim_answered(80, None);
        let image = ClaimAnswer::Granted(Some(image_of_moving()));
        shard.cluster_claim_answered_after(80, image, Some(published));
        shard.route(&qos1("m/3", "after the grant"));
        let Some(Some(state)) = shard.take_claim(80) else {
            panic!("granted with its state");
        };
        assert_eq!(
            pending_payloads(&state),
            [
                "queued",
                "after",
                "own, handed on",
                "own, not yet",
                "after the grant"
            ]
        );
    }

    /// A message kept for a session that is attaching carries what its
    /// subscriptions give a connected MQTT 5.0 session's copy: the
    /// Subscription Identifiers of every matching subscription, RETAIN as
    /// published where one has Retain As Published, the granted QoS.
    #[test]
    fn a_message_kept_for_an_attaching_session_carries_its_subscription_options() {
        use std::num::NonZeroU32;

        use crate::protocol::v5::{Property, RetainHandling, SubscriptionOptions};
        use crate::router::SharedFilter;

        let mut shard = shard();
        let _other = connect(&mut shard, "other", true, "m/#");
        let mut session = Session::new(ByteString::from("moving"), false, SessionState::default());
        for (filter, retain_as_published, identifier) in [("m/#", true, 7), ("m/+", false, 9)] {
            let options = SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published,
                retain_handling: RetainHandling::SendAtSubscribe,
            };
            session.subscribe(SharedFilter::from(filter), QoS::AtLeastOnce);
            session.set_subscription_options(
                SharedFilter::from(filter),
                &options,
                NonZeroU32::new(identifier),
            );
        }
        // One plain subscription that matches nothing below.
        session.subscribe(SharedFilter::from("other/#"), QoS::ExactlyOnce);
        let image = crate::shard::cluster::encode_image("moving", &session.state, 1 << 20);
        pending(&mut shard, "moving", 70);
        shard.claim_answered(70, None);
        shard.cluster_claim_answered(70, ClaimAnswer::Granted(Some(image.into())));
        // From another node on the smallest matching filter, and from here;
        // both retained, at QoS 2 (granted 1).
        let retained = |topic: &str, payload: &'static str| {
            let mut m = qos1(topic, payload);
            m.qos = QoS::ExactlyOnce;
            m.retain = true;
            m
        };
        shard.route_from_cluster(Some("m/#"), &[retained("m/1", "node")]);
        shard.route(&retained("m/a/b", "local"));
        let Some(Outcome::Granted(Some(state))) = &shard.registry.claims[&70].outcome else {
            panic!("the claim holds the state");
        };
        let kept: Vec<_> = state
            .flows
            .as_ref()
            .map(|f| f.pending.iter().collect())
            .unwrap_or_default();
        let identifiers = |m: &Message| -> Vec<u32> {
            m.properties
                .iter()
                .flat_map(|p| p.forwarded.iter())
                .filter_map(|p| match p {
                    Property::SubscriptionIdentifier(id) => Some(id.get()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(kept.len(), 2);
        // m/1 matches m/# and m/+: both identifiers, RETAIN as published.
        assert_eq!(identifiers(kept[0]), [7, 9]);
        assert!(kept[0].retain);
        assert_eq!(kept[0].qos, QoS::AtLeastOnce);
        // m/a/b matches m/# alone.
        assert_eq!(identifiers(kept[1]), [7]);
        assert!(kept[1].retain);
        assert_eq!(kept[1].qos, QoS::AtLeastOnce);
        // A subscription without options: RETAIN cleared, no identifier,
        // the message's QoS below the one granted.
        let mut state = state.clone();
        let mut plain = retained("other/x", "plain");
        plain.qos = QoS::AtLeastOnce;
        let kept = state.keep(&plain, QoS::ExactlyOnce, &shard.limits);
        assert_eq!(kept, crate::session::Delivery::Pending);
        let last = state.flows.as_ref().and_then(|f| f.pending.back());
        assert!(last.is_some_and(|m| !m.retain && identifiers(m).is_empty()));
        assert!(last.is_some_and(|m| m.qos == QoS::AtLeastOnce));
    }

    /// The cluster's answer comes after a take-over superseded the claim
    /// (dropped: the state went on with the take-over), or says it could
    /// not decide (the claim keeps what the node held, and is not
    /// attaching).
    #[test]
    fn a_cluster_answer_to_a_superseded_or_undecided_claim_attaches_nothing() {
        let mut shard = shard();
        pending(&mut shard, "moving", 60);
        shard.claim_answered(60, None);
        pending(&mut shard, "moving", 61);
        shard.home_claim(ByteString::from("moving"), 0, 61, false);
        shard.cluster_claim_answered(60, ClaimAnswer::Granted(Some(image_of_moving())));
        assert!(matches!(take_outcome(&mut shard, 60), Outcome::Superseded));
        assert!(shard.registry.attaching.is_empty());
        pending(&mut shard, "undecided", 62);
        shard.claim_answered(62, Some(SessionState::default()));
        shard.cluster_claim_answered(62, ClaimAnswer::Unavailable);
        assert_eq!(
            shard.registry.claims[&62].cluster,
            Some(ClusterAnswer::Unavailable)
        );
        assert!(shard.registry.attaching.is_empty());
        assert!(matches!(
            take_outcome(&mut shard, 62),
            Outcome::Granted(Some(_))
        ));
    }

    /// A claim that asked the cluster (answered on the node, waiting for
    /// the bridge) is withdrawn once a later claim of the id supersedes it
    /// here: a CONNECT on this node or another node's take-over, which
    /// claims the id as a connection does. The bridge then stops deciding
    /// it (cluster::ownership): before, it went on and took the session
    /// back from the node it had just moved to, for no connection. A claim
    /// not superseded stays as it was, and one already superseded is not
    /// superseded again.
    #[test]
    fn a_claim_waiting_for_the_cluster_is_withdrawn_once_superseded_here() {
        let mut shard = shard();
        pending(&mut shard, "raced", 70);
        shard.claim_answered(70, Some(SessionState::default()));
        let asked = Withdrawn::new();
        shard.registry.claims.get_mut(&70).unwrap().withdrawn = Some(asked.clone());
        pending(&mut shard, "other", 72);
        shard.claim_answered(72, None);
        let other = Withdrawn::new();
        shard.registry.claims.get_mut(&72).unwrap().withdrawn = Some(other.clone());
        assert!(!asked.is_withdrawn());
        // The take-over's claim (or a later CONNECT's) of the id.
        pending(&mut shard, "raced", 71);
        shard.home_claim(ByteString::from("raced"), 0, 71, false);
        assert!(asked.is_withdrawn(), "superseded: withdrawn");
        assert!(!other.is_withdrawn(), "another id's claim");
        assert!(matches!(take_outcome(&mut shard, 70), Outcome::Superseded));
        // The later claim got the state the first one held.
        assert!(matches!(
            take_outcome(&mut shard, 71),
            Outcome::Granted(Some(_))
        ));
        assert!(!shard.supersede(70, (0, 73, false)), "gone: nothing to do");
    }

    /// Late states a shard gave back to the bridge: client id, token, held.
    type GivenBack = Vec<(String, u64, bool)>;

    /// What the shard told the bridge about claims' ends so far: the late
    /// states it gave back and the releases (client id, token).
    fn told(
        to_bridge: &async_channel::Receiver<crate::cluster::link::Control>,
    ) -> (GivenBack, Vec<(String, u64)>) {
        use crate::cluster::link::Control;
        let (mut given, mut released) = (Vec::new(), Vec::new());
        while let Ok(control) = to_bridge.try_recv() {
            match control {
                Control::Unclaimed {
                    client_id,
                    token,
                    answer,
                    held,
                    ..
                } => {
                    assert!(
                        matches!(answer, ClaimAnswer::Granted(Some(_))),
                        "{answer:?}"
                    );
                    given.push((client_id.to_string(), token, held));
                }
                Control::Released {
                    client_id, token, ..
                } => released.push((client_id.to_string(), token)),
                _ => {}
            }
        }
        (given, released)
    }

    /// The cluster's grant reaches the shard after its claim's connection
    /// gave up (`CLAIM_TIMEOUT`): the state it brought goes back to the bridge (which keeps it
    /// for the id's next claim), saying whether a session of the claim
    /// stays here; a grant without a state releases the record unless one
    /// does. Giving up releases the id on the node only (the record may be
    /// about to name the claim); answers to claims never given up, or
    /// answered once already, are dropped; beyond the bound the oldest
    /// given-up claim is released at once.
    #[test]
    fn a_cluster_grant_after_its_connection_gave_up_goes_back_to_the_bridge() {
        let mut shard = shard();
        let (link, to_bridge) = crate::cluster::link::ClusterLink::for_tests(0);
        shard.cluster = Some(link);
        let mut held_copy = SessionState::default();
        held_copy
            .subscriptions
            .push((crate::router::SharedFilter::from("h/#"), QoS::AtLeastOnce));
        shard.cluster_gave_up(ByteString::from("moving"), 80, None);
        shard.cluster_gave_up(ByteString::from("held"), 81, Some(held_copy.clone()));
        shard.cluster_gave_up(ByteString::from("fresh"), 82, None);
        shard.cluster_gave_up(ByteString::from("kept"), 83, Some(held_copy));
        assert_eq!(told(&to_bridge), (vec![], vec![]), "nothing released yet");
        assert!(
            shard.session_key("held").is_some(),
            "the copy stays offline"
        );
        shard.cluster_claim_answered(80, ClaimAnswer::Granted(Some(image_of_moving())));
        shard.cluster_claim_answered(81, ClaimAnswer::Granted(Some(image_of_moving())));
        shard.cluster_claim_answered(82, ClaimAnswer::Granted(None));
        shard.cluster_claim_answered(83, ClaimAnswer::Granted(None));
        assert_eq!(
            told(&to_bridge),
            (
                vec![("moving".into(), 80, false), ("held".into(), 81, true)],
                vec![("fresh".into(), 82)]
            )
        );
        // Once only; and never for a claim that did not give up.
        shard.cluster_claim_answered(80, ClaimAnswer::Granted(Some(image_of_moving())));
        shard.cluster_claim_answered(99, ClaimAnswer::Granted(Some(image_of_moving())));
        assert_eq!(told(&to_bridge), (vec![], vec![]));
        // The bound.
        for token in 0..=MAX_GIVEN_UP as u64 {
            shard.cluster_gave_up(ByteString::from("many"), 1000 + token, None);
        }
        assert_eq!(told(&to_bridge), (vec![], vec![("many".into(), 1000)]));
        assert_eq!(shard.registry.given_up.len(), MAX_GIVEN_UP);
    }

    /// The cluster's grant reaches a claim that a later CONNECT here
    /// superseded while the cluster decided: the state it brought goes
    /// back to the bridge (which keeps it for the later claim's grant,
    /// `cluster::ownership`), whether the claim's connection task has run
    /// (the claim is gone, remembered as superseded) or not; a grant
    /// without a state releases nothing (the later claim settles the
    /// record), and the connection task of a claim answered already
    /// awaits no late answer.
    #[test]
    fn a_cluster_grant_to_a_superseded_claim_gives_its_state_back() {
        let mut shard = shard();
        let (link, to_bridge) = crate::cluster::link::ClusterLink::for_tests(0);
        shard.cluster = Some(link);
        // Its connection task not yet run.
        pending(&mut shard, "moving", 60);
        shard.claim_answered(60, None);
        pending(&mut shard, "moving", 61);
        shard.home_claim(ByteString::from("moving"), 0, 61, false);
        shard.cluster_claim_answered(60, ClaimAnswer::Granted(Some(image_of_moving())));
        assert_eq!(
            told(&to_bridge),
            (vec![("moving".into(), 60, false)], vec![])
        );
        assert_eq!(
            shard.registry.claims[&60].cluster,
            Some(ClusterAnswer::Granted),
            "answered"
        );
        assert!(matches!(take_outcome(&mut shard, 60), Outcome::Superseded));
        assert!(shard.registry.attaching.is_empty());
        // Its connection task ran first (`claim` remembers it).
        pending(&mut shard, "moving", 62);
        shard.home_claim(ByteString::from("moving"), 0, 62, false);
        assert!(matches!(take_outcome(&mut shard, 61), Outcome::Superseded));
        shard.await_late_answer(ByteString::from("moving"), 61, true);
        shard.cluster_claim_answered(61, ClaimAnswer::Granted(Some(image_of_moving())));
        assert_eq!(
            told(&to_bridge),
            (vec![("moving".into(), 61, false)], vec![])
        );
        // Without a state: nothing given back, nothing released.
        shard.await_late_answer(ByteString::from("moving"), 63, true);
        shard.cluster_claim_answered(63, ClaimAnswer::Granted(None));
        assert_eq!(told(&to_bridge), (vec![], vec![]));
        // Nor beyond the bound.
        for token in 0..=MAX_GIVEN_UP as u64 {
            shard.await_late_answer(ByteString::from("many"), 1000 + token, true);
        }
        assert_eq!(told(&to_bridge), (vec![], vec![]));
        assert!(shard.registry.claims.contains_key(&62), "the later claim");
    }

    /// An offline persistent session of `client_id` on `shard`, subscribed
    /// to `m/#` at QoS 1 (what it is sent waits in its pending queue).
    fn offline_on(shard: &mut Shard, client_id: &str) -> SessionKey {
        let session = Session::new(ByteString::from(client_id), false, SessionState::default());
        let key = shard.insert_session(session);
        let subscribe = Subscribe {
            packet_id: 1,
            filters: vec![(ByteString::from("m/#"), QoS::AtLeastOnce)],
        };
        shard.subscribe(key, subscribe, None);
        key
    }

    /// Publishes `message` on `shard` and takes the batch it hands on
    /// (with its shard sequence number).
    fn published(shard: &mut Shard, message: Message) -> (Arc<Vec<Message>>, u64) {
        shard.publish(message);
        shard
            .take_numbered_batch()
            .expect("a batch for the other shard")
    }

    /// What a `Claimed` carries: token, state, routed, lent.
    type Answer = (u64, Option<SessionState>, Option<Seen>, Option<u64>);

    /// The `Claimed` in `shard`'s outbox for `to`.
    fn claimed(shard: &mut Shard, to: usize) -> Answer {
        let outbox = std::mem::take(&mut shard.outbox);
        outbox
            .into_iter()
            .find_map(|(peer, msg)| match msg {
                ShardMsg::Claimed {
                    token,
                    state,
                    routed,
                    lent,
                } if peer == to => Some((token, state.map(|s| *s), routed.map(|r| *r), lent)),
                _ => None,
            })
            .expect("a Claimed for the claiming shard")
    }

    /// A session that moves from shard 0 to shard 1 of one node: what a
    /// shard routed after the old shard took the state and before the new
    /// one got it reached neither copy. The new shard keeps, after the
    /// state, what it routed that the old one had not (its own publish,
    /// the old shard's after the eviction), in the order routed, then what
    /// it routes until the connection attaches (its own, the old shard's);
    /// not what the old shard had routed (in the state already), nor QoS
    /// 0, nor other topics.
    #[test]
    fn a_session_moving_between_shards_keeps_what_was_routed_meanwhile() {
        let mut old = crate::shard::testing::shard_with(0, 2, Config::default());
        let mut new = crate::shard::testing::shard_with(1, 2, Config::default());
        let id = "mover";
        offline_on(&mut old, id);
        // Before the move: on the old shard, routed on both.
        let (before, at) = published(&mut old, qos1("m/0", "before"));
        new.route_batch_from(&before, (0, at));
        // The new shard publishes: routed there with no session, handed on
        // after the old shard evicted it.
        let (from_new, new_at) = published(&mut new, qos1("m/1", "new, during"));
        let (unread, unread_at) = published(&mut new, qos1("x/1", "other topic"));
        // The claim reaches the old shard, which hands the state over.
        pending(&mut new, id, 9);
        old.evict(id, None, 1, 9, false);
        assert_eq!(old.session_key(id), None);
        old.route_batch_from(&from_new, (1, new_at));
        old.route_batch_from(&unread, (1, unread_at));
        // The old shard publishes after the eviction; the batch overtakes
        // the answer (another channel, or an earlier send).
        let mut zero = qos1("m/2", "at most once");
        zero.qos = QoS::AtMostOnce;
        old.publish(zero);
        let (after, after_at) = published(&mut old, qos1("m/3", "old, during"));
        new.route_batch_from(&after, (0, after_at));
        // The answer comes; then, before the connection attaches, the new
        // shard's own publish and one more of the old shard's.
        let (token, state, routed, lent) = claimed(&mut old, 1);
        assert_eq!(token, 9);
        assert!(routed.is_some(), "a state goes with its positions");
        new.claim_answered_after(token, state, routed, lent);
        new.publish(qos1("m/4", "new, attaching"));
        let (late, late_at) = published(&mut old, qos1("m/5", "old, attaching"));
        new.route_batch_from(&late, (0, late_at));
        let Outcome::Granted(Some(state)) = take_outcome(&mut new, 9) else {
            panic!("claim not granted with the state");
        };
        assert_eq!(
            pending_payloads(&state),
            [
                "before",
                "new, during",
                "old, during",
                "new, attaching",
                "old, attaching"
            ]
        );
        // Attached: nothing more is kept for the claim.
        new.route(&qos1("m/6", "after"));
        assert!(new.registry.attaching.is_empty());
    }

    /// A state a shard hands on to a later claim while it waited for it
    /// (superseded) or before its connection attached it takes along what
    /// that shard routed meanwhile, and the positions that say so: the
    /// later claim's shard adds only what it routed beyond them.
    #[test]
    fn a_moving_state_handed_on_again_loses_nothing_and_gets_nothing_twice() {
        let mut old = crate::shard::testing::shard_with(0, 2, Config::default());
        let mut new = crate::shard::testing::shard_with(1, 2, Config::default());
        let id = "mover";
        offline_on(&mut old, id);
        pending(&mut new, id, 9);
        old.evict(id, None, 1, 9, false);
        // Shard 1 routes a message of shard 0 that shard 0 routed after the
        // eviction; then the answer, while a later claim on shard 0
        // supersedes the first.
        let (during, at) = published(&mut old, qos1("m/1", "during"));
        new.route_batch_from(&during, (0, at));
        let (token, state, routed, lent) = claimed(&mut old, 1);
        new.claim_answered_after(token, state, routed, lent);
        new.publish(qos1("m/2", "attaching"));
        let _ = new.take_numbered_batch();
        pending(&mut old, id, 3);
        new.evict(id, Some(9), 0, 3, false);
        assert!(matches!(take_outcome(&mut new, 9), Outcome::Superseded));
        // Back on shard 0: it routed "during" itself, and routes
        // "attaching" before the answer; nothing twice, nothing lost.
        let (token, state, routed, lent) = claimed(&mut new, 0);
        assert_eq!(token, 3);
        old.claim_answered_after(token, state, routed, lent);
        let Outcome::Granted(Some(state)) = take_outcome(&mut old, 3) else {
            panic!("claim not granted with the state");
        };
        assert_eq!(pending_payloads(&state), ["during", "attaching"]);
    }

    /// Shards 0 and 1 of a cluster node (shard `linked` with a link to
    /// the bridge, whose queue comes third): an offline persistent session
    /// "mover" (`offline_on`) on shard 0 evicted for claim 9 of shard 1
    /// (`away`: another node's take-over's), and a QoS 1 message to it
    /// that shard 0 published after the eviction, routed on shard 1, with
    /// its shard sequence number.
    fn moving_in_a_cluster(
        linked: usize,
        away: bool,
    ) -> (Shard, Shard, async_channel::Receiver<Control>, u64) {
        let mut shards = [0, 1].map(|i| crate::shard::testing::shard_with(i, 2, Config::default()));
        let (link, controls) = ClusterLink::for_tests(linked);
        shards[linked].cluster = Some(link);
        let [mut old, mut new] = shards;
        offline_on(&mut old, "mover");
        pending(&mut new, "mover", 9);
        if let Some(claim) = new.registry.claims.get_mut(&9) {
            claim.away = away;
        }
        old.evict("mover", None, 1, 9, false);
        let (during, at) = published(&mut old, qos1("m/1", "during"));
        new.route_batch_from(&during, (0, at));
        (old, new, controls, at)
    }

    /// The positions reported to the bridge for the hand-over of "mover"
    /// (`Control::Seen`), if any.
    fn reported(controls: &async_channel::Receiver<Control>) -> Option<Seen> {
        std::iter::from_fn(|| controls.try_recv().ok()).find_map(|c| match c {
            Control::Seen { client_id, seen } if client_id == "mover" => Some(seen),
            _ => None,
        })
    }

    /// What `controls` got of interest: additions and removals of
    /// filters (with their shard), and lends (`Control::Lend`), in order.
    fn interest_told(controls: &async_channel::Receiver<Control>) -> Vec<String> {
        std::iter::from_fn(|| controls.try_recv().ok())
            .filter_map(|c| match c {
                Control::Lend {
                    client_id,
                    shard,
                    filters,
                    ..
                } => Some(format!("lend {client_id}'s {filters:?} to {shard}")),
                Control::Interest(i) => {
                    let change = if i.add { "add" } else { "remove" };
                    Some(format!("{change} {} of {}", i.filter, i.shard))
                }
                _ => None,
            })
            .collect()
    }

    /// In a cluster, a persistent session leaving its shard for a claim of
    /// the node (on another shard, or on its own: a reconnection there)
    /// has the bridge hold its filters for the claim's shard
    /// (`Control::Lend`) before the old shard's removal of them, in the
    /// same queue: the node's NATS interest in them never lapses for the
    /// move. A clean start, which ends the session, lends nothing.
    #[test]
    fn in_a_cluster_a_session_leaving_its_shard_lends_its_filters_to_the_claim_first() {
        let (_, _, controls, _) = moving_in_a_cluster(0, false);
        let lent = [
            "add m/# of 0",
            "lend mover's [\"m/#\"] to 1",
            "remove m/# of 0",
        ];
        assert_eq!(interest_told(&controls), lent);
        for (to, clean, told) in [
            (
                0,
                false,
                vec!["lend mover's [\"m/#\"] to 0", "remove m/# of 0"],
            ),
            (1, true, vec!["remove m/# of 0"]),
        ] {
            let mut old = crate::shard::testing::shard_with(0, 2, Config::default());
            let (link, controls) = ClusterLink::for_tests(0);
            old.cluster = Some(link);
            offline_on(&mut old, "mover");
            let _ = interest_told(&controls);
            if to == 0 {
                pending(&mut old, "mover", 9);
            }
            old.evict("mover", None, to, 9, clean);
            assert_eq!(
                interest_told(&controls),
                told,
                "to shard {to}, clean {clean}"
            );
        }
    }

    /// One QoS 1 message on `topic` from NATS, as a batch.
    fn from_nats(topic: &str, payload: &'static str) -> Arc<Vec<Message>> {
        Arc::new(vec![qos1(topic, payload)])
    }

    /// Shard 0 of a cluster node (with the link) holds the offline
    /// persistent session "mover" (`m/#`, QoS 1), which took NATS batch 5
    /// ("before"), and lets it go to claim 9 of shard 1: the lend it tells
    /// the bridge names the claim and batch 5, and so does its answer.
    fn lending_in_a_cluster() -> (Shard, Shard, Answer) {
        let mut old = crate::shard::testing::shard_with(0, 2, Config::default());
        let mut new = crate::shard::testing::shard_with(1, 2, Config::default());
        let (link, controls) = ClusterLink::for_tests(0);
        old.cluster = Some(link);
        offline_on(&mut old, "mover");
        let filter = ByteString::from("m/#");
        let before = from_nats("m/1", "before");
        old.took_from_cluster(5, Some(&filter), &before);
        old.route_from_cluster(Some("m/#"), &before);
        pending(&mut new, "mover", 9);
        old.evict("mover", None, 1, 9, false);
        let lend = std::iter::from_fn(|| controls.try_recv().ok()).find_map(|c| match c {
            Control::Lend {
                shard,
                token,
                after,
                ..
            } => Some((shard, token, after)),
            _ => None,
        });
        assert_eq!(lend, Some((1, 9, 5)), "the claim and the state's batch");
        let answer = claimed(&mut old, 1);
        assert_eq!(answer.3, Some(5), "the answer says the filters are lent");
        (old, new, answer)
    }

    /// A claim whose lend comes before its state (the bridge's queue ahead
    /// of the mesh) keeps what the lend brought (what the old shard got
    /// after the session left it) and the lent filter's later batches,
    /// then the state takes them after what it held: every message once,
    /// in order; a batch of a filter not lent, and QoS 0, are not kept.
    #[test]
    fn a_claim_whose_lend_comes_before_its_state_keeps_what_the_lend_brought() {
        let (_old, mut new, (token, state, routed, lent)) = lending_in_a_cluster();
        let filter = ByteString::from("m/#");
        let other = ByteString::from("o/#");
        new.took_from_cluster(6, Some(&filter), &from_nats("m/1", "too early"));
        new.lent(9, Some(filter.clone()), vec![from_nats("m/1", "gap")], true);
        // `m/#` also holds the escaped subject (a topic with a space).
        new.lent(9, None, vec![from_nats("m/a b", "escaped gap")], true);
        new.took_from_cluster(7, Some(&filter), &from_nats("m/1", "live"));
        new.took_from_cluster(8, None, &from_nats("m/a b", "escaped live"));
        new.took_from_cluster(9, Some(&other), &from_nats("o/1", "other filter"));
        let qos0 = Arc::new(vec![Message::new(
            ByteString::from("m/1"),
            bytes::Bytes::from_static(b"qos 0"),
            QoS::AtMostOnce,
            false,
        )]);
        new.took_from_cluster(10, Some(&filter), &qos0);
        new.claim_answered_after(token, state, routed, lent);
        new.took_from_cluster(11, Some(&filter), &from_nats("m/1", "not kept"));
        assert!(new.registry.lending.is_empty(), "it has its state now");
        let Some(Outcome::Granted(Some(state))) = take_claim_outcome(&new, 9) else {
            panic!("claim not granted with the state");
        };
        let kept = ["before", "gap", "escaped gap", "live", "escaped live"];
        assert_eq!(pending_payloads(&state), kept);
    }

    /// A claim whose state comes first is attaching, but takes a lent
    /// filter's messages as they come only once its lend began: what came
    /// before is among what the lend brings (without that, "gap" came
    /// twice); and its connection waits for the lend.
    #[test]
    fn an_attaching_claim_takes_a_lent_filters_messages_from_its_lend_on() {
        let (_old, mut new, (token, state, routed, lent)) = lending_in_a_cluster();
        new.claim_answered_after(token, state, routed, lent);
        let waits = |shard: &Shard| match shard.registry.claims.get(&9) {
            Some(PendingClaim {
                outcome: Some(Outcome::Granted(Some(state))),
                lend: Some(lend),
                ..
            }) => lend.waits(state),
            _ => false,
        };
        assert!(waits(&new), "the connection waits for the lend");
        let filter = ByteString::from("m/#");
        let gap = from_nats("m/1", "gap");
        new.took_from_cluster(6, Some(&filter), &gap);
        new.route_from_cluster(Some("m/#"), &gap);
        new.lent(9, Some(filter.clone()), vec![gap], true);
        assert!(waits(&new), "the escaped subject's lend is still to come");
        new.lent(9, None, Vec::new(), true);
        assert!(!waits(&new), "every lend began");
        let live = from_nats("m/1", "live");
        new.took_from_cluster(7, Some(&filter), &live);
        new.route_from_cluster(Some("m/#"), &live);
        let Some(Outcome::Granted(Some(state))) = take_claim_outcome(&new, 9) else {
            panic!("claim not granted with the state");
        };
        assert_eq!(pending_payloads(&state), ["before", "gap", "live"]);
    }

    /// A lend for a claim gone meanwhile, or for another node's take-over
    /// (whose tail brings NATS's messages), is dropped.
    #[test]
    fn a_lend_for_a_claim_gone_or_away_is_dropped() {
        let mut shard = crate::shard::testing::shard_with(1, 2, Config::default());
        shard.lent(4, Some("m/#".into()), vec![from_nats("m/1", "x")], true);
        assert!(shard.registry.lending.is_empty(), "no claim 4");
        pending(&mut shard, "mover", 9);
        if let Some(claim) = shard.registry.claims.get_mut(&9) {
            claim.away = true;
        }
        shard.lent(9, Some("m/#".into()), vec![from_nats("m/1", "x")], true);
        let lend = shard.registry.claims.get(&9).map(|c| c.lend.is_some());
        assert_eq!(lend, Some(false), "away: the tail has it");
    }

    /// The outcome of claim `token` of `shard`, cloned, leaving the claim.
    fn take_claim_outcome(shard: &Shard, token: u64) -> Option<Outcome> {
        match shard.registry.claims.get(&token)?.outcome.as_ref()? {
            Outcome::Granted(state) => Some(Outcome::Granted(state.clone())),
            Outcome::Superseded => Some(Outcome::Superseded),
        }
    }

    /// In a cluster, a session moving between two shards of the node (a
    /// CONNECT here whose id the node had on another shard; the record
    /// names this node, so the bridge grants it without a state or a
    /// tail) keeps what was routed meanwhile as outside one: the state
    /// catches up from the old shard's positions, and the claim is
    /// attaching from the node's answer on, through the bridge's grant,
    /// until its connection attaches.
    #[test]
    fn in_a_cluster_a_session_moving_between_shards_of_the_node_keeps_what_was_routed() {
        let (mut old, mut new, controls, _) = moving_in_a_cluster(1, false);
        let (token, state, routed, lent) = claimed(&mut old, 1);
        new.claim_answered_after(token, state, routed, lent);
        new.route(&qos1("m/2", "before the bridge's answer"));
        new.cluster_claim_answered_after(9, ClaimAnswer::Granted(None), None);
        new.route(&qos1("m/3", "granted, not attached"));
        let Some(Some(state)) = new.take_claim(9) else {
            panic!("granted with its state");
        };
        assert_eq!(
            pending_payloads(&state),
            [
                "during",
                "before the bridge's answer",
                "granted, not attached"
            ]
        );
        assert!(reported(&controls).is_none(), "not a hand-over: no tail");
    }

    /// A claim for another node's take-over (`PendingClaim::away`) gets
    /// the state from the shard that held it and adds nothing to it:
    /// it reports to the bridge the positions the state holds, and the
    /// tail brings what this node routed beyond them (a catch-up here sent
    /// that twice, in the cluster's e2e tests); nor is it attaching.
    #[test]
    fn a_claim_for_another_nodes_take_over_reports_what_its_state_holds() {
        let (mut old, mut new, controls, at) = moving_in_a_cluster(1, true);
        let (token, state, routed, lent) = claimed(&mut old, 1);
        new.claim_answered_after(token, state, routed, lent);
        new.route(&qos1("m/2", "after the answer"));
        assert!(new.registry.attaching.is_empty());
        let Some(Some(state)) = new.take_claim(9) else {
            panic!("granted with its state");
        };
        assert!(pending_payloads(&state).is_empty());
        let seen = reported(&controls).expect("the state's positions reported");
        assert!(!seen.routed(0, at), "the old shard's, at the eviction");
    }

    /// A session between two shards of the node (its claim on shard 1
    /// still waiting for the state) that another node takes over: the
    /// claim made for that take-over (on shard 0) gets the state that
    /// caught up on shard 1, and reports the positions it came with,
    /// shard 1's, not those of the shard it left: what shard 0 routed
    /// after the eviction is in the state, and not in the tail.
    #[test]
    fn a_session_between_two_shards_handed_away_reports_what_its_state_caught_up() {
        let (mut old, mut new, controls, at) = moving_in_a_cluster(0, false);
        let (token, state, routed, lent) = claimed(&mut old, 1);
        // Another node's take-over claims the id on shard 0 before the
        // state reached shard 1.
        pending(&mut old, "mover", 3);
        if let Some(claim) = old.registry.claims.get_mut(&3) {
            claim.away = true;
        }
        new.evict("mover", Some(9), 0, 3, false);
        new.claim_answered_after(token, state, routed, lent);
        let (token, state, routed, lent) = claimed(&mut new, 0);
        assert_eq!(token, 3);
        old.claim_answered_after(token, state, routed, lent);
        let Some(Some(state)) = old.take_claim(3) else {
            panic!("granted with its state");
        };
        assert_eq!(pending_payloads(&state), ["during"]);
        let seen = reported(&controls).expect("the state's positions reported");
        assert!(seen.routed(0, at), "shard 1's positions, past the eviction");
    }

    #[test]
    fn take_over_hands_a_persistent_session_to_the_new_claim() {
        let mut shard = shard();
        let old = connect(&mut shard, "dev-1", false, "cmd/dev-1");
        let other = connect(&mut shard, "dev-2", true, "cmd/dev-2");
        // A new CONNECT claims the id: the home (this shard) evicts the old.
        pending(&mut shard, "dev-1", 7);
        shard.home_claim(ByteString::from("dev-1"), 0, 7, false);
        assert_eq!(shard.session_key("dev-1"), None, "old session gone");
        assert_eq!(shard.session_key("dev-2"), Some(other));
        assert!(shard.sessions.get(old as usize).is_none());
        let Some(PendingClaim {
            outcome: Some(Outcome::Granted(Some(state))),
            ..
        }) = shard.registry.claims.remove(&7)
        else {
            panic!("claim not granted with the old state");
        };
        assert_eq!(&*state.subscriptions[0].0, "cmd/dev-1");
        // The new connection resumes it: found by id, subscribed again.
        let new = shard.insert_session(Session::new(ByteString::from("dev-1"), false, state));
        assert_eq!(shard.session_key("dev-1"), Some(new));
        assert_eq!(shard.router.len(), 2);
        // Every id lives on its home (the only shard): no home records.
        assert_eq!(shard.registry.homed_elsewhere(), 0);
        shard.remove_session(new);
        shard.release("dev-1", 7);
        assert_eq!(shard.session_key("dev-1"), None);
        assert_eq!(shard.by_client_id.len(), 1);
        // The id is free: a new claim starts fresh.
        pending(&mut shard, "dev-1", 8);
        shard.home_claim(ByteString::from("dev-1"), 0, 8, false);
        assert!(matches!(
            shard
                .registry
                .claims
                .get(&8)
                .and_then(|c| c.outcome.as_ref()),
            Some(Outcome::Granted(None))
        ));
    }

    #[test]
    fn home_records_only_ids_held_by_other_shards() {
        let mut home = crate::shard::testing::shard_with(0, 2, Config::default());
        let id = (0..)
            .map(|i| format!("c{i}"))
            .find(|id| home_shard(id, 2) == 0)
            .unwrap_or_default();
        let take_outbox = |shard: &mut Shard| std::mem::take(&mut shard.outbox);
        // Shard 1 claims the id: recorded, granted fresh over the mesh.
        home.home_claim(ByteString::from(id.as_str()), 1, 1, false);
        assert_eq!(home.registry.homed_elsewhere(), 1);
        assert!(matches!(
            take_outbox(&mut home)[..],
            [(
                1,
                ShardMsg::Claimed {
                    token: 1,
                    state: None,
                    routed: None,
                    lent: None,
                }
            )]
        ));
        // A connection on the home claims it: shard 1 must evict, no record.
        pending(&mut home, &id, 2);
        home.home_claim(ByteString::from(id.as_str()), 0, 2, false);
        assert_eq!(home.registry.homed_elsewhere(), 0);
        assert!(matches!(
            take_outbox(&mut home)[..],
            [(
                1,
                ShardMsg::Evict {
                    to_shard: 0,
                    token: 2,
                    ..
                }
            )]
        ));
        // Shard 1's late release does not forget the new owner: a claim from
        // shard 1 now supersedes the home's waiting claim.
        home.home_release(&id, 1, 1);
        home.home_claim(ByteString::from(id.as_str()), 1, 3, false);
        assert_eq!(home.registry.homed_elsewhere(), 1);
        assert_eq!(
            home.registry.claims.get(&2).and_then(|c| c.superseded_by),
            Some((1, 3, false))
        );
        // The state shard 1 hands over for claim 2 goes on to claim 3.
        home.claim_answered(2, Some(SessionState::default()));
        assert!(matches!(
            home.registry
                .claims
                .get(&2)
                .and_then(|c| c.outcome.as_ref()),
            Some(Outcome::Superseded)
        ));
        assert!(matches!(
            take_outbox(&mut home)[..],
            [(
                1,
                ShardMsg::Claimed {
                    token: 3,
                    state: Some(_),
                    routed: Some(_),
                    lent: None,
                }
            )]
        ));
        // A late release of shard 1's older claim 1 does not forget claim 3.
        home.home_release(&id, 1, 1);
        assert_eq!(home.registry.homed_elsewhere(), 1);
        home.home_release(&id, 1, 3);
        assert_eq!(home.registry.homed_elsewhere(), 0);
    }

    #[test]
    fn home_shard_is_stable_and_in_range() {
        for n in 1..8 {
            for id in ["a", "client-1", "", "ünï"] {
                let h = home_shard(id, n);
                assert!(h < n);
                assert_eq!(h, home_shard(id, n));
            }
        }
        // Spread: 1000 ids over 4 shards all get some.
        let mut counts = [0; 4];
        for i in 0..1000 {
            counts[home_shard(&format!("c{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
    }
}

/// A randomized model of the claim protocol: several shards exchange their
/// claim messages in a random order (any message in flight may arrive next,
/// across and within channels), connection tasks run late, give up or end at
/// random, and after every step at most one session per client id exists
/// across all shards. Once everything in flight arrived, the home's record
/// names exactly the claim whose session holds the id, and a clean CONNECT
/// leaves nothing behind. (This model found the answered-but-not-attached
/// window and the eviction of a newer claim by a late Evict.)
#[cfg(test)]
mod claim_model {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::session::link::Link;
    use crate::shard::SessionKey;
    use crate::test_rng::XorShift;

    /// Shards in the model: three, so that a take-over can involve the
    /// home, the old shard and the new shard all different.
    const SHARDS: usize = 3;
    /// Client ids in the model; with three shards their homes differ.
    const IDS: [&str; 3] = ["a", "b", "c"];
    /// Random steps per run, and runs (seeds).
    const STEPS: usize = 400;
    const RUNS: u64 = 300;

    /// A connection task of the model.
    enum Task {
        /// Waiting for the answer to claim `token` of `shard`.
        Waiting {
            shard: usize,
            token: u64,
            clean: bool,
        },
        /// Attached as session `key` with connection `conn_id`.
        Attached {
            shard: usize,
            key: SessionKey,
            conn_id: u64,
        },
    }

    /// The model's world: shards, messages in flight, tasks.
    struct World {
        shards: Vec<Shard>,
        in_flight: Vec<(usize, ShardMsg)>,
        tasks: Vec<Task>,
        rng: XorShift,
    }

    impl World {
        fn new(seed: u64) -> World {
            let config = Arc::new(Config::default());
            let auth = Arc::new(crate::security::auth::Auth::open());
            World {
                shards: (0..SHARDS)
                    .map(|id| Shard::new(id, SHARDS, config.clone(), auth.clone()))
                    .collect(),
                in_flight: Vec::new(),
                tasks: Vec::new(),
                rng: XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            }
        }

        fn below(&mut self, n: usize) -> usize {
            (self.rng.next() % n as u64) as usize
        }

        /// Moves every shard's outbox into the messages in flight.
        fn collect_outboxes(&mut self) {
            for shard in &mut self.shards {
                self.in_flight.append(&mut shard.outbox);
            }
        }

        /// A CONNECT of `id` on `shard`.
        fn connect(&mut self, shard: usize, id: &str, clean: bool) {
            let token = self.shards[shard].start_claim(ByteString::from(id), clean);
            self.tasks.push(Task::Waiting {
                shard,
                token,
                clean,
            });
        }

        /// Delivers message `i` of those in flight.
        fn deliver(&mut self, i: usize) {
            let (to, msg) = self.in_flight.swap_remove(i);
            self.shards[to].handle_control(msg);
        }

        /// Runs task `i` as its connection task would when woken; `give_up`:
        /// a waiting task times out instead if not answered. False when the
        /// task ended.
        fn run_task(&mut self, i: usize, give_up: bool) -> bool {
            match self.tasks[i] {
                Task::Waiting {
                    shard,
                    token,
                    clean,
                } => {
                    let s = &mut self.shards[shard];
                    let Some(claim) = s.registry.claims.get_mut(&token) else {
                        return false;
                    };
                    match claim.outcome.take() {
                        Some(Outcome::Granted(state)) => {
                            let id = claim.client_id.clone();
                            s.registry.claims.remove(&token);
                            let conn_id = s.new_conn_id();
                            let mut session = Session::new(id, clean, state.unwrap_or_default());
                            session.claim = token;
                            session.link = Some(Link::new(conn_id, i32::MIN, 0, 0));
                            let key = s.insert_session(session);
                            self.tasks[i] = Task::Attached {
                                shard,
                                key,
                                conn_id,
                            };
                            true
                        }
                        Some(Outcome::Superseded) => {
                            s.registry.claims.remove(&token);
                            false
                        }
                        None if give_up => {
                            claim.abandoned = true;
                            false
                        }
                        None => true,
                    }
                }
                Task::Attached {
                    shard,
                    key,
                    conn_id,
                } => {
                    // The connection ends (or finds it was taken over).
                    self.shards[shard].end_connection(key, conn_id);
                    false
                }
            }
        }

        /// Every session of `id`, across shards: (shard, key, claim).
        fn sessions_of(&self, id: &str) -> Vec<(usize, SessionKey, u64)> {
            let mut found = Vec::new();
            for shard in &self.shards {
                for (key, s) in shard.sessions.iter() {
                    if &*s.client_id == id {
                        found.push((shard.id, key as SessionKey, s.claim));
                    }
                }
            }
            found
        }

        /// At most one session per id at any time, found by its shard's index.
        fn check_one_session(&self, seed: u64, step: usize) {
            for id in IDS {
                let sessions = self.sessions_of(id);
                assert!(
                    sessions.len() <= 1,
                    "seed {seed} step {step}: sessions of {id}: {sessions:?}"
                );
                for &(shard, key, _) in &sessions {
                    assert_eq!(self.shards[shard].session_key(id), Some(key));
                }
            }
        }

        /// Delivers everything and runs every task until nothing moves (no
        /// task gives up: every claim is answered).
        fn settle(&mut self, seed: u64) {
            loop {
                self.collect_outboxes();
                if !self.in_flight.is_empty() {
                    let i = self.below(self.in_flight.len());
                    self.deliver(i);
                    self.check_one_session(seed, usize::MAX);
                    continue;
                }
                let before = self.tasks.len();
                let mut i = 0;
                let mut moved = false;
                while i < self.tasks.len() {
                    let waiting = matches!(self.tasks[i], Task::Waiting { .. });
                    if !waiting {
                        i += 1;
                        continue;
                    }
                    let was_answered = self.answered(i);
                    if !self.run_task(i, false) {
                        self.tasks.swap_remove(i);
                        moved = true;
                        continue;
                    }
                    moved |= was_answered;
                    i += 1;
                }
                self.collect_outboxes();
                if !moved && self.in_flight.is_empty() && before == self.tasks.len() {
                    return;
                }
            }
        }

        /// Whether waiting task `i` has its answer.
        fn answered(&self, i: usize) -> bool {
            match self.tasks[i] {
                Task::Waiting { shard, token, .. } => self.shards[shard]
                    .registry
                    .claims
                    .get(&token)
                    .is_none_or(|c| c.outcome.is_some()),
                Task::Attached { .. } => false,
            }
        }

        /// Quiescent: each id's home records exactly its session's claim
        /// when the session is on another shard, and nothing else.
        fn check_records(&self, seed: u64) {
            for id in IDS {
                let home = &self.shards[home_shard(id, SHARDS)];
                let record = home.registry.homes.get(id).copied();
                let expected = match self.sessions_of(id)[..] {
                    [(shard, _, token)] if shard != home.id => Some(Owner { shard, token }),
                    _ => None,
                };
                assert_eq!(record, expected, "seed {seed}: home record of {id}");
            }
            for shard in &self.shards {
                assert!(
                    shard.registry.claims.values().all(|c| c.abandoned),
                    "seed {seed}: claims left waiting on shard {}",
                    shard.id
                );
            }
        }
    }

    #[test]
    fn claims_in_any_order_leave_one_session_per_id() {
        // The ids' homes: one per shard, so every role is played.
        let mut homes: Vec<usize> = IDS.iter().map(|id| home_shard(id, SHARDS)).collect();
        homes.sort_unstable();
        homes.dedup();
        assert!(homes.len() >= 2, "model ids all homed on one shard");
        for seed in 1..=RUNS {
            let mut world = World::new(seed);
            for step in 0..STEPS {
                world.collect_outboxes();
                match world.below(10) {
                    0..=2 => {
                        let shard = world.below(SHARDS);
                        let id = IDS[world.below(IDS.len())];
                        let clean = world.below(2) == 0;
                        world.connect(shard, id, clean);
                    }
                    3..=6 if !world.in_flight.is_empty() => {
                        let i = world.below(world.in_flight.len());
                        world.deliver(i);
                    }
                    _ if !world.tasks.is_empty() => {
                        let i = world.below(world.tasks.len());
                        // Rarely, a waiting connection times out.
                        let give_up = world.below(20) == 0;
                        if !world.run_task(i, give_up) {
                            world.tasks.swap_remove(i);
                        }
                    }
                    _ => {}
                }
                world.check_one_session(seed, step);
            }
            world.settle(seed);
            world.check_records(seed);
            // A clean CONNECT per id, then its DISCONNECT: nothing is left.
            for (n, id) in IDS.iter().enumerate() {
                world.connect(n % SHARDS, id, true);
            }
            world.settle(seed);
            while !world.tasks.is_empty() {
                let i = world.tasks.len() - 1;
                if !world.run_task(i, false) {
                    world.tasks.swap_remove(i);
                }
                world.settle(seed);
            }
            for id in IDS {
                assert_eq!(world.sessions_of(id), [], "seed {seed}: {id} left behind");
            }
            world.check_records(seed);
        }
    }
}
