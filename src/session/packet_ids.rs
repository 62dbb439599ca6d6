//! The packet ids of a session's outgoing QoS 1/2 messages (§2.2.1): which
//! id the next PUBLISH gets, in O(1), never one still in flight.
//!
//! Walking the inflight window for every new id costs a cache miss per
//! entry at a large fan-out (10k subscribers with 50 messages in flight
//! each: the window of every session is out of cache by the time its next
//! message comes), and it was most of the broker's CPU in a QoS 1 profile.
//!
//! Ids are handed out in order, 1 to 65,535, then again from 1 (a *lap*),
//! as Mosquitto and FlashMQ do, so subscribers that get the same messages
//! get them with the same ids (their PUBLISH packets can be shared, see
//! `protocol::message::Encoded::publish`). Within one lap the counter hands
//! out each id once, so the only ids in flight that it could meet are those
//! that were in flight when the lap began (a message not acknowledged for
//! 65,535 others) and those restored from the store or taken over
//! ([`PacketIds::reserve`]): both are in a sorted list that the counter
//! skips. The list is rebuilt from the inflight window at the start of each
//! lap, one walk per 65,535 ids; it is empty for almost every session.

use crate::protocol::v3::PacketId;

/// The packet id counter of one session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketIds {
    /// The last id handed out in this lap (0: none yet).
    last: PacketId,
    /// Ids in flight that this lap must skip, sorted: those in flight when
    /// it began and those reserved since. One that finishes meanwhile is
    /// skipped anyway (harmless, and forgotten at the next lap).
    skip: Vec<PacketId>,
}

impl PacketIds {
    /// The next id of this lap that is not in flight; None once the lap is
    /// over ([`PacketIds::new_lap`] starts the next).
    pub fn take(&mut self) -> Option<PacketId> {
        while self.last < PacketId::MAX {
            self.last += 1;
            if self.skip.binary_search(&self.last).is_err() {
                return Some(self.last);
            }
        }
        None
    }

    /// Starts a new lap from id 1, skipping the ids `in_flight` now.
    pub fn new_lap(&mut self, in_flight: impl Iterator<Item = PacketId>) {
        self.last = 0;
        self.skip.clear();
        self.skip.extend(in_flight);
        self.skip.sort_unstable();
        self.skip.dedup();
        if self.skip.is_empty() {
            // Give back what a lap with many stuck messages took.
            self.skip = Vec::new();
        }
    }

    /// `id` is in flight, chosen by an earlier connection (restored from
    /// the store): this lap does not hand it out.
    pub fn reserve(&mut self, id: PacketId) {
        if id > self.last
            && let Err(i) = self.skip.binary_search(&id)
        {
            self.skip.insert(i, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_handed_out_in_order_skipping_reserved_ones() {
        let mut ids = PacketIds::default();
        ids.reserve(2);
        assert_eq!(
            [ids.take(), ids.take(), ids.take()],
            [Some(1), Some(3), Some(4)]
        );
        // One already passed in this lap needs no skipping.
        ids.reserve(1);
        assert!(ids.skip.binary_search(&1).is_err());
    }

    /// A lap hands out every id once, never 0, then ends; the next lap
    /// skips what is still in flight.
    #[test]
    fn a_lap_ends_at_65535_and_the_next_skips_ids_in_flight() {
        let mut ids = PacketIds::default();
        let mut seen = vec![false; 1 << 16];
        while let Some(id) = ids.take() {
            assert!(id != 0 && !seen[usize::from(id)], "id {id} twice");
            seen[usize::from(id)] = true;
        }
        assert_eq!(seen.iter().filter(|&&s| s).count(), 65_535);
        ids.new_lap([3, 1, 3].into_iter());
        assert_eq!([ids.take(), ids.take()], [Some(2), Some(4)]);
        ids.new_lap(std::iter::empty());
        assert_eq!(ids.take(), Some(1));
        assert_eq!(ids.skip.capacity(), 0, "nothing kept without stuck ids");
    }

    /// Sends and acknowledgements in a pseudo-random order, with some
    /// messages stuck for several laps: an id in flight is never handed
    /// out again, checked against a map of the ids in flight.
    #[test]
    fn an_id_in_flight_is_never_handed_out() {
        let mut ids = PacketIds::default();
        let mut in_flight: Vec<PacketId> = Vec::new();
        let mut rng = 0x9e37_79b9_u32;
        for _ in 0..400_000 {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            if in_flight.len() < 100 && !rng.is_multiple_of(3) {
                let id = match ids.take() {
                    Some(id) => id,
                    None => {
                        ids.new_lap(in_flight.iter().copied());
                        ids.take().expect("a window of 100 always has a free id")
                    }
                };
                assert!(!in_flight.contains(&id), "id {id} is in flight");
                in_flight.push(id);
            } else if in_flight.len() > 10 {
                // The 10 oldest stay in flight for ever.
                let i = 10 + rng as usize % (in_flight.len() - 10);
                in_flight.swap_remove(i);
            }
        }
        assert!(ids.skip.len() <= 100);
    }
}
