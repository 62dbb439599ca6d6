//! Session images a node keeps for a while, by client id, bounded in time
//! and in bytes (docs/design/cluster.md §9): the state an owner handed to
//! racing requesters, and the state a claim of this node received but did
//! not give to a connection (its outcome unknown, or its shard stopped
//! waiting). Nothing here talks to NATS: the ownership code decides what
//! to keep and when a kept image is given.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;

/// One kept session image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The ownership record revision it is kept for (what the revision
    /// means is the keeper's: see `ownership::Tables`).
    pub revision: u64,
    /// The image (shard cluster encoding).
    pub image: Bytes,
    /// Whether it is a dead owner's subscriptions alone (a grant answered
    /// `ClaimAnswer::Recovered`), not a session handed over.
    pub recovered: bool,
    /// When it was kept: it is given for [`Images::new`]'s `ttl` from then.
    pub at: Instant,
}

/// Kept images, by client id: one per id (a newer one replaces it), each
/// given for `ttl` after it was kept, at most `max_bytes` of images in all
/// (the oldest goes first beyond it; one larger than that is not kept).
/// An expired image is never given; it is dropped at the next change or
/// read, so memory stays under the byte bound whatever the traffic.
#[derive(Debug)]
pub struct Images {
    /// The images, by client id.
    entries: HashMap<ByteString, Kept>,
    /// Bytes of the images in `entries`.
    bytes: usize,
    /// How long an image is given after it was kept.
    ttl: Duration,
    /// Most bytes of images kept.
    max_bytes: usize,
}

impl Images {
    /// An empty table giving each image for `ttl`, holding at most
    /// `max_bytes`.
    pub fn new(ttl: Duration, max_bytes: usize) -> Self {
        Images {
            entries: HashMap::new(),
            bytes: 0,
            ttl,
            max_bytes,
        }
    }

    /// Keeps `kept` for `client_id` (replacing what was kept for it), at
    /// `now`; the oldest images go first while there is no room. An image
    /// larger than the whole bound is not kept (the old one goes anyway:
    /// it is older than the state it stood for).
    pub fn keep(&mut self, client_id: ByteString, kept: Kept, now: Instant) {
        self.prune(now);
        self.take(&client_id, now);
        if kept.image.len() > self.max_bytes {
            return;
        }
        while self.bytes + kept.image.len() > self.max_bytes {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, k)| k.at)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            self.take(&oldest, now);
        }
        self.bytes += kept.image.len();
        self.entries.insert(client_id, kept);
    }

    /// What is kept for `client_id`, if not expired at `now`.
    pub fn get(&mut self, client_id: &str, now: Instant) -> Option<&Kept> {
        self.prune(now);
        self.entries.get(client_id)
    }

    /// Takes what is kept for `client_id` out, if not expired at `now`.
    pub fn take(&mut self, client_id: &str, now: Instant) -> Option<Kept> {
        let kept = self.entries.remove(client_id)?;
        self.bytes -= kept.image.len();
        (now.saturating_duration_since(kept.at) < self.ttl).then_some(kept)
    }

    /// Bytes of the images kept.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops the images expired at `now`.
    fn prune(&mut self, now: Instant) {
        let ttl = self.ttl;
        let mut freed = 0;
        self.entries.retain(|_, k| {
            let keep = now.saturating_duration_since(k.at) < ttl;
            if !keep {
                freed += k.image.len();
            }
            keep
        });
        self.bytes -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(revision: u64, len: usize, at: Instant) -> Kept {
        Kept {
            revision,
            image: Bytes::from(vec![7; len]),
            recovered: false,
            at,
        }
    }

    /// An image is given until its time is up, then never; taking it
    /// gives it once; a newer one for the same id replaces it.
    #[test]
    fn an_image_is_given_until_it_expires_and_taken_once() {
        let start = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut images = Images::new(ttl, 1000);
        images.keep("a".into(), kept(5, 100, start), start);
        let just_before = start + ttl - Duration::from_millis(1);
        assert_eq!(images.get("a", just_before).map(|k| k.revision), Some(5));
        assert!(images.get("b", just_before).is_none());
        // Replaced by a newer image: its bytes, not both.
        images.keep("a".into(), kept(6, 40, start), start);
        assert_eq!(images.bytes(), 40);
        assert_eq!(images.take("a", start).map(|k| k.revision), Some(6));
        assert!(images.take("a", start).is_none(), "once");
        assert_eq!(images.bytes(), 0);
        // Expired: never given, and its bytes go at the next read.
        images.keep("a".into(), kept(7, 100, start), start);
        assert!(images.get("a", start + ttl).is_none());
        assert_eq!(images.bytes(), 0);
        images.keep("b".into(), kept(8, 100, start), start);
        assert!(
            images.take("b", start + ttl).is_none(),
            "expired: not taken"
        );
        assert_eq!(images.bytes(), 0);
    }

    /// Beyond the byte bound the oldest images go first; one larger than
    /// the bound is not kept, and takes the older image of its id with it.
    #[test]
    fn the_oldest_images_go_first_beyond_the_byte_bound() {
        let start = Instant::now();
        let mut images = Images::new(Duration::from_secs(60), 300);
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            let at = start + Duration::from_secs(i as u64);
            images.keep(id.into(), kept(i as u64, 100, at), at);
        }
        assert_eq!(images.bytes(), 300);
        let later = start + Duration::from_secs(5);
        images.keep("d".into(), kept(9, 150, later), later);
        assert!(images.get("a", later).is_none(), "the oldest went");
        assert!(images.get("b", later).is_none(), "and the next, for room");
        assert!(images.get("c", later).is_some());
        assert!(images.get("d", later).is_some());
        assert_eq!(images.bytes(), 250);
        images.keep("c".into(), kept(10, 301, later), later);
        assert!(images.get("c", later).is_none(), "too large: not kept");
        assert_eq!(images.bytes(), 150);
        assert_eq!(images.take("d", later).map(|k| k.revision), Some(9));
    }
}
