//! Admin queries that need a shard's own state (client list, one client,
//! disconnect, subscriptions), answered on the shard.
//!
//! The HTTP thread sends a [`ShardRequest`] over each shard's bounded
//! `async-channel`; a task on the shard ([`serve_requests`]) awaits it (glommio
//! wakes a task from a foreign thread through its notifier), answers from the
//! shard's state in one short borrow, and replies over a std channel that the
//! HTTP thread waits on with a timeout. The work per request is bounded by
//! its `limit` (the HTTP side caps it), and nothing here touches the data
//! path: a request only reads sessions, or closes one connection.

use std::sync::mpsc::SyncSender;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::protocol::topic;
use crate::router::shared::{self, Parsed};
use crate::session::Session;
use crate::session::link::{CloseReason, TICKS_PER_SEC};
use crate::shard::{Ctx, SessionKey, Shard};

/// Requests a shard's channel holds before the HTTP thread's sends fail
/// (answered as 503): the HTTP thread is one thread, so a few suffice.
pub const REQUEST_QUEUE: usize = 16;

/// A question for one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// Sessions in slab order: skip `skip`, then at most `limit`.
    Clients {
        /// Sessions to skip.
        skip: usize,
        /// Most to return.
        limit: usize,
    },
    /// One client id's session, if it is on this shard.
    Client {
        /// The client id.
        client_id: String,
    },
    /// Close the connection of a client id, if it is on this shard.
    Disconnect {
        /// The client id.
        client_id: String,
    },
    /// Subscriptions (all, or those matching a topic name): skip `skip`,
    /// then at most `limit`.
    Subscriptions {
        /// Only filters matching this topic name, when given.
        topic: Option<String>,
        /// Subscriptions to skip.
        skip: usize,
        /// Most to return.
        limit: usize,
    },
    /// The members of shared subscription groups that are sessions of this
    /// shard (skip `skip`, then at most `limit`), and the size of the
    /// shard's replica of every group.
    Shared {
        /// Members to skip.
        skip: usize,
        /// Most to return.
        limit: usize,
    },
}

/// A shard's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A page of sessions, and how many there are in all on this shard
    /// (matching ones for subscriptions).
    Clients {
        /// Sessions on the shard.
        total: usize,
        /// The page.
        clients: Vec<ClientInfo>,
    },
    /// The client, when it is on this shard.
    Client(Option<ClientInfo>),
    /// True when the client was connected here and is now being closed.
    Disconnected(bool),
    /// A page of subscriptions and how many match on this shard.
    Subscriptions {
        /// Matching subscriptions on the shard.
        total: usize,
        /// The page.
        subscriptions: Vec<SubscriptionInfo>,
    },
    /// A page of this shard's shared subscription members.
    Shared {
        /// This shard's members, all groups together.
        total: usize,
        /// The page.
        members: Vec<SharedMemberInfo>,
        /// Groups in this shard's replica (every shard's members).
        replica_groups: usize,
        /// Members in this shard's replica (every shard's members).
        replica_members: usize,
        /// Of those, the connected ones.
        replica_connected: usize,
    },
}

/// A request and where to send its answer.
#[derive(Debug)]
pub struct ShardRequest {
    /// The question.
    pub query: Query,
    /// Where the answer goes (the HTTP thread waits on it with a timeout; a
    /// late answer is dropped).
    pub reply: SyncSender<Answer>,
}

/// One session as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientInfo {
    /// The client identifier.
    pub client_id: String,
    /// True while a connection is attached.
    pub connected: bool,
    /// The connection's peer address (looked up now, not stored).
    pub peer: Option<String>,
    /// The shard holding the session.
    pub shard: usize,
    /// When the connection attached, Unix seconds (None while offline).
    pub connected_since: Option<u64>,
    /// The MQTT version of its (latest) connection, as CONNECT's Protocol
    /// Level: 3 (MQTT 3.1), 4 (3.1.1) or 5 (5.0).
    pub protocol_version: u8,
    /// The CleanSession flag.
    pub clean_session: bool,
    /// Keep-alive in seconds (None while offline).
    pub keep_alive: Option<u16>,
    /// Number of subscriptions.
    pub subscriptions: usize,
    /// PUBLISH packets queued, not yet written.
    pub queued_messages: usize,
    /// Bytes queued, not yet written.
    pub queued_bytes: usize,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: usize,
    /// QoS 1/2 messages waiting for a slot in the inflight window.
    pub pending: usize,
}

/// One subscription as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubscriptionInfo {
    /// The subscriber.
    pub client_id: String,
    /// The topic filter as subscribed: for a shared subscription the whole
    /// `$share/{ShareName}/{filter}` (what UNSUBSCRIBE names).
    pub filter: String,
    /// For a shared subscription, its ShareName (the group); None for
    /// others.
    pub group: Option<String>,
    /// The granted QoS.
    pub qos: u8,
    /// The shard holding the session.
    pub shard: usize,
}

/// One member of a shared subscription group as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SharedMemberInfo {
    /// The group: the whole `$share/{ShareName}/{filter}`.
    pub group: String,
    /// The member's client id.
    pub client_id: String,
    /// The granted QoS.
    pub qos: u8,
    /// The shard holding the session.
    pub shard: usize,
    /// False while the member is an offline persistent session.
    pub connected: bool,
}

/// Answers the HTTP thread's requests on this shard until the channel closes.
pub async fn serve_requests(ctx: Ctx, requests: async_channel::Receiver<ShardRequest>) {
    while let Ok(request) = requests.recv().await {
        let answer = ctx.shard.borrow_mut().answer(request.query);
        // The HTTP thread may have given up waiting: nothing to do then.
        let _ = request.reply.try_send(answer);
    }
}

impl Shard {
    /// Answers an admin query from this shard's state.
    pub fn answer(&mut self, query: Query) -> Answer {
        match query {
            Query::Clients { skip, limit } => Answer::Clients {
                total: self.sessions.len(),
                clients: self
                    .sessions
                    .iter()
                    .skip(skip)
                    .take(limit)
                    .map(|(_, s)| self.client_info(s))
                    .collect(),
            },
            Query::Client { client_id } => Answer::Client(
                self.session_key(&client_id)
                    .and_then(|key| self.sessions.get(key as usize))
                    .map(|s| self.client_info(s)),
            ),
            Query::Disconnect { client_id } => {
                let link = self
                    .session_key(&client_id)
                    .and_then(|key| self.sessions.get_mut(key as usize))
                    .and_then(|s| s.link.as_mut());
                match link {
                    Some(link) => {
                        log::info!("admin API: disconnecting client {client_id}");
                        link.close(CloseReason::AdminDisconnect);
                        Answer::Disconnected(true)
                    }
                    None => Answer::Disconnected(false),
                }
            }
            Query::Subscriptions { topic, skip, limit } => self.subscriptions(topic, skip, limit),
            Query::Shared { skip, limit } => self.shared_members(skip, limit),
        }
    }

    /// A page of the shared subscription members that are sessions of this
    /// shard (the replica's entries for this shard are kept by this shard
    /// itself, so they are exact), with the replica's size.
    fn shared_members(&self, skip: usize, limit: usize) -> Answer {
        let own = self.shared.iter().flat_map(|group| {
            group
                .members
                .iter()
                .filter(|m| m.shard == self.id)
                .map(move |m| (group, m))
        });
        Answer::Shared {
            total: own.clone().count(),
            members: own
                .skip(skip)
                .take(limit)
                .map(|(group, m)| SharedMemberInfo {
                    group: group.share.to_string(),
                    client_id: m.client_id.to_string(),
                    qos: m.qos as u8,
                    shard: m.shard,
                    connected: m.online,
                })
                .collect(),
            replica_groups: self.shared.groups(),
            replica_members: self.shared.members(),
            replica_connected: self.shared.connected_members(),
        }
    }

    /// A page of subscriptions, shared ones (`$share/...`, this shard's
    /// members) included. With a topic, only the sessions the router or a
    /// matching group names are visited (work follows the number of
    /// matches); without, the walk stops once the page is full (work
    /// follows offset + limit).
    fn subscriptions(&mut self, topic: Option<String>, skip: usize, limit: usize) -> Answer {
        // Every subscription of this shard's sessions: the router's, and
        // the shared ones (not in the router).
        let all = self.router.len() + self.shared.members_of(self.id);
        if topic.is_none() && limit == 0 {
            return Answer::Subscriptions {
                total: all,
                subscriptions: Vec::new(),
            };
        }
        let keys: Vec<SessionKey> = match &topic {
            Some(topic) => {
                let mut keys = Vec::new();
                self.router.for_each_match(topic, |key, _| keys.push(key));
                let id = self.id;
                self.shared.for_each_matching_group(topic, |group| {
                    let here = group.members.iter().filter(|m| m.shard == id);
                    keys.extend(here.map(|m| m.key));
                });
                keys.sort_unstable();
                keys.dedup();
                keys
            }
            None => Vec::new(),
        };
        let sessions: Box<dyn Iterator<Item = &Session>> = match &topic {
            Some(_) => Box::new(
                keys.iter()
                    .filter_map(|&key| self.sessions.get(key as usize))
                    .map(|s| &**s),
            ),
            None => Box::new(self.sessions.iter().map(|(_, s)| &**s)),
        };
        let mut seen = 0;
        let mut subscriptions = Vec::new();
        for session in sessions {
            for (filter, qos) in &session.state.subscriptions {
                // A shared subscription matches by the filter after its
                // ShareName.
                let (group, matched) = match shared::parse(filter) {
                    Parsed::Shared { name, filter } => (Some(name), filter),
                    Parsed::Plain | Parsed::Invalid => (None, &**filter),
                };
                if let Some(topic) = &topic
                    && !topic::filter_matches(matched, topic)
                {
                    continue;
                }
                if seen >= skip && subscriptions.len() < limit {
                    subscriptions.push(SubscriptionInfo {
                        client_id: session.client_id.to_string(),
                        filter: filter.to_string(),
                        group: group.map(str::to_string),
                        qos: *qos as u8,
                        shard: self.id,
                    });
                }
                seen += 1;
                if topic.is_none() && subscriptions.len() >= limit && seen >= skip {
                    return Answer::Subscriptions {
                        total: all,
                        subscriptions,
                    };
                }
            }
        }
        Answer::Subscriptions {
            total: if topic.is_some() { seen } else { all },
            subscriptions,
        }
    }

    /// What the admin API shows of one session.
    fn client_info(&self, session: &Session) -> ClientInfo {
        let flows = session.state.flows.as_deref();
        let link = session.link.as_ref();
        ClientInfo {
            client_id: session.client_id.to_string(),
            connected: link.is_some(),
            peer: link
                .and_then(|l| crate::net::fd::peer_addr(l.socket()))
                .map(|a| a.to_string()),
            shard: self.id,
            connected_since: link.map(|l| self.unix_seconds_at(l.connected_at)),
            protocol_version: session.protocol_level,
            clean_session: session.clean_session,
            keep_alive: link.map(|l| l.keep_alive),
            subscriptions: session.state.subscriptions.len(),
            queued_messages: session.out.publishes(),
            queued_bytes: session.out.bytes(),
            inflight: flows.map_or(0, |f| f.inflight.len()),
            pending: flows.map_or(0, |f| f.pending.len()),
        }
    }

    /// Unix seconds of a keep-alive tick of this shard.
    fn unix_seconds_at(&self, ticks: u32) -> u64 {
        let ago = self.now_ticks().saturating_sub(ticks);
        let ago = Duration::from_millis(u64::from(ago) * u64::from(1000 / TICKS_PER_SEC));
        SystemTime::now()
            .checked_sub(ago)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::v3::QoS;
    use crate::session::SessionState;
    use bytestring::ByteString;

    fn shard_with(n: usize) -> Shard {
        let mut shard = crate::shard::testing::shard();
        for i in 0..n {
            let state = SessionState {
                subscriptions: smallvec::smallvec![(
                    crate::router::SharedFilter::from(format!("t/{i}/#")),
                    QoS::AtLeastOnce
                )],
                flows: None,
            };
            let mut session = Session::new(ByteString::from(format!("c{i}")), true, state);
            session.link = Some(crate::session::link::test_link());
            shard.insert_session(session);
        }
        shard
    }

    #[test]
    fn clients_page_and_one_client() {
        let mut shard = shard_with(5);
        let Answer::Clients { total, clients } = shard.answer(Query::Clients { skip: 1, limit: 2 })
        else {
            panic!("wrong answer");
        };
        assert_eq!(total, 5);
        let ids: Vec<&str> = clients.iter().map(|c| c.client_id.as_str()).collect();
        assert_eq!(ids, ["c1", "c2"]);
        assert!(clients[0].connected && clients[0].peer.is_none());
        let Answer::Client(Some(c)) = shard.answer(Query::Client {
            client_id: "c3".into(),
        }) else {
            panic!("c3 not found");
        };
        assert_eq!((c.subscriptions, c.shard), (1, 0));
        assert_eq!(
            shard.answer(Query::Client {
                client_id: "nope".into()
            }),
            Answer::Client(None)
        );
    }

    #[test]
    fn shared_subscriptions_are_listed_with_their_group() {
        use crate::shard::testing::attach;
        let mut shard = crate::shard::testing::shard();
        attach(&mut shard, "m", "$share/g/t/+", QoS::AtLeastOnce);
        attach(&mut shard, "p", "t/#", QoS::AtMostOnce);
        attach(&mut shard, "o", "$share/h/other", QoS::AtMostOnce);
        let page =
            |shard: &mut Shard, topic: Option<&str>| match shard.answer(Query::Subscriptions {
                topic: topic.map(str::to_string),
                skip: 0,
                limit: 10,
            }) {
                Answer::Subscriptions {
                    total,
                    mut subscriptions,
                } => {
                    subscriptions.sort_by(|a, b| a.client_id.cmp(&b.client_id));
                    let listed: Vec<(String, String, Option<String>)> = subscriptions
                        .into_iter()
                        .map(|s| (s.client_id, s.filter, s.group))
                        .collect();
                    (total, listed)
                }
                other => panic!("wrong answer {other:?}"),
            };
        let entry = |c: &str, f: &str, g: Option<&str>| (c.into(), f.into(), g.map(String::from));
        assert_eq!(
            page(&mut shard, Some("t/x")),
            (
                2,
                vec![
                    entry("m", "$share/g/t/+", Some("g")),
                    entry("p", "t/#", None)
                ]
            )
        );
        let (total, listed) = page(&mut shard, None);
        assert_eq!((total, listed.len()), (3, 3));
        assert_eq!(page(&mut shard, Some("$share/g/t")), (0, vec![]));
    }

    #[test]
    fn subscriptions_by_topic_and_disconnect() {
        let mut shard = shard_with(3);
        let Answer::Subscriptions {
            total,
            subscriptions,
        } = shard.answer(Query::Subscriptions {
            topic: Some("t/2/x".into()),
            skip: 0,
            limit: 10,
        })
        else {
            panic!("wrong answer");
        };
        assert_eq!(total, 1);
        assert_eq!(subscriptions[0].client_id, "c2");
        assert_eq!(subscriptions[0].qos, 1);
        let Answer::Subscriptions {
            total,
            subscriptions,
        } = shard.answer(Query::Subscriptions {
            topic: None,
            skip: 1,
            limit: 1,
        })
        else {
            panic!("wrong answer");
        };
        assert_eq!(total, 3);
        assert_eq!(subscriptions[0].filter, "t/1/#");
        assert_eq!(
            shard.answer(Query::Disconnect {
                client_id: "c1".into()
            }),
            Answer::Disconnected(true)
        );
        assert_eq!(
            shard.answer(Query::Disconnect {
                client_id: "zz".into()
            }),
            Answer::Disconnected(false)
        );
    }
}
