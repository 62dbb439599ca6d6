//! A timer wheel of per-session deadlines, in keep-alive ticks
//! ([`TICKS_PER_SEC`](crate::session::link::TICKS_PER_SEC)): what the keep-alive sweep looks at instead of every
//! session.
//!
//! A wheel holds at most one entry per [`SessionKey`]: a deadline and a tag
//! (the low half of the connection id, or what else tells the entry's owner
//! from a later session with the same key). The wheel has [`SLOTS`] slots of
//! one tick each; an entry sits in the slot of its deadline (modulo
//! [`SLOTS`]), in a doubly linked list threaded through one vector of nodes
//! indexed by the key (so the session stores nothing), and inserting,
//! moving and removing an entry are O(1). [`Wheel::expire`] fires the slots of the ticks that passed since
//! its last call: its cost is the entries in those slots, not the entries
//! held. An entry further away than the wheel turns (409.6 s) is looked at
//! once per turn and put back.
//!
//! Re-arming is lazy: a connection that sends a packet only moves its
//! `last_seen`; when its entry fires, the caller sees that the real deadline
//! moved and returns it, and the entry moves there. So each connection costs
//! one visit per keep-alive period at most, and nothing per packet.

use crate::session::link::SessionKey;

/// Slots of the wheel, one tick each: 4096 ticks are 409.6 s, longer than
/// 1.5 × the usual keep-alives (60 s, 300 s), so most entries fire at their
/// deadline and not before. A power of two, for the modulo.
pub const SLOTS: usize = 4096;

/// The end of a list, and the `slot` of a free node.
const NIL: u32 = u32::MAX;

/// The entry of one key, or none (`slot` is [`NIL`]).
#[derive(Clone, Copy, Debug)]
struct Node {
    /// The previous key in the slot's list.
    prev: u32,
    /// The next key in the slot's list.
    next: u32,
    /// The slot whose list holds the entry; [`NIL`]: no entry.
    slot: u32,
    /// When the entry is due, in ticks.
    deadline: u32,
    /// Tells the owner from a later session with the same key.
    tag: u32,
}

/// A node without an entry.
const EMPTY: Node = Node {
    prev: NIL,
    next: NIL,
    slot: NIL,
    deadline: 0,
    tag: 0,
};

/// The wheel (see the module documentation).
#[derive(Debug)]
pub struct Wheel {
    /// Each slot's first key, or [`NIL`].
    heads: Box<[u32]>,
    /// Each key's node (as many as the highest key seen).
    nodes: Vec<Node>,
    /// The first tick whose slot has not fired yet.
    next_tick: u32,
    /// Live entries.
    len: usize,
    /// The keys of the slots being fired (kept to spare an allocation per
    /// call).
    firing: Vec<u32>,
}

impl Wheel {
    /// An empty wheel whose first slot to fire is tick `now`'s.
    pub fn new(now: u32) -> Wheel {
        Wheel {
            heads: vec![NIL; SLOTS].into_boxed_slice(),
            nodes: Vec::new(),
            next_tick: now,
            len: 0,
            firing: Vec::new(),
        }
    }

    /// Live entries.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is live.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets `key`'s entry, with `tag`, due at tick `deadline` (one in the
    /// past fires at the next [`Wheel::expire`]); an entry the key had
    /// before, whatever its tag, is replaced.
    pub fn insert(&mut self, key: SessionKey, deadline: u32, tag: u32) {
        let id = key as usize;
        if id >= self.nodes.len() {
            self.nodes.resize(id + 1, EMPTY);
        }
        if self.nodes[id].slot == NIL {
            self.len += 1;
        } else {
            self.unlink(key);
        }
        self.nodes[id].deadline = deadline;
        self.nodes[id].tag = tag;
        self.link(key);
    }

    /// Removes `key`'s entry if its tag is `tag` (it is then still the
    /// owner's). True when removed.
    pub fn remove(&mut self, key: SessionKey, tag: u32) -> bool {
        match self.nodes.get(key as usize) {
            Some(node) if node.slot != NIL && node.tag == tag => {}
            _ => return false,
        }
        self.unlink(key);
        self.len -= 1;
        true
    }

    /// The deadline of `key`'s entry, if it has one.
    #[cfg(test)]
    pub fn deadline(&self, key: SessionKey) -> Option<u32> {
        let node = self.nodes.get(key as usize)?;
        (node.slot != NIL).then_some(node.deadline)
    }

    /// Fires every entry due by tick `now`: `due(key, tag)` returns the
    /// entry's new deadline to keep it (re-armed: it moves), or None to
    /// remove it. Entries not yet due that share a fired slot (a deadline
    /// more than a turn away) go back to their slot unseen.
    pub fn expire(&mut self, now: u32, mut due: impl FnMut(SessionKey, u32) -> Option<u32>) {
        if now < self.next_tick {
            return;
        }
        let ticks = (u64::from(now - self.next_tick) + 1).min(SLOTS as u64) as u32;
        let first = self.next_tick;
        self.next_tick = now.saturating_add(1);
        let mut firing = std::mem::take(&mut self.firing);
        for tick in first..first.saturating_add(ticks) {
            let slot = tick as usize % SLOTS;
            let mut key = std::mem::replace(&mut self.heads[slot], NIL);
            while key != NIL {
                firing.push(key);
                let node = &mut self.nodes[key as usize];
                node.slot = NIL;
                key = node.next;
            }
        }
        for &key in &firing {
            let node = self.nodes[key as usize];
            if node.deadline > now {
                self.link(key);
                continue;
            }
            match due(key, node.tag) {
                Some(deadline) => {
                    self.nodes[key as usize].deadline = deadline;
                    self.link(key);
                }
                None => self.len -= 1,
            }
        }
        firing.clear();
        self.firing = firing;
    }

    /// Puts `key`'s node (not in any list) at the head of its deadline's
    /// slot; a deadline already past goes to the next slot to fire.
    fn link(&mut self, key: SessionKey) {
        let tick = self.nodes[key as usize].deadline.max(self.next_tick);
        let slot = tick as usize % SLOTS;
        let head = self.heads[slot];
        if head != NIL {
            self.nodes[head as usize].prev = key;
        }
        let node = &mut self.nodes[key as usize];
        node.prev = NIL;
        node.next = head;
        node.slot = slot as u32;
        self.heads[slot] = key;
    }

    /// Takes `key`'s node out of its slot's list.
    fn unlink(&mut self, key: SessionKey) {
        let Node {
            prev, next, slot, ..
        } = self.nodes[key as usize];
        if prev == NIL {
            self.heads[slot as usize] = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
        self.nodes[key as usize].slot = NIL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fires the wheel at `now` and returns the (key, tag) pairs that were
    /// due, dropping them.
    fn fire(wheel: &mut Wheel, now: u32) -> Vec<(SessionKey, u32)> {
        let mut fired = Vec::new();
        wheel.expire(now, |key, tag| {
            fired.push((key, tag));
            None
        });
        fired.sort_unstable();
        fired
    }

    #[test]
    fn deadlines_fire_once_when_due() {
        let mut wheel = Wheel::new(0);
        wheel.insert(1, 10, 100);
        wheel.insert(2, 15, 200);
        wheel.insert(3, 15, 300);
        assert!(fire(&mut wheel, 9).is_empty(), "nothing due before 10");
        assert_eq!(fire(&mut wheel, 10), vec![(1, 100)]);
        assert!(fire(&mut wheel, 10).is_empty(), "fired once");
        assert_eq!(fire(&mut wheel, 20), vec![(2, 200), (3, 300)]);
        assert!(fire(&mut wheel, 30).is_empty());
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_past_deadline_fires_at_the_next_expire() {
        let mut wheel = Wheel::new(0);
        assert!(fire(&mut wheel, 50).is_empty());
        wheel.insert(7, 3, 1);
        assert_eq!(fire(&mut wheel, 51), vec![(7, 1)]);
    }

    #[test]
    fn rearming_moves_the_deadline() {
        let mut wheel = Wheel::new(0);
        wheel.insert(4, 10, 9);
        let mut seen = 0;
        // Due at 10, the owner says its real deadline moved to 25.
        wheel.expire(12, |key, tag| {
            assert_eq!((key, tag), (4, 9));
            seen += 1;
            Some(25)
        });
        assert_eq!(seen, 1);
        assert_eq!(wheel.deadline(4), Some(25));
        assert!(fire(&mut wheel, 24).is_empty(), "moved: not due at 24");
        assert_eq!(fire(&mut wheel, 25), vec![(4, 9)]);
        // Inserting again for a key moves its entry (one per key).
        wheel.insert(4, 40, 9);
        wheel.insert(4, 30, 10);
        assert_eq!(wheel.len(), 1);
        assert_eq!(fire(&mut wheel, 50), vec![(4, 10)]);
    }

    #[test]
    fn removed_entries_never_fire_and_tags_are_checked() {
        let mut wheel = Wheel::new(0);
        wheel.insert(1, 10, 1);
        wheel.insert(2, 10, 2);
        wheel.insert(3, 10, 3);
        // The middle, the head and the tail of one slot's list.
        assert!(wheel.remove(2, 2));
        assert!(!wheel.remove(2, 2), "already removed");
        assert!(wheel.remove(3, 3));
        assert_eq!(wheel.len(), 1);
        // A later owner of key 3 is not removed with the old owner's tag.
        wheel.insert(3, 10, 5);
        assert!(!wheel.remove(3, 3));
        assert!(!wheel.remove(1, 2));
        assert_eq!(fire(&mut wheel, 10), vec![(1, 1), (3, 5)]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn deadlines_beyond_a_turn_wait_for_their_turn() {
        let mut wheel = Wheel::new(0);
        let far = SLOTS as u32 * 3 + 5;
        wheel.insert(1, far, 1);
        wheel.insert(2, 5, 2);
        // Every slot fires more than once before `far`: only key 2 is due.
        let mut now = 0;
        let mut fired = Vec::new();
        while now < far - 1 {
            now += 7;
            fired.extend(fire(&mut wheel, now.min(far - 1)));
        }
        assert_eq!(fired, vec![(2, 2)]);
        assert_eq!(fire(&mut wheel, far), vec![(1, 1)]);
    }

    #[test]
    fn a_long_pause_fires_everything_due_once() {
        let mut wheel = Wheel::new(0);
        for k in 0..100u32 {
            wheel.insert(k, k * 50, 0);
        }
        // Far more than a turn later, every entry is due and fires once.
        assert_eq!(fire(&mut wheel, 100_000).len(), 100);
        assert!(wheel.is_empty());
    }
}
