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

use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::Duration;

use ahash::AHashMap;
use bytestring::ByteString;
use log::debug;

use crate::mesh::ShardMsg;
use crate::session::link::CloseReason;
use crate::session::{Session, SessionState};
use crate::shard::{Ctx, Shard};

/// How long a CONNECT waits for its claim to be answered before the
/// connection is closed (the other shards are stuck or shutting down).
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of a claim.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// A later CONNECT with the same client id won while this one waited.
    #[error("a newer connection took over the client id")]
    Superseded,
    /// No answer in time.
    #[error("no answer from the client id's home shard in time")]
    TimedOut,
}

/// The outcome of a claim, once answered.
#[derive(Debug)]
enum Outcome {
    /// Granted, with the session state to resume if there is one.
    Granted(Option<SessionState>),
    /// A later claim for the same id won.
    Superseded,
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
}

/// This shard's part of the client-id registry.
#[derive(Debug, Default)]
pub struct Registry {
    /// For client ids homed here and held by *another* shard: that shard.
    /// An id held here has no entry: this shard's own sessions
    /// ([`Shard::session_key`]) and claims say where it is. An entry is a
    /// clone of the id (32 bytes) and the shard (40 with padding), at
    /// 2.2 buckets per entry when the table has just doubled: about 90 bytes
    /// per client. With one shard the table stays empty; with N shards it
    /// holds the (N-1)/N of the ids homed here that live elsewhere.
    homes: AHashMap<ByteString, usize>,
    /// Claims of this shard's connections waiting for an answer, by token.
    claims: AHashMap<u64, PendingClaim>,
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
/// answer: the previous session's state to resume (None: start fresh).
///
/// # Errors
/// [`RegistryError::Superseded`] when a later connection took the id first,
/// [`RegistryError::TimedOut`] when no answer came in [`CLAIM_TIMEOUT`].
pub async fn claim(
    ctx: &Ctx,
    client_id: ByteString,
    clean_session: bool,
) -> Result<Option<SessionState>, RegistryError> {
    let token = {
        let mut shard = ctx.shard.borrow_mut();
        let token = shard.registry.next_token;
        shard.registry.next_token += 1;
        shard.registry.claims.insert(
            token,
            PendingClaim {
                client_id: client_id.clone(),
                outcome: None,
                waker: None,
                superseded_by: None,
                abandoned: false,
            },
        );
        let home = home_shard(&client_id, shard.nr_shards);
        if home == shard.id {
            let me = shard.id;
            shard.home_claim(client_id, me, token, clean_session);
        } else {
            let new_shard = shard.id;
            shard.outbox.push((
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
    };
    ctx.send_outbox();
    let wait = poll_fn(|cx| {
        let mut shard = ctx.shard.borrow_mut();
        let Some(pending) = shard.registry.claims.get_mut(&token) else {
            return Poll::Ready(Ok(Outcome::Superseded));
        };
        match pending.outcome.take() {
            Some(outcome) => {
                shard.registry.claims.remove(&token);
                Poll::Ready(Ok(outcome))
            }
            None => {
                pending.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    });
    let outcome = match glommio::timer::timeout(CLAIM_TIMEOUT, wait).await {
        Ok(outcome) => outcome,
        Err(_) => {
            // Keep the claim, marked abandoned: a late answer is then kept offline
            // (see `claim_answered`), so a persistent session is not lost.
            if let Some(claim) = ctx.shard.borrow_mut().registry.claims.get_mut(&token) {
                claim.abandoned = true;
                claim.waker = None;
            }
            return Err(RegistryError::TimedOut);
        }
    };
    match outcome {
        Outcome::Granted(state) => Ok(state),
        Outcome::Superseded => Err(RegistryError::Superseded),
    }
}

impl Shard {
    /// At the home shard: `new_shard` claims `client_id`.
    ///
    /// The previous owner is the shard in `homes`, or else this shard or no
    /// shard: [`Shard::evict`] then finds the id's session or waiting claim
    /// here (and takes it over), or answers that there is nothing to resume.
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
            self.registry.homes.insert(record, new_shard)
        };
        match previous {
            Some(owner) if owner != self.id => self.outbox.push((
                owner,
                ShardMsg::Evict {
                    client_id,
                    to_shard: new_shard,
                    token,
                    clean_session,
                },
            )),
            _ => self.evict(&client_id, new_shard, token, clean_session),
        }
    }

    /// At the shard holding the session: close its connection and hand its
    /// state to the claim `(to_shard, token)`.
    pub fn evict(&mut self, client_id: &str, to_shard: usize, token: u64, clean_session: bool) {
        if let Some(key) = self.session_key(client_id)
            && let Some(session) = self.remove_session(key)
        {
            if let Some(mut link) = session.link {
                debug!("client {client_id} taken over by a new connection");
                link.close(CloseReason::TakenOver);
            }
            let state = (!clean_session && !session.clean_session).then_some(session.state);
            self.answer_claim(to_shard, token, state);
            return;
        }
        // No session yet: an earlier claim for this id may still be waiting
        // here; the newer claim wins and gets that one's state when it comes.
        let earlier = self.registry.claims.iter_mut().find(|(t, c)| {
            !(to_shard == self.id && **t == token)
                && c.client_id == client_id
                && c.outcome.is_none()
                && c.superseded_by.is_none()
        });
        if let Some((_, claim)) = earlier {
            claim.superseded_by = Some((to_shard, token, clean_session));
            return;
        }
        self.answer_claim(to_shard, token, None);
    }

    /// Answers the claim `token` of `shard`, locally or over the mesh.
    fn answer_claim(&mut self, shard: usize, token: u64, state: Option<SessionState>) {
        if shard == self.id {
            self.claim_answered(token, state);
        } else {
            self.outbox.push((
                shard,
                ShardMsg::Claimed {
                    token,
                    state: state.map(Box::new),
                },
            ));
        }
    }

    /// The answer to one of this shard's claims arrived.
    pub fn claim_answered(&mut self, token: u64, state: Option<SessionState>) {
        let Some(claim) = self.registry.claims.get_mut(&token) else {
            debug!("answer to unknown claim {token} dropped");
            return;
        };
        if let Some((to, later_token, later_clean)) = claim.superseded_by.take() {
            claim.outcome = Some(Outcome::Superseded);
            if let Some(waker) = claim.waker.take() {
                waker.wake();
            }
            if claim.abandoned {
                self.registry.claims.remove(&token);
            }
            let state = state.filter(|_| !later_clean);
            self.answer_claim(to, later_token, state);
            return;
        }
        if claim.abandoned {
            // The connection is gone. The home shard points here: park a
            // persistent session so it is not lost, or release the id.
            let client_id = claim.client_id.clone();
            self.registry.claims.remove(&token);
            match state {
                Some(state) => {
                    let _ = self.insert_session(Session::new(client_id, false, state));
                }
                None => self.release(&client_id),
            }
            return;
        }
        claim.outcome = Some(Outcome::Granted(state));
        if let Some(waker) = claim.waker.take() {
            waker.wake();
        }
    }

    /// A session of this shard ended: tell its home shard.
    pub fn release(&mut self, client_id: &str) {
        let home = home_shard(client_id, self.nr_shards);
        let shard = self.id;
        if home == self.id {
            self.home_release(client_id, shard);
        } else {
            let client_id = ByteString::from(client_id);
            self.outbox
                .push((home, ShardMsg::Release { client_id, shard }));
        }
    }

    /// At the home shard: the session on `shard` ended; forget it unless the
    /// id was claimed by another shard meanwhile. (A session on the home
    /// shard itself has no entry to forget.)
    pub fn home_release(&mut self, client_id: &str, shard: usize) {
        if self.registry.homes.get(client_id) == Some(&shard) {
            self.registry.homes.remove(client_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
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
            },
        );
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
        shard.release("dev-1");
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
                    state: None
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
        home.home_release(&id, 1);
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
                    state: Some(_)
                }
            )]
        ));
        home.home_release(&id, 1);
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
