//! Topic Aliases the broker assigns towards one MQTT 5.0 connection
//! (server to client, §3.3.2.3.4).
//!
//! A client that sends Topic Alias Maximum > 0 in CONNECT accepts aliases
//! 1 to that maximum from the server. fanmq then sends the first PUBLISH on
//! a topic with the topic and an alias, and later ones with an empty topic
//! and the alias only, so a fan-out of short messages on a long topic sends
//! fewer bytes.
//!
//! # Which alias, and when the table is full
//! The alias of a topic is not a per-connection counter but a function of
//! the topic and the connection's limit (`protocol::message::Encoded::alias_for`:
//! 1 + hash(topic) mod limit), so every subscriber of a shard with the
//! same limit uses the same alias for a topic, and a message's frames stay
//! shared: at most two MQTT 5.0 variants per message and limit (with the
//! topic, for connections that do not know the alias yet, and without).
//! The table below is then a direct-mapped cache: when another topic
//! already holds the alias, the new topic takes it over (sent with its topic
//! once, which remaps the alias in the client, §3.3.2.3.4); the old topic
//! does the same when it comes back. Replacement, not "keep the first N":
//! topics change over a connection's life and a hot topic should not stay
//! unaliased because a topic seen once came first. Not LRU: LRU would pick a
//! different alias per connection (the frames would no longer be shared)
//! and write its bookkeeping on every delivery. Two hot topics on the same
//! alias each cost their topic again (3 bytes more than no alias); a larger
//! limit makes that rarer.
//!
//! The table belongs to the connection, not to the session state: aliases
//! do not outlive a network connection (§3.3.2.3.4), so a reconnecting
//! client starts with none, and the QoS 1/2 messages it gets again (DUP) are
//! encoded whole, with their topic and no alias.

use std::num::NonZeroU16;

/// The topics this connection was told an alias for, at most `maximum`.
#[derive(Debug, Default)]
pub struct ServerAliases {
    /// Aliases the broker may use on this connection: the client's Topic
    /// Alias Maximum, capped by `server_topic_aliases`; 0: none (a 3.1.1
    /// connection, a 5.0 client that did not allow them, or the switch
    /// off).
    maximum: u16,
    /// (alias, topic) pairs the client knows, in the order they were set.
    /// A short list, searched in order: a fan-out subscriber has one or a
    /// few topics, and the list never holds more than `maximum` entries.
    /// The topic is a copy (not the message's shared topic, which may keep
    /// a publisher's whole read buffer alive).
    known: Vec<(NonZeroU16, Box<str>)>,
    /// The alias last set or found known, with its topic's number on the
    /// shard (`protocol::message::Encoded::topic_number`): inline, so that
    /// a delivery on the same topic as the previous one is one comparison,
    /// without reading `known` or the topic it holds (two cache misses per
    /// subscriber in a fan-out). Always a mapping the client has: it is
    /// set only from an entry of `known`, or with it.
    last: Option<(NonZeroU16, u64)>,
}

/// How a delivery on `topic` may use the alias the topic maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AliasState {
    /// The client maps the alias to this topic: send the topic empty.
    Known,
    /// The client maps the alias to nothing or to another topic: send the
    /// topic with the alias, and [`ServerAliases::remember`] it once queued.
    New,
}

impl ServerAliases {
    /// No aliases on this connection.
    pub const NONE: ServerAliases = ServerAliases {
        maximum: 0,
        known: Vec::new(),
        last: None,
    };

    /// A fresh table for a connection that accepts up to `client_maximum`
    /// aliases, of which the broker uses at most `server_maximum`.
    pub fn new(client_maximum: u16, server_maximum: u16) -> ServerAliases {
        ServerAliases {
            maximum: client_maximum.min(server_maximum),
            known: Vec::new(),
            last: None,
        }
    }

    /// The highest alias the broker uses on this connection, None when it
    /// uses none.
    pub fn maximum(&self) -> Option<NonZeroU16> {
        NonZeroU16::new(self.maximum)
    }

    /// Whether the client already maps `alias` to `topic`, whose number on
    /// the shard is `number`: one comparison when it is the last alias
    /// used, else a search of the table (which then makes it the last).
    #[inline]
    pub fn state(&mut self, alias: NonZeroU16, number: u64, topic: &str) -> AliasState {
        if self.last == Some((alias, number)) {
            return AliasState::Known;
        }
        self.search(alias, number, topic)
    }

    /// [`ServerAliases::state`] past the last alias: the table.
    #[inline(never)]
    fn search(&mut self, alias: NonZeroU16, number: u64, topic: &str) -> AliasState {
        match self.known.iter().find(|(a, _)| *a == alias) {
            Some((_, known)) if **known == *topic => {
                self.last = Some((alias, number));
                AliasState::Known
            }
            _ => AliasState::New,
        }
    }

    /// Records that a PUBLISH setting `alias` to `topic` (number `number`
    /// on the shard) was queued for the client (so it will have the
    /// mapping before any later frame).
    pub fn remember(&mut self, alias: NonZeroU16, number: u64, topic: &str) {
        if alias.get() > self.maximum {
            return;
        }
        match self.known.iter_mut().find(|(a, _)| *a == alias) {
            Some(entry) => entry.1 = Box::from(topic),
            None => self.known.push((alias, Box::from(topic))),
        }
        self.last = Some((alias, number));
    }

    /// The connection ended: forget every alias (they are per connection).
    pub fn clear(&mut self) {
        *self = ServerAliases::NONE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).unwrap()
    }

    #[test]
    fn the_client_maximum_and_the_server_cap_both_bound_it() {
        assert_eq!(ServerAliases::new(0, 16).maximum(), None);
        assert_eq!(ServerAliases::new(10, 0).maximum(), None);
        assert_eq!(ServerAliases::new(10, 16).maximum(), Some(alias(10)));
        assert_eq!(ServerAliases::new(100, 16).maximum(), Some(alias(16)));
    }

    #[test]
    fn an_alias_is_new_until_remembered_and_a_new_topic_replaces_it() {
        let mut t = ServerAliases::new(4, 16);
        assert_eq!(t.state(alias(2), 1, "a/b"), AliasState::New);
        t.remember(alias(2), 1, "a/b");
        assert_eq!(t.state(alias(2), 1, "a/b"), AliasState::Known);
        assert_eq!(t.state(alias(1), 1, "a/b"), AliasState::New);
        // Another topic on the same alias takes it over.
        assert_eq!(t.state(alias(2), 2, "c"), AliasState::New);
        t.remember(alias(2), 2, "c");
        assert_eq!(t.state(alias(2), 2, "c"), AliasState::Known);
        assert_eq!(t.state(alias(2), 1, "a/b"), AliasState::New);
        assert_eq!(t.known.len(), 1);
    }

    #[test]
    fn never_holds_an_alias_over_the_maximum_and_clear_forgets_all() {
        let mut t = ServerAliases::new(2, 16);
        t.remember(alias(3), 1, "x");
        assert_eq!(t.state(alias(3), 1, "x"), AliasState::New);
        t.remember(alias(1), 1, "x");
        t.remember(alias(2), 2, "y");
        assert_eq!(t.known.len(), 2);
        t.clear();
        assert_eq!(t.maximum(), None);
        assert_eq!(t.state(alias(1), 1, "x"), AliasState::New);
    }

    #[test]
    fn the_last_alias_is_a_shortcut_that_never_outlives_its_mapping() {
        let mut t = ServerAliases::new(1, 16);
        t.remember(alias(1), 7, "a");
        assert_eq!(t.last, Some((alias(1), 7)));
        assert_eq!(t.state(alias(1), 7, "a"), AliasState::Known);
        // Another topic takes the alias over: the shortcut follows it, so
        // the first topic's number no longer matches.
        t.remember(alias(1), 8, "b");
        assert_eq!(t.state(alias(1), 7, "a"), AliasState::New);
        assert_eq!(t.state(alias(1), 8, "b"), AliasState::Known);
        // A topic renumbered by the shard (its numbers started over) is
        // still found in the table, and becomes the shortcut.
        assert_eq!(t.state(alias(1), 9, "b"), AliasState::Known);
        assert_eq!(t.last, Some((alias(1), 9)));
    }
}
