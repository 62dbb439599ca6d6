//! The retained message store (§3.3.1.3), one replica per shard.
//!
//! Every PUBLISH reaches every shard (locally or over the mesh), so each shard
//! applies retained updates to its own copy and answers SUBSCRIBE from it
//! without asking anyone. Updates from one publisher arrive in order
//! everywhere; two publishers on different shards racing on the same topic may
//! leave replicas disagreeing until the next update (documented in README).

use ahash::AHashMap;
use bytestring::ByteString;

use crate::protocol::message::Message;
use crate::protocol::topic;

/// Retained messages by topic.
#[derive(Debug, Default)]
pub struct RetainStore {
    /// The last retained message of each topic.
    messages: AHashMap<ByteString, Message>,
}

impl RetainStore {
    /// Stores, replaces or (empty payload, §3.3.1.3) deletes a retained message.
    pub fn apply(&mut self, message: &Message) {
        if message.payload.is_empty() {
            self.messages.remove(&message.topic);
        } else {
            self.messages.insert(message.topic.clone(), message.clone());
        }
    }

    /// Calls `f` for every retained message matching `filter`.
    pub fn for_each_match(&self, filter: &str, mut f: impl FnMut(&Message)) {
        if !filter.contains(['+', '#']) {
            if let Some(m) = self.messages.get(filter) {
                f(m);
            }
            return;
        }
        for m in self.messages.values() {
            if topic::filter_matches(filter, &m.topic) {
                f(m);
            }
        }
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::v3::QoS;
    use bytes::Bytes;

    fn m(topic: &'static str, payload: &'static [u8]) -> Message {
        Message {
            topic: ByteString::from_static(topic),
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: None,
        }
    }

    fn matches(store: &RetainStore, filter: &str) -> Vec<Bytes> {
        let mut got = Vec::new();
        store.for_each_match(filter, |m| got.push(m.payload.clone()));
        got.sort();
        got
    }

    #[test]
    fn store_replace_delete() {
        let mut s = RetainStore::default();
        s.apply(&m("a/b", b"1"));
        s.apply(&m("a/c", b"2"));
        s.apply(&m("a/b", b"3"));
        assert_eq!(matches(&s, "a/b"), vec![Bytes::from_static(b"3")]);
        assert_eq!(matches(&s, "a/+").len(), 2);
        s.apply(&m("a/b", b""));
        assert_eq!(matches(&s, "a/#"), vec![Bytes::from_static(b"2")]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn wildcards_do_not_match_dollar_topics() {
        let mut s = RetainStore::default();
        s.apply(&m("$SYS/x", b"1"));
        assert!(matches(&s, "#").is_empty());
        assert_eq!(matches(&s, "$SYS/#").len(), 1);
    }
}
