//! SUBSCRIBE and UNSUBSCRIBE on a shard (§3.8, §3.10), for both protocol
//! versions: the checks, the router, the session's list, SUBACK and
//! UNSUBACK in the client's version, and the retained messages a new
//! subscription gets. A `$share/{ShareName}/{filter}` filter, from either
//! version, joins a shared subscription group instead of the router
//! ([`crate::shard::shared`]).

use std::num::NonZeroU32;

use bytes::BytesMut;
use bytestring::ByteString;

use crate::observe::log_limit::LogKind::SubscribeRefused;
use crate::observe::log_limit::limited;
use crate::protocol::Version;
use crate::protocol::topic;
use crate::protocol::v3::{self as codec, Subscribe};
use crate::protocol::v5::{self, ReasonCode, RetainHandling, SubscriptionOptions};
use crate::router::SharedFilter;
use crate::router::shared::{self, Parsed};
use crate::security::acl::{Coverage, Who};
use crate::session::Delivery;
use crate::session::outqueue::{Frame, OutFrame};
use crate::shard::{SessionKey, Shard, may_read};

/// A SUBACK held until the NATS server holds the node's subscriptions of
/// the filters it grants that were new to the node (docs/design/cluster.md
/// §6): a message another node publishes once the client has its SUBACK
/// then reaches it. Sent by `Ctx::release_subacks` with the retained
/// messages that follow it.
#[derive(Debug)]
pub struct HeldSuback {
    /// The session.
    key: SessionKey,
    /// Its connection then (None: none, as in unit tests): another
    /// connection of the session, or none, gets nothing.
    conn_id: Option<u64>,
    /// The SUBACK's bytes.
    suback: Box<[u8]>,
    /// The filters whose retained messages follow: filter, granted QoS,
    /// whether the ACL covers it only partly.
    retained: Vec<(ByteString, codec::QoS, bool)>,
    /// The SUBSCRIBE's Subscription Identifier (5.0).
    identifier: Option<NonZeroU32>,
    /// One per new filter, closed by the bridge once the server holds it.
    pub ready: Vec<async_channel::Receiver<()>>,
}

impl Shard {
    /// SUBSCRIBE (§3.8): adds each valid filter the ACL allows (`username`:
    /// the client's, for the ACL; a filter it covers only partly makes the
    /// session check read access per delivery), answers SUBACK with the
    /// granted QoS or a failure per filter (3.1.1: 0x80; 5.0: 0x8F Topic
    /// Filter invalid, 0x97 Quota exceeded, 0x87 Not authorized), then
    /// sends matching retained messages. A 3.1.1 SUBSCRIBE: every filter with the default
    /// options. A shared subscription (`$share/...`, §4.8.2) gets no
    /// retained messages; a malformed one is refused as an invalid filter.
    pub fn subscribe(&mut self, key: SessionKey, subscribe: Subscribe, username: Option<&str>) {
        let filters = subscribe
            .filters
            .into_iter()
            .map(|(filter, qos)| {
                let options = SubscriptionOptions {
                    qos,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: RetainHandling::SendAtSubscribe,
                };
                (filter, options)
            })
            .collect();
        self.subscribe_with(key, subscribe.packet_id, filters, None, username);
    }

    /// SUBSCRIBE of either version: [`Shard::subscribe`] with MQTT 5.0's
    /// Subscription Options per filter (§3.8.3.1) and Subscription
    /// Identifier (§3.8.2.1.2). No Local, Retain As Published and the
    /// identifier are kept with the session's subscription
    /// (`Session::set_subscription_options`); Retain Handling decides here
    /// which retained messages are sent: 0 always, 1 for a new subscription
    /// only, 2 never.
    pub fn subscribe_with(
        &mut self,
        key: SessionKey,
        packet_id: codec::PacketId,
        filters: Vec<(ByteString, SubscriptionOptions)>,
        identifier: Option<NonZeroU32>,
        username: Option<&str>,
    ) {
        let mut codes = Vec::with_capacity(filters.len());
        let mut granted_filters = Vec::with_capacity(filters.len());
        // The bridge's answers for the filters new to this shard.
        let mut ready = Vec::new();
        let checked_before = self
            .sessions
            .get(key as usize)
            .is_some_and(|s| s.read_check);
        for (whole, options) in filters {
            let qos = options.qos;
            // A shared subscription: the checks below apply to the filter
            // after the ShareName; the session keeps the whole string.
            let (share, filter) = match shared::parse(&whole) {
                Parsed::Plain => (None, whole),
                Parsed::Shared { filter, .. } => {
                    let inner = whole.slice_ref(filter);
                    (Some(whole), inner)
                }
                Parsed::Invalid => {
                    limited!(
                        SubscribeRefused,
                        debug,
                        "refused shared subscription {whole:?}: malformed"
                    );
                    codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            if topic::validate_topic_filter(&filter).is_err() {
                limited!(SubscribeRefused, debug, "refused topic filter {filter:?}");
                codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            }
            if topic::exceeds_levels(&filter, self.config.max_topic_levels) {
                limited!(
                    SubscribeRefused,
                    debug,
                    "refused topic filter {filter:?}: over max_topic_levels"
                );
                self.stats.subscriptions_refused += 1;
                codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            }
            let max_subscriptions = self.config.max_subscriptions_per_client;
            let Some(session) = self.sessions.get_mut(key as usize) else {
                return;
            };
            let subscriptions = &session.state.subscriptions;
            let stored: &str = share.as_deref().unwrap_or(&filter);
            if max_subscriptions > 0
                && subscriptions.len() >= max_subscriptions
                && !subscriptions.iter().any(|(f, _)| **f == *stored)
            {
                limited!(
                    SubscribeRefused,
                    debug,
                    "client {}: refused topic filter {filter:?}: max_subscriptions_per_client ({max_subscriptions}) reached",
                    session.client_id
                );
                self.stats.subscriptions_refused += 1;
                codes.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            let coverage = if self.auth.acl_enabled() {
                let who = Who {
                    client_id: &session.client_id,
                    username,
                };
                self.auth.subscription(who, &filter)
            } else {
                Coverage::Full
            };
            match coverage {
                Coverage::Full => {}
                Coverage::Partial => session.check_reads(username.map(ByteString::from)),
                Coverage::None => {
                    limited!(
                        SubscribeRefused,
                        debug,
                        "client {}: subscription to {filter:?} denied by the ACL",
                        session.client_id
                    );
                    self.stats.subscribe_denied += 1;
                    codes.push(ReasonCode::NOT_AUTHORIZED);
                    continue;
                }
            }
            if let Some(share) = share {
                // No retained messages for a shared subscription (§4.8.2).
                let stored = SharedFilter::from(&*share);
                let new = session.subscribe(stored.clone(), qos);
                // Its Subscription Identifier and Retain As Published go with
                // the copies its group sends it (`Session::deliver_shared`).
                session.set_subscription_options(stored, &options, identifier);
                if new && let Some(link) = &mut self.cluster {
                    ready.extend(link.subscribed(&share));
                }
                self.shared_join(key, share, qos);
                codes.push(ReasonCode::granted(qos));
                continue;
            }
            // The session keeps the router's copy of the filter string.
            let (added, shared) = self.router.subscribe_shared(&filter, key, qos);
            if added && let Some(link) = &mut self.cluster {
                ready.extend(link.subscribed(&filter));
            }
            let new = session.subscribe(shared.clone(), qos);
            session.set_subscription_options(shared, &options, identifier);
            codes.push(ReasonCode::granted(qos));
            let send_retained = match options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendAtSubscribeIfNew => new,
                RetainHandling::DoNotSend => false,
            };
            if send_retained {
                granted_filters.push((filter, qos, coverage == Coverage::Partial));
            }
        }
        let Some(session) = self.sessions.get_mut(key as usize) else {
            return;
        };
        if session.read_check && !checked_before {
            // Its memberships were announced unchecked: the shards that
            // choose it learn to check its reads.
            self.shared_refresh(key);
        }
        let Some(session) = self.sessions.get_mut(key as usize) else {
            return;
        };
        let mut suback = BytesMut::with_capacity(5 + codes.len());
        let encoded = match session.version {
            Version::V3 => {
                let codes: Vec<u8> = codes
                    .iter()
                    .map(|&code| {
                        if code.is_failure() {
                            codec::SUBACK_FAILURE
                        } else {
                            code.0
                        }
                    })
                    .collect();
                codec::encode_suback(packet_id, &codes, &mut suback).map_err(|e| e.to_string())
            }
            Version::V5 => {
                v5::encode_suback(packet_id, &v5::Properties::new(), &codes, &mut suback)
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(e) = encoded {
            // Cannot happen: the SUBSCRIBE was no larger than the SUBACK.
            log::error!("cannot encode SUBACK: {e}");
        }
        let held = HeldSuback {
            key,
            conn_id: session.link.as_ref().map(|l| l.conn_id),
            suback: Box::from(&suback[..]),
            retained: granted_filters,
            identifier,
            ready,
        };
        // Behind an earlier held SUBACK of the session, a SUBACK waits too:
        // they keep their order.
        let behind = self.held_subacks.iter().any(|h| h.key == key);
        if session.link.is_some() && (!held.ready.is_empty() || behind) {
            self.held_subacks.push(held);
        } else {
            self.answer_subscribe(held);
        }
        self.journal_session(key);
        self.share_subscriptions(key);
    }

    /// Queues a SUBACK and the retained messages that follow it.
    pub(super) fn answer_subscribe(&mut self, held: HeldSuback) {
        let HeldSuback {
            key,
            conn_id,
            suback,
            retained: granted_filters,
            identifier,
            ready: _,
        } = held;
        let Some(session) = self.sessions.get_mut(key as usize) else {
            return;
        };
        if conn_id.is_some() && session.link.as_ref().map(|l| l.conn_id) != conn_id {
            // Gone, or a later connection: this SUBSCRIBE was not its.
            return;
        }
        session.out.push(OutFrame::whole(Frame::from(&suback[..])));
        // Retained messages go after the SUBACK (§3.3.1.3); those of a
        // partly covered filter only where the ACL lets the client read.
        let limits = self.limits;
        for (filter, granted, partial) in granted_filters {
            let Shard {
                retained,
                sessions,
                auth,
                stats,
                ..
            } = self;
            let Some(session) = sessions.get_mut(key as usize) else {
                return;
            };
            let identifiers: &[NonZeroU32] = identifier.as_slice();
            retained.for_each_match(&filter, |m| {
                if partial && !may_read(auth, session, &m.topic) {
                    stats.read_denied += 1;
                    return;
                }
                if session.deliver_retained(m, granted, identifiers, &limits) == Delivery::Dropped {
                    stats.publish_dropped += 1;
                }
            });
        }
        self.mark_dirty(key);
    }

    /// Takes session `key`'s subscription `filter` out of the router (a
    /// shared one out of its group, unless `leave_group` is false: a
    /// session moving to another shard stays a member until its new shard
    /// announces it) and out of the cluster's interest.
    pub(super) fn drop_filter(&mut self, key: SessionKey, filter: &str, leave_group: bool) {
        if shared::is_shared(filter) {
            if leave_group {
                self.shared_leave(key, filter);
            }
        } else if !self.router.unsubscribe(filter, key) {
            return;
        }
        if let Some(link) = &mut self.cluster {
            link.unsubscribed(filter);
        }
    }

    /// UNSUBSCRIBE (§3.10): removes each filter and answers UNSUBACK (5.0:
    /// with 0x00 Success or 0x11 No subscription existed per filter).
    pub fn unsubscribe(&mut self, key: SessionKey, packet_id: u16, filters: &[ByteString]) {
        let mut codes = Vec::with_capacity(filters.len());
        for filter in filters {
            if let Some(session) = self.sessions.get_mut(key as usize)
                && session.unsubscribe(filter)
            {
                self.drop_filter(key, filter, true);
                codes.push(ReasonCode::SUCCESS);
            } else {
                codes.push(ReasonCode::NO_SUBSCRIPTION_EXISTED);
            }
        }
        if let Some(session) = self.sessions.get_mut(key as usize) {
            match session.version {
                Version::V3 => session.queue_control(&codec::unsuback(packet_id)),
                Version::V5 => {
                    let mut unsuback = BytesMut::new();
                    if let Err(e) = v5::encode_unsuback(
                        packet_id,
                        &v5::Properties::new(),
                        &codes,
                        &mut unsuback,
                    ) {
                        log::error!("cannot encode UNSUBACK: {e}");
                    }
                    session.queue_frame(&unsuback);
                }
            }
        }
        self.mark_dirty(key);
        for (filter, code) in filters.iter().zip(&codes) {
            if *code == ReasonCode::SUCCESS && shared::is_shared(filter) {
                self.pass_on_unsubscribed_share(key, filter);
            }
        }
        self.journal_session(key);
        self.share_subscriptions(key);
    }
}
