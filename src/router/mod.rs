//! The subscription trie: which subscribers a PUBLISH goes to. One [`Router`] per
//! shard, owned by that shard's executor: single-threaded, no locks.
//!
//! # Shape
//!
//! A trie of topic levels. Each node stands for a Topic Filter prefix and holds the
//! subscribers whose filter ends there, a map of exact child levels, and separate
//! slots for its `+` and `#` children. Nodes live in one arena (`Vec`) and refer to
//! each other by index, so that matching walks the trie with an explicit stack kept
//! in the router: no recursion (a client controls how deep topics and filters go,
//! up to 32k levels, so recursion could overflow the shard's stack) and no
//! allocation per PUBLISH once the scratch space has grown.
//!
//! # The hot path
//!
//! A 100k-subscriber fan-out is usually *one* matching node with every subscriber
//! on it. [`Router::for_each_match`] then walks that node's subscribers as a dense
//! array: no hashing, no allocation, no per-subscriber branch beyond the callback.
//! Only when several nodes match (overlapping subscriptions, §3.3.5) are the
//! subscribers merged in a reusable scratch map so that each is called once, with
//! the highest QoS granted among its matching filters.
//!
//! # Memory per subscription
//!
//! With `K = u32` an entry is `(u32, QoS)` = 8 bytes in the node's array (up to
//! twice that while the `Vec` has spare capacity). Nodes with more than
//! [`LINEAR_SCAN_MAX`] subscribers also keep a key -> position index for O(1)
//! removal: a `u32` position plus a control byte per bucket, at a load of 7/8 to
//! 7/16, so roughly 6 to 12 more bytes per subscriber. Small nodes skip the index
//! and find a subscriber by a linear scan. The subscriber's session shares the
//! node's copy of the filter string ([`SharedFilter`]), so a subscriber adds no
//! string of its own. A node itself is 144 bytes (64-bit target) plus its level
//! name, its filter string and its slot in the parent's child map, so a filter
//! that only one client uses (`devices/1234/cmd`) costs about 300 bytes.
//!
//! # Memory returning
//!
//! Unsubscribing prunes nodes that no longer hold subscribers or children: their
//! maps and arrays are freed at once and their arena slot is reused by the next new
//! node. The arena itself is released when the router becomes empty. Subscriber
//! arrays shrink when they are mostly empty, and the index is dropped when a node
//! falls back to a few subscribers.

pub mod retain;
pub mod shared;

use std::hash::Hash;
use std::sync::Arc;

use ahash::AHashMap;
use hashbrown::HashTable;

use crate::protocol::topic::{
    LEVEL_SEPARATOR, MULTI_LEVEL_WILDCARD, SINGLE_LEVEL_WILDCARD, is_sys_topic,
};
use crate::protocol::v3::QoS;

/// Index of a node in the router's arena.
type NodeId = usize;

/// The root node: the empty prefix, never freed.
const ROOT: NodeId = 0;

/// Up to this many subscribers a node finds one by scanning its array; above it, a
/// hash index gives O(1) removal (mass disconnects from a 1M-subscriber node must
/// not be quadratic). Small: a scan of 16 entries of 8 bytes is two cache lines.
pub const LINEAR_SCAN_MAX: usize = 16;

/// A Topic Filter string shared by the router and every session subscribed to
/// it: the node where the filter ends keeps one copy and hands out clones (a
/// reference count, no allocation), so 100k subscribers of `bench/fanout` hold
/// one string, not 100k. An `Arc<str>` (16 bytes) rather than a `ByteString`
/// (32 bytes): a session stores it next to the granted QoS, and `Send`, because
/// a session's state moves to another shard on take-over.
pub type SharedFilter = Arc<str>;

/// The subscribers whose Topic Filter ends at one node.
#[derive(Debug)]
struct Subscribers<K> {
    /// (subscriber, granted QoS) pairs, dense, in no particular order: the array the
    /// fan-out walks.
    entries: Vec<(K, QoS)>,
    /// Position of each subscriber in `entries`, only kept above
    /// [`LINEAR_SCAN_MAX`] entries (boxed so small nodes pay one pointer for it).
    index: Option<Box<Index>>,
}

/// Positions in a node's `entries`, found by subscriber key: a table of `u32`
/// positions hashed by the key *stored in the entry* (the key is not repeated
/// in the table). 4 bytes plus a control byte per bucket, where a
/// `HashMap<K, usize>` took 16 + 1 (at 1M subscribers on one node, 2M buckets:
/// 10 MB instead of 34 MB). Used only on subscribe and unsubscribe, never on
/// delivery.
#[derive(Debug)]
struct Index {
    /// Positions in `entries`, each one present once.
    positions: HashTable<u32>,
    /// The hasher of subscriber keys for `positions`.
    hasher: ahash::RandomState,
}

impl Index {
    /// An index of every entry of `entries`.
    fn of<K: Copy + Eq + Hash>(entries: &[(K, QoS)]) -> Index {
        let mut index = Index {
            positions: HashTable::with_capacity(entries.len()),
            hasher: ahash::RandomState::new(),
        };
        for position in 0..entries.len() {
            index.insert(entries, position);
        }
        index
    }

    /// Where `key` is in `entries`.
    fn find<K: Copy + Eq + Hash>(&self, entries: &[(K, QoS)], key: K) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        self.positions
            .find(hash, |&p| {
                entries.get(p as usize).is_some_and(|e| e.0 == key)
            })
            .map(|&p| p as usize)
    }

    /// Records the entry at `position` (already in `entries`).
    fn insert<K: Copy + Eq + Hash>(&mut self, entries: &[(K, QoS)], position: usize) {
        let Index { positions, hasher } = self;
        let Some(&(key, _)) = entries.get(position) else {
            return;
        };
        let rehash = |&p: &u32| {
            entries
                .get(p as usize)
                .map_or(0, |&(k, _)| hasher.hash_one(k))
        };
        positions.insert_unique(hasher.hash_one(key), position as u32, rehash);
    }

    /// Forgets `position`, the place of `key`.
    fn remove<K: Copy + Eq + Hash>(&mut self, key: K, position: usize) {
        let hash = self.hasher.hash_one(key);
        if let Ok(entry) = self.positions.find_entry(hash, |&p| p as usize == position) {
            entry.remove();
        }
    }

    /// The entry of `key` moved from position `from` to `to`.
    fn moved<K: Copy + Eq + Hash>(&mut self, key: K, from: usize, to: usize) {
        let hash = self.hasher.hash_one(key);
        if let Some(p) = self.positions.find_mut(hash, |&p| p as usize == from) {
            *p = to as u32;
        }
    }

    /// Gives back spare buckets when the table is mostly empty.
    fn shrink<K: Copy + Eq + Hash>(&mut self, entries: &[(K, QoS)]) {
        if self.positions.capacity() > 4 * self.positions.len() {
            let Index { positions, hasher } = self;
            positions.shrink_to_fit(|&p| {
                entries
                    .get(p as usize)
                    .map_or(0, |&(k, _)| hasher.hash_one(k))
            });
        }
    }
}

impl<K> Default for Subscribers<K> {
    fn default() -> Self {
        Subscribers {
            entries: Vec::new(),
            index: None,
        }
    }
}

impl<K: Copy + Eq + Hash> Subscribers<K> {
    /// Where `key` is in `entries`.
    fn position(&self, key: K) -> Option<usize> {
        match &self.index {
            Some(index) => index.find(&self.entries, key),
            None => self.entries.iter().position(|&(k, _)| k == key),
        }
    }

    /// Adds `key` with `qos`, or replaces its QoS. Returns true if it was new.
    fn insert(&mut self, key: K, qos: QoS) -> bool {
        if let Some(position) = self.position(key) {
            if let Some(entry) = self.entries.get_mut(position) {
                entry.1 = qos;
            }
            return false;
        }
        let position = self.entries.len();
        self.entries.push((key, qos));
        match &mut self.index {
            Some(index) => index.insert(&self.entries, position),
            None if self.entries.len() > LINEAR_SCAN_MAX => {
                self.index = Some(Box::new(Index::of(&self.entries)));
            }
            None => {}
        }
        true
    }

    /// Removes `key`. Returns true if it was there.
    fn remove(&mut self, key: K) -> bool {
        let Some(position) = self.position(key) else {
            return false;
        };
        let last = self.entries.len() - 1;
        if let Some(index) = &mut self.index {
            index.remove(key, position);
            // The last entry moves into the hole: point the index at its new place.
            if position != last
                && let Some(&(moved, _)) = self.entries.get(last)
            {
                index.moved(moved, last, position);
            }
        }
        self.entries.swap_remove(position);
        if let Some(index) = &mut self.index {
            // Hysteresis: drop the index well below the threshold so that a node
            // hovering around it does not rebuild it on every change.
            if self.entries.len() <= LINEAR_SCAN_MAX / 2 {
                self.index = None;
            } else {
                index.shrink(&self.entries);
            }
        }
        if self.entries.capacity() > 4 * self.entries.len() {
            self.entries.shrink_to(2 * self.entries.len());
        }
        true
    }

    /// Whether no subscriber's filter ends here.
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One trie node: a Topic Filter prefix.
#[derive(Debug)]
struct Node<K> {
    /// Subscribers whose filter ends exactly at this node.
    subscribers: Subscribers<K>,
    /// Children for exact levels (an empty level `""` included).
    children: AHashMap<Box<str>, NodeId>,
    /// Child for a `+` level, kept apart from `children` so matching never hashes
    /// a wildcard.
    plus: Option<NodeId>,
    /// Child for a `#` level: a leaf whose subscribers match this level and
    /// everything below.
    hash: Option<NodeId>,
    /// The Topic Filter that ends here, while it has subscribers: the one copy
    /// every subscriber's session shares ([`SharedFilter`]). 16 bytes per node.
    filter: Option<SharedFilter>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node {
            subscribers: Subscribers::default(),
            children: AHashMap::new(),
            plus: None,
            hash: None,
            filter: None,
        }
    }
}

impl<K> Node<K> {
    /// Whether the node holds nothing and can be pruned.
    fn is_unused(&self) -> bool {
        self.subscribers.entries.is_empty()
            && self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
    }
}

/// How a node hangs from its parent: used to walk a filter and to prune.
#[derive(Clone, Copy, Debug)]
enum Edge<'a> {
    /// A `+` level.
    Plus,
    /// A `#` level.
    Hash,
    /// An exact level.
    Exact(&'a str),
}

impl<'a> Edge<'a> {
    /// The edge for one level of a Topic Filter.
    fn of(level: &'a str) -> Self {
        match level {
            SINGLE_LEVEL_WILDCARD => Edge::Plus,
            MULTI_LEVEL_WILDCARD => Edge::Hash,
            exact => Edge::Exact(exact),
        }
    }
}

/// The subscriptions of one shard, matched against topics.
///
/// `K` is the subscriber key (the broker uses a slab index, `u32`). A subscription
/// is one (key, Topic Filter) pair with its granted QoS.
#[derive(Debug)]
pub struct Router<K> {
    /// Node arena; `nodes[ROOT]` is the root. Freed slots are listed in `free`.
    nodes: Vec<Node<K>>,
    /// Arena slots of pruned nodes, reused before the arena grows.
    free: Vec<NodeId>,
    /// Number of (key, filter) subscriptions.
    len: usize,
    /// Scratch: the walk's pending (node, position in the topic) pairs; a position
    /// of `None` means every level of the topic was consumed. Kept to avoid an
    /// allocation per PUBLISH.
    stack: Vec<(NodeId, Option<usize>)>,
    /// Scratch: nodes with subscribers that matched the current topic.
    matched: Vec<NodeId>,
    /// Scratch: subscriber -> highest QoS, used only when several nodes match.
    /// Keeps its capacity between publishes (one per shard).
    merged: AHashMap<K, QoS>,
}

impl<K: Copy + Eq + Hash> Default for Router<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Copy + Eq + Hash> Router<K> {
    /// An empty router.
    pub fn new() -> Self {
        Router {
            nodes: vec![Node::default()],
            free: Vec::new(),
            len: 0,
            stack: Vec::new(),
            matched: Vec::new(),
            merged: AHashMap::new(),
        }
    }

    /// Number of (key, filter) subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no subscription.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of live trie nodes, the root excluded: for metrics and for checking
    /// that pruning gives memory back.
    pub fn node_count(&self) -> usize {
        self.nodes.len().saturating_sub(1 + self.free.len())
    }

    /// The child of `id` along `edge`, if any.
    fn child(&self, id: NodeId, edge: Edge<'_>) -> Option<NodeId> {
        let node = self.nodes.get(id)?;
        match edge {
            Edge::Plus => node.plus,
            Edge::Hash => node.hash,
            Edge::Exact(level) => node.children.get(level).copied(),
        }
    }

    /// A fresh node slot.
    fn alloc(&mut self) -> NodeId {
        match self.free.pop() {
            Some(id) => id,
            None => {
                self.nodes.push(Node::default());
                self.nodes.len() - 1
            }
        }
    }

    /// Subscribes `key` to `filter` with granted QoS `qos`; a second subscription
    /// with the same key and filter replaces the QoS (§3.8.4). Returns true if the
    /// subscription is new.
    ///
    /// `filter` must already be valid ([`crate::protocol::topic::validate_topic_filter`]);
    /// an invalid one is stored literally and never panics.
    #[cfg(test)]
    pub fn subscribe(&mut self, filter: &str, key: K, qos: QoS) -> bool {
        self.subscribe_shared(filter, key, qos).0
    }

    /// [`Router::subscribe`], also handing back the router's copy of `filter`
    /// for the session to keep ([`SharedFilter`]: one string per filter, not
    /// one per subscriber). The copy is made by the filter's first subscriber
    /// and dropped by the router when its last one leaves; the sessions' clones
    /// stay valid on their own.
    pub fn subscribe_shared(&mut self, filter: &str, key: K, qos: QoS) -> (bool, SharedFilter) {
        let mut id = ROOT;
        for level in filter.split(LEVEL_SEPARATOR) {
            let edge = Edge::of(level);
            id = match self.child(id, edge) {
                Some(child) => child,
                None => {
                    let child = self.alloc();
                    if let Some(node) = self.nodes.get_mut(id) {
                        match edge {
                            Edge::Plus => node.plus = Some(child),
                            Edge::Hash => node.hash = Some(child),
                            Edge::Exact(level) => {
                                node.children.insert(level.into(), child);
                            }
                        }
                    }
                    child
                }
            };
        }
        let Some(node) = self.nodes.get_mut(id) else {
            // Cannot happen: `id` was just found or allocated.
            return (false, SharedFilter::from(filter));
        };
        let added = node.subscribers.insert(key, qos);
        let shared = node
            .filter
            .get_or_insert_with(|| SharedFilter::from(filter))
            .clone();
        if added {
            self.len += 1;
        }
        (added, shared)
    }

    /// Removes the subscription of `key` to `filter`. Returns true if it existed.
    /// Nodes left without subscribers or children are pruned.
    pub fn unsubscribe(&mut self, filter: &str, key: K) -> bool {
        // The path from the root: (parent, edge to the child) for each level.
        let mut path = Vec::new();
        let mut id = ROOT;
        for level in filter.split(LEVEL_SEPARATOR) {
            let edge = Edge::of(level);
            let Some(child) = self.child(id, edge) else {
                return false;
            };
            path.push((id, edge));
            id = child;
        }
        let Some(node) = self.nodes.get_mut(id) else {
            return false;
        };
        if !node.subscribers.remove(key) {
            return false;
        }
        if node.subscribers.is_empty() {
            // The last subscriber left: the router's copy goes (sessions that
            // still hold a clone keep it alive until they drop it).
            node.filter = None;
        }
        self.len -= 1;
        self.prune(id, &path);
        true
    }

    /// Frees `id` and then its ancestors along `path` while they are unused.
    fn prune(&mut self, mut id: NodeId, path: &[(NodeId, Edge<'_>)]) {
        for &(parent, edge) in path.iter().rev() {
            if !self.nodes.get(id).is_some_and(Node::is_unused) {
                break;
            }
            if let Some(node) = self.nodes.get_mut(parent) {
                match edge {
                    Edge::Plus => node.plus = None,
                    Edge::Hash => node.hash = None,
                    Edge::Exact(level) => {
                        node.children.remove(level);
                        if node.children.is_empty() {
                            node.children.shrink_to_fit();
                        }
                    }
                }
            }
            if let Some(slot) = self.nodes.get_mut(id) {
                // Drops the node's maps and arrays now.
                *slot = Node::default();
            }
            self.free.push(id);
            id = parent;
        }
        if self.node_count() == 0 {
            self.nodes.truncate(1);
            self.nodes.shrink_to_fit();
            self.free = Vec::new();
        }
    }

    /// Calls `f(key, qos)` for each subscriber of exactly `filter` (its own
    /// node, no matching): a message from another node comes tagged with the
    /// filter whose NATS subscription carried it.
    pub fn for_each_subscriber(&self, filter: &str, mut f: impl FnMut(K, QoS)) {
        let mut id = ROOT;
        for level in filter.split(LEVEL_SEPARATOR) {
            match self.child(id, Edge::of(level)) {
                Some(child) => id = child,
                None => return,
            }
        }
        if let Some(node) = self.nodes.get(id) {
            for &(key, qos) in &node.subscribers.entries {
                f(key, qos);
            }
        }
    }

    /// Calls `f(key, qos)` exactly once per subscriber with a filter matching the
    /// Topic Name `topic`, with the highest QoS granted among its matching filters
    /// (§3.3.5: overlapping subscriptions are delivered once). Topics starting with
    /// `$` are not matched by filters whose first level is a wildcard (§4.7.2).
    ///
    /// Takes `&mut self` only for its scratch space. The order of calls is
    /// unspecified.
    pub fn for_each_match(&mut self, topic: &str, mut f: impl FnMut(K, QoS)) {
        self.collect_matches(topic);
        let Router {
            nodes,
            matched,
            merged,
            ..
        } = self;
        match matched.as_slice() {
            [] => {}
            // The common case: walk one node's array, no hashing.
            &[id] => {
                if let Some(node) = nodes.get(id) {
                    for &(key, qos) in &node.subscribers.entries {
                        f(key, qos);
                    }
                }
            }
            many => {
                merged.clear();
                for &id in many {
                    let Some(node) = nodes.get(id) else {
                        continue;
                    };
                    for &(key, qos) in &node.subscribers.entries {
                        merged
                            .entry(key)
                            .and_modify(|granted| *granted = (*granted).max(qos))
                            .or_insert(qos);
                    }
                }
                for (key, qos) in merged.drain() {
                    f(key, qos);
                }
            }
        }
    }

    /// Fills `self.matched` with the nodes that have subscribers and whose filter
    /// matches `topic`. Each node is reached at most once: the trie has one path per
    /// filter, and a filter consumes the topic's levels in only one way.
    fn collect_matches(&mut self, topic: &str) {
        let sys = is_sys_topic(topic);
        let Router {
            nodes,
            stack,
            matched,
            ..
        } = self;
        stack.clear();
        matched.clear();
        stack.push((ROOT, Some(0)));
        while let Some((id, position)) = stack.pop() {
            let Some(node) = nodes.get(id) else {
                continue;
            };
            // A wildcard first level does not match a '$' topic (§4.7.2).
            let wildcards = !(sys && id == ROOT);
            let push_if_subscribed = |matched: &mut Vec<NodeId>, child: Option<NodeId>| {
                if let Some(child) = child
                    && nodes.get(child).is_some_and(|n| !n.subscribers.is_empty())
                {
                    matched.push(child);
                }
            };
            let Some(start) = position else {
                // Every level consumed: filters ending here match, and so does a
                // '#' below ("sport/#" matches "sport", §4.7.1.2).
                if !node.subscribers.is_empty() {
                    matched.push(id);
                }
                if wildcards {
                    push_if_subscribed(matched, node.hash);
                }
                continue;
            };
            if wildcards {
                push_if_subscribed(matched, node.hash);
            }
            let rest = topic.get(start..).unwrap_or_default();
            let (level, next) = match rest.find(LEVEL_SEPARATOR) {
                Some(end) => (rest.get(..end).unwrap_or_default(), Some(start + end + 1)),
                None => (rest, None),
            };
            if wildcards && let Some(plus) = node.plus {
                stack.push((plus, next));
            }
            if let Some(&child) = node.children.get(level) {
                stack.push((child, next));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::protocol::topic::filter_matches;

    /// Collects the matches of `topic`, checking each key is called once.
    fn matches(router: &mut Router<u32>, topic: &str) -> BTreeMap<u32, QoS> {
        let mut found = BTreeMap::new();
        router.for_each_match(topic, |key, qos| {
            assert!(found.insert(key, qos).is_none(), "key {key} called twice");
        });
        found
    }

    fn map(pairs: &[(u32, QoS)]) -> BTreeMap<u32, QoS> {
        pairs.iter().copied().collect()
    }

    use QoS::{AtLeastOnce as Q1, AtMostOnce as Q0, ExactlyOnce as Q2};

    #[test]
    fn subscribe_match_unsubscribe() {
        let mut router = Router::new();
        assert!(router.is_empty());
        assert!(router.subscribe("a/b", 1, Q0));
        assert!(router.subscribe("a/+", 2, Q1));
        assert!(router.subscribe("a/#", 3, Q2));
        assert!(router.subscribe("#", 4, Q0));
        assert!(router.subscribe("a/b/c", 5, Q0));
        assert_eq!(router.len(), 5);
        assert_eq!(
            matches(&mut router, "a/b"),
            map(&[(1, Q0), (2, Q1), (3, Q2), (4, Q0)])
        );
        assert_eq!(matches(&mut router, "a"), map(&[(3, Q2), (4, Q0)]));
        assert_eq!(
            matches(&mut router, "a/b/c"),
            map(&[(3, Q2), (4, Q0), (5, Q0)])
        );
        assert_eq!(matches(&mut router, "b"), map(&[(4, Q0)]));
        assert!(router.unsubscribe("#", 4));
        assert!(matches(&mut router, "b").is_empty());
        assert!(!router.unsubscribe("#", 4));
        assert!(!router.unsubscribe("a/b", 2));
        assert!(!router.unsubscribe("x/y/z", 1));
        assert_eq!(router.len(), 4);
    }

    #[test]
    fn resubscribe_replaces_qos() {
        let mut router = Router::new();
        assert!(router.subscribe("a", 1, Q0));
        assert!(!router.subscribe("a", 1, Q2));
        assert_eq!(router.len(), 1);
        assert_eq!(matches(&mut router, "a"), map(&[(1, Q2)]));
        assert!(!router.subscribe("a", 1, Q1));
        assert_eq!(matches(&mut router, "a"), map(&[(1, Q1)]));
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_with_max_qos() {
        let mut router = Router::new();
        router.subscribe("a/b", 1, Q0);
        router.subscribe("a/+", 1, Q2);
        router.subscribe("#", 1, Q1);
        router.subscribe("a/#", 2, Q1);
        router.subscribe("+/b", 2, Q0);
        assert_eq!(matches(&mut router, "a/b"), map(&[(1, Q2), (2, Q1)]));
        assert_eq!(matches(&mut router, "x/b"), map(&[(1, Q1), (2, Q0)]));
        router.unsubscribe("a/+", 1);
        assert_eq!(matches(&mut router, "a/b"), map(&[(1, Q1), (2, Q1)]));
    }

    #[test]
    fn dollar_topics_skip_first_level_wildcards() {
        let mut router = Router::new();
        router.subscribe("#", 1, Q0);
        router.subscribe("+/broker", 2, Q0);
        router.subscribe("$SYS/#", 3, Q0);
        router.subscribe("$SYS/+", 4, Q0);
        router.subscribe("$SYS/broker", 5, Q0);
        assert_eq!(
            matches(&mut router, "$SYS/broker"),
            map(&[(3, Q0), (4, Q0), (5, Q0)])
        );
        assert_eq!(matches(&mut router, "$SYS"), map(&[(3, Q0)]));
        assert_eq!(matches(&mut router, "x/broker"), map(&[(1, Q0), (2, Q0)]));
        // A '$' deeper in the topic is ordinary.
        assert_eq!(matches(&mut router, "x/$SYS"), map(&[(1, Q0)]));
    }

    #[test]
    fn parent_level_and_empty_levels() {
        let mut router = Router::new();
        router.subscribe("sport/#", 1, Q0);
        router.subscribe("sport/+", 2, Q0);
        router.subscribe("/+", 3, Q0);
        router.subscribe("+/+", 4, Q0);
        router.subscribe("+", 5, Q0);
        router.subscribe("a//b", 6, Q0);
        router.subscribe("a/+/b", 7, Q0);
        assert_eq!(matches(&mut router, "sport"), map(&[(1, Q0), (5, Q0)]));
        assert_eq!(
            matches(&mut router, "sport/"),
            map(&[(1, Q0), (2, Q0), (4, Q0)])
        );
        assert_eq!(matches(&mut router, "/finance"), map(&[(3, Q0), (4, Q0)]));
        assert_eq!(matches(&mut router, "a//b"), map(&[(6, Q0), (7, Q0)]));
        assert_eq!(matches(&mut router, "a/x/b"), map(&[(7, Q0)]));
    }

    #[test]
    fn pruning_returns_to_empty() {
        let mut router = Router::new();
        let filters = ["a/b/c", "a/+/c", "a/#", "#", "+", "/", "a//b", "$SYS/x"];
        for (key, filter) in filters.iter().enumerate() {
            router.subscribe(filter, key as u32, Q1);
            router.subscribe(filter, 100, Q0);
        }
        assert_eq!(router.len(), 2 * filters.len());
        assert!(router.node_count() > 0);
        for (key, filter) in filters.iter().enumerate() {
            assert!(router.unsubscribe(filter, key as u32));
        }
        // Still subscribed by key 100: nothing pruned below those.
        assert_eq!(matches(&mut router, "a/b/c").len(), 1);
        for filter in filters {
            assert!(router.unsubscribe(filter, 100));
        }
        assert!(router.is_empty());
        assert_eq!(router.node_count(), 0);
        assert_eq!(router.nodes.len(), 1);
        assert!(router.nodes[ROOT].is_unused());
        assert!(matches(&mut router, "a/b/c").is_empty());
    }

    #[test]
    fn pruning_keeps_shared_prefixes() {
        let mut router = Router::new();
        router.subscribe("a/b/c", 1, Q0);
        router.subscribe("a/b", 2, Q0);
        let nodes = router.node_count();
        assert_eq!(nodes, 3);
        router.unsubscribe("a/b", 2);
        assert_eq!(router.node_count(), 3);
        assert_eq!(matches(&mut router, "a/b/c"), map(&[(1, Q0)]));
        router.subscribe("a/x", 3, Q0);
        assert_eq!(router.node_count(), 4);
        router.unsubscribe("a/b/c", 1);
        assert_eq!(router.node_count(), 2);
        // Freed slots are reused.
        router.subscribe("a/y", 4, Q0);
        assert_eq!(router.nodes.len(), 5);
    }

    #[test]
    fn large_node_uses_index_and_shrinks() {
        let mut router = Router::new();
        let n = 10_000u32;
        for key in 0..n {
            assert!(router.subscribe("big", key, Q1));
        }
        assert!(!router.subscribe("big", 17, Q2));
        assert_eq!(router.len(), n as usize);
        let mut count = 0;
        router.for_each_match("big", |_, _| count += 1);
        assert_eq!(count, n);
        // Remove every other key, then check the rest and the index.
        for key in (0..n).step_by(2) {
            assert!(router.unsubscribe("big", key));
        }
        assert!(!router.unsubscribe("big", 0));
        let found = matches(&mut router, "big");
        assert_eq!(found.len(), (n / 2) as usize);
        assert!(found.keys().all(|key| key % 2 == 1));
        assert_eq!(found.get(&17), Some(&Q2));
        for key in (1..n).step_by(2) {
            assert!(router.unsubscribe("big", key));
        }
        assert!(router.is_empty());
        assert_eq!(router.node_count(), 0);
    }

    #[test]
    fn subscribers_index_threshold() {
        let mut subs = Subscribers::default();
        for key in 0..=LINEAR_SCAN_MAX as u32 {
            assert!(subs.insert(key, Q0));
        }
        assert!(subs.index.is_some());
        for key in 0..=LINEAR_SCAN_MAX as u32 {
            assert_eq!(subs.position(key).map(|p| subs.entries[p].0), Some(key));
        }
        for key in 0..(LINEAR_SCAN_MAX as u32 / 2 + 1) {
            assert!(subs.remove(key));
        }
        assert!(subs.index.is_none());
        for key in (LINEAR_SCAN_MAX as u32 / 2 + 1)..=LINEAR_SCAN_MAX as u32 {
            assert_eq!(subs.position(key).map(|p| subs.entries[p].0), Some(key));
        }
    }

    #[test]
    fn index_tracks_random_inserts_and_removals() {
        let mut rng = XorShift(0x0DDB_1A5E_5EED_0001);
        let mut subs = Subscribers::default();
        let mut model: BTreeMap<u32, QoS> = BTreeMap::new();
        for _ in 0..5_000 {
            let key = (rng.next() % 64) as u32;
            if rng.next().is_multiple_of(2) {
                assert_eq!(subs.remove(key), model.remove(&key).is_some());
            } else {
                let qos = QoS::from_u8((rng.next() % 3) as u8).unwrap();
                assert_eq!(subs.insert(key, qos), model.insert(key, qos).is_none());
            }
            // Every key is found where it is, and nothing else is found.
            assert_eq!(subs.entries.len(), model.len());
            for key in 0..64 {
                let found = subs.position(key).map(|p| subs.entries[p]);
                assert_eq!(found, model.get(&key).map(|&q| (key, q)), "key {key}");
            }
            if let Some(index) = &subs.index {
                assert_eq!(index.positions.len(), subs.entries.len());
            }
        }
    }

    #[test]
    fn filter_string_is_shared_and_dropped_with_the_last_subscriber() {
        let mut router = Router::new();
        let (added, first) = router.subscribe_shared("bench/fanout", 1u32, Q0);
        assert!(added);
        assert_eq!(&*first, "bench/fanout");
        let (added, second) = router.subscribe_shared("bench/fanout", 2, Q1);
        assert!(added);
        assert!(
            Arc::ptr_eq(&first, &second),
            "one string for every subscriber"
        );
        // A re-subscription replaces the QoS and hands out the same string.
        let (added, again) = router.subscribe_shared("bench/fanout", 1, Q2);
        assert!(!added);
        assert!(Arc::ptr_eq(&first, &again));
        drop(again);
        // The router's copy plus the two sessions' clones.
        assert_eq!(Arc::strong_count(&first), 3);
        router.unsubscribe("bench/fanout", 1);
        assert_eq!(Arc::strong_count(&first), 3, "kept while subscribed");
        router.unsubscribe("bench/fanout", 2);
        assert_eq!(Arc::strong_count(&first), 2, "router's copy dropped");
        assert_eq!(&*second, "bench/fanout", "the sessions' clones stay valid");
        // The next subscriber makes a fresh copy.
        let (_, third) = router.subscribe_shared("bench/fanout", 3, Q0);
        assert!(!Arc::ptr_eq(&first, &third));
        // A node kept for its children drops the copy with its last subscriber.
        router.subscribe("bench/fanout/x", 4, Q0);
        router.unsubscribe("bench/fanout", 3);
        assert_eq!(Arc::strong_count(&third), 1);
        assert_eq!(matches(&mut router, "bench/fanout/x"), map(&[(4, Q0)]));
    }

    #[test]
    fn deep_topics_do_not_recurse() {
        let mut router = Router::new();
        let deep_filter = "+/".repeat(30_000) + "#";
        router.subscribe(&deep_filter, 1, Q0);
        let deep_topic = "/".repeat(40_000);
        assert_eq!(matches(&mut router, &deep_topic), map(&[(1, Q0)]));
        assert!(router.unsubscribe(&deep_filter, 1));
        assert_eq!(router.node_count(), 0);
    }

    use crate::test_rng::XorShift;

    #[test]
    fn randomized_against_filter_matches() {
        const LEVELS: [&str; 5] = ["a", "b", "", "$x", "c"];
        let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
        let mut router = Router::new();
        // The model: (key, filter) -> QoS.
        let mut model: HashMap<(u32, String), QoS> = HashMap::new();
        let random_filter = |rng: &mut XorShift| {
            let depth = 1 + rng.next() % 4;
            let mut levels = Vec::new();
            for i in 0..depth {
                let last = i + 1 == depth;
                let level = match rng.next() % 6 {
                    0 => "+",
                    1 if last => "#",
                    _ => rng.pick(&LEVELS),
                };
                levels.push(level);
            }
            levels.join("/")
        };
        for round in 0..3_000 {
            let filter = random_filter(&mut rng);
            let key = (rng.next() % 24) as u32;
            if rng.next().is_multiple_of(3) {
                let existed = model.remove(&(key, filter.clone())).is_some();
                assert_eq!(router.unsubscribe(&filter, key), existed, "{filter}");
            } else {
                let qos = QoS::from_u8((rng.next() % 3) as u8).unwrap();
                let new = model.insert((key, filter.clone()), qos).is_none();
                assert_eq!(router.subscribe(&filter, key, qos), new, "{filter}");
            }
            assert_eq!(router.len(), model.len());
            if round % 5 == 0 {
                for _ in 0..10 {
                    let depth = 1 + rng.next() % 4;
                    let topic = (0..depth)
                        .map(|_| rng.pick(&LEVELS))
                        .collect::<Vec<_>>()
                        .join("/");
                    let mut expected: BTreeMap<u32, QoS> = BTreeMap::new();
                    for ((key, filter), &qos) in &model {
                        if filter_matches(filter, &topic) {
                            let entry = expected.entry(*key).or_insert(qos);
                            *entry = (*entry).max(qos);
                        }
                    }
                    assert_eq!(matches(&mut router, &topic), expected, "topic {topic:?}");
                }
            }
        }
        // Drain the model: the router must end empty with no nodes.
        for (key, filter) in model.keys() {
            assert!(router.unsubscribe(filter, *key));
        }
        assert!(router.is_empty());
        assert_eq!(router.node_count(), 0);
    }
}
