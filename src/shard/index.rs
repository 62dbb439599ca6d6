//! Sessions by client id: a shard's index from a client id to the slab key of
//! its session ([`crate::shard::Shard::session_key`]).
//!
//! # Memory
//!
//! A `HashMap<ByteString, SessionKey>` keeps a clone of the client id in every
//! entry: 32 + 4 bytes, 40 with padding, plus a control byte per bucket. A
//! hash table doubles, so with 15k sessions it has 32768 buckets: about 90
//! bytes per session. This index stores only the 4-byte [`SessionKey`] and
//! hashes and compares by the client id *of the session it points to*, which
//! the session holds anyway: 4 + 1 bytes per bucket, about 11 per session at
//! the same load, and no clone of the id (the clone of a fresh `ByteString`
//! also allocates: `bytes` moves a uniquely owned buffer to a shared one on
//! its first clone).
//!
//! # Invariant
//!
//! Every key in the table is a live session in the slab whose client id has
//! not changed since it was indexed. [`crate::shard::Shard::insert_session`]
//! and [`crate::shard::Shard::remove_session`] are the only places that add
//! sessions to or take them from the slab, and they keep the index in step.
//! Removal compares keys, not client ids, so it works after the session has
//! left the slab.

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use crate::session::Session;
use crate::session::link::SessionKey;

/// A shard's sessions, live or offline (see [`crate::shard::Shard::sessions`]).
pub type Sessions = slab::Slab<Box<Session>>;

/// Sessions by client id (see the module documentation).
#[derive(Debug, Default)]
pub struct SessionIndex {
    /// Slab keys of indexed sessions, hashed by the session's client id.
    keys: HashTable<SessionKey>,
    /// The hasher of client ids (random per shard: a client cannot choose ids
    /// that collide).
    hasher: ahash::RandomState,
}

/// The client id of session `key`, if there is one.
fn client_id_of(sessions: &Sessions, key: SessionKey) -> Option<&str> {
    sessions.get(key as usize).map(|s| &*s.client_id)
}

impl SessionIndex {
    /// Number of indexed sessions.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no session is indexed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The hash of a client id.
    fn hash(&self, client_id: &str) -> u64 {
        self.hasher.hash_one(client_id)
    }

    /// The session with `client_id`.
    pub fn get(&self, sessions: &Sessions, client_id: &str) -> Option<SessionKey> {
        self.keys
            .find(self.hash(client_id), |&k| {
                client_id_of(sessions, k) == Some(client_id)
            })
            .copied()
    }

    /// Indexes session `key` (already in `sessions`) under its client id. If
    /// another session has that id, `key` replaces it in the index (that
    /// session stays in the slab, no longer found by id, until it is removed).
    pub fn insert(&mut self, sessions: &Sessions, key: SessionKey) {
        let Some(client_id) = client_id_of(sessions, key) else {
            return;
        };
        let SessionIndex { keys, hasher } = self;
        let rehash =
            |&k: &SessionKey| client_id_of(sessions, k).map_or(0, |id| hasher.hash_one(id));
        let eq = |&k: &SessionKey| client_id_of(sessions, k) == Some(client_id);
        match keys.entry(hasher.hash_one(client_id), eq, rehash) {
            Entry::Occupied(mut entry) => *entry.get_mut() = key,
            Entry::Vacant(entry) => {
                entry.insert(key);
            }
        }
    }

    /// Removes session `key`, whose client id is `client_id`, if the index
    /// holds it (it does not when a later session with the same id replaced
    /// it). The session may already be out of the slab. True when removed.
    pub fn remove(&mut self, sessions: &Sessions, client_id: &str, key: SessionKey) -> bool {
        let Ok(entry) = self.keys.find_entry(self.hash(client_id), |&k| k == key) else {
            return false;
        };
        entry.remove();
        if self.keys.capacity() > 4 * self.keys.len().max(16) {
            // Give back memory after a mass disconnect.
            let SessionIndex { keys, hasher } = self;
            keys.shrink_to_fit(|&k| client_id_of(sessions, k).map_or(0, |id| hasher.hash_one(id)));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use bytestring::ByteString;

    use super::*;
    use crate::session::SessionState;

    fn add(sessions: &mut Sessions, index: &mut SessionIndex, id: &str) -> SessionKey {
        let session = Session::new(ByteString::from(id), true, SessionState::default());
        let key = sessions.insert(Box::new(session)) as SessionKey;
        index.insert(sessions, key);
        key
    }

    fn drop_session(sessions: &mut Sessions, index: &mut SessionIndex, key: SessionKey) -> bool {
        let session = sessions.remove(key as usize);
        index.remove(sessions, &session.client_id, key)
    }

    #[test]
    fn insert_get_remove() {
        let mut sessions = Sessions::new();
        let mut index = SessionIndex::default();
        let keys: Vec<SessionKey> = (0..1000)
            .map(|i| add(&mut sessions, &mut index, &format!("client-{i}")))
            .collect();
        assert_eq!(index.len(), 1000);
        for (i, &key) in keys.iter().enumerate() {
            assert_eq!(index.get(&sessions, &format!("client-{i}")), Some(key));
        }
        assert_eq!(index.get(&sessions, "client-1000"), None);
        assert_eq!(index.get(&sessions, ""), None);
        for &key in keys.iter().step_by(2) {
            assert!(drop_session(&mut sessions, &mut index, key));
        }
        assert_eq!(index.len(), 500);
        for (i, &key) in keys.iter().enumerate() {
            let expected = (i % 2 == 1).then_some(key);
            assert_eq!(index.get(&sessions, &format!("client-{i}")), expected);
        }
        // Slab keys are reused by new sessions with other ids.
        let reused = add(&mut sessions, &mut index, "newcomer");
        assert!(keys.contains(&reused));
        assert_eq!(index.get(&sessions, "newcomer"), Some(reused));
        assert_eq!(index.get(&sessions, "client-0"), None);
        for &key in keys.iter().skip(1).step_by(2) {
            assert!(drop_session(&mut sessions, &mut index, key));
        }
        assert!(drop_session(&mut sessions, &mut index, reused));
        assert!(index.is_empty());
        assert!(index.keys.capacity() < 1000, "shrinks after a mass removal");
    }

    #[test]
    fn a_later_session_with_the_same_id_replaces_the_earlier() {
        let mut sessions = Sessions::new();
        let mut index = SessionIndex::default();
        let old = add(&mut sessions, &mut index, "dup");
        let new = add(&mut sessions, &mut index, "dup");
        assert_ne!(old, new);
        assert_eq!(index.len(), 1);
        assert_eq!(index.get(&sessions, "dup"), Some(new));
        // Removing the replaced one leaves the index alone.
        assert!(!drop_session(&mut sessions, &mut index, old));
        assert_eq!(index.get(&sessions, "dup"), Some(new));
        assert!(drop_session(&mut sessions, &mut index, new));
        assert_eq!(index.get(&sessions, "dup"), None);
        assert!(index.is_empty());
    }
}
