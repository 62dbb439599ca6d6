//! Who may connect: the per-address connection count, the per-address
//! connection rate and the per-listener connection rate (README,
//! "Security").
//!
//! Both are checked in the accept loop ([`crate::listener`]), right after
//! `accept`, before anything is read: a refused socket is closed at once
//! (no CONNACK is possible before CONNECT, and reading the CONNECT first
//! would hand the flood the very CPU and descriptors the limits protect).
//!
//! - **Per address** ([`ConnectionCounts`]): exact and global across shards.
//!   SO_REUSEPORT spreads one address's connections over every shard (the
//!   kernel hashes the source port too), so a per-shard share would refuse
//!   honest clients early on an unlucky spread. The counts live in a map
//!   split into [`STRIPES`] mutex-guarded stripes: only accepts and closes
//!   touch it, never the fan-out path, and two shards rarely hit one stripe.
//!   An IPv4 client is counted by its address, an IPv6 client by its /64
//!   (one host usually owns a whole /64 and can pick any address in it).
//!   The key is 32 bits, so that a connection carries it in what was padding
//!   (a million connections): an IPv4 address as is, a /64 as a keyed hash
//!   (random per process, so a client cannot aim at a victim's key). A
//!   chance collision makes two sources share one count.
//! - **Rate** ([`TokenBucket`]): per shard, with the configured rate and
//!   burst divided by the number of shards. SO_REUSEPORT spreads new
//!   connections evenly, so the listener as a whole accepts about the
//!   configured rate, with no shared state at all.
//! - **Rate per address** ([`AddressRates`]): a token bucket per source
//!   address (the same [`IpKey`]), per shard and listener, rate and burst
//!   divided by the shards as above (the kernel hashes the source port
//!   too, so one address's connections spread over the shards). Checked
//!   before the listener's bucket, so that a hostile address's refused
//!   connections take none of the tokens honest clients need after a
//!   restart. The map forgets an address once its bucket is full again.
//!
//! Loopback clients are exempt from both by default
//! (`limits_exempt_loopback`): benchmarks and local tools open tens of
//! thousands of connections from 127.0.0.x in bursts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Stripes of the per-address map; a power of two well above the shard
/// count, so concurrent accepts on different shards rarely share a lock.
pub const STRIPES: usize = 64;

/// A source address as counted: an IPv4 address, or a keyed 32-bit hash
/// of an IPv6 /64 prefix. 0 marks a connection that is not counted (exempt,
/// or the limit is off); 0.0.0.0 is never a peer address.
pub type IpKey = u32;

/// The live connection count of the broker and of each source address,
/// shared by all shards.
#[derive(Debug)]
pub struct ConnectionCounts {
    /// Live connections, all shards together (`max_connections`).
    pub total: AtomicUsize,
    /// Live counted connections per [`IpKey`], split into stripes.
    per_ip: Vec<Mutex<HashMap<IpKey, u32>>>,
    /// Seeds the IPv6 /64 hash (random per process).
    hasher: ahash::RandomState,
}

impl Default for ConnectionCounts {
    fn default() -> Self {
        ConnectionCounts {
            total: AtomicUsize::new(0),
            per_ip: (0..STRIPES).map(|_| Mutex::default()).collect(),
            hasher: ahash::RandomState::new(),
        }
    }
}

impl ConnectionCounts {
    /// The counting key of `ip` (IPv4-mapped IPv6 counts as IPv4); never 0.
    pub fn ip_key(&self, ip: IpAddr) -> IpKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => u32::from(v4).max(1),
            IpAddr::V6(v6) => {
                let prefix = (u128::from(v6) >> 64) as u64;
                (self.hasher.hash_one(prefix) as u32).max(1)
            }
        }
    }

    /// The stripe holding `key`.
    fn stripe(&self, key: IpKey) -> &Mutex<HashMap<IpKey, u32>> {
        // Fold the bits that differ between neighbours (the low ones of an
        // IPv4 address) into the stripe index.
        let mixed = key ^ (key >> 16) ^ (key >> 8);
        &self.per_ip[(mixed as usize) % STRIPES]
    }

    /// Counts one more connection from `key` unless it already has `max`;
    /// false when refused.
    pub fn try_add_ip(&self, key: IpKey, max: usize) -> bool {
        let mut map = match self.stripe(key).lock() {
            Ok(map) => map,
            // A panic while holding the lock cannot leave a count half
            // updated (each update is one statement): keep using it.
            Err(poisoned) => poisoned.into_inner(),
        };
        let count = map.entry(key).or_insert(0);
        if *count as usize >= max {
            if *count == 0 {
                map.remove(&key);
            }
            return false;
        }
        *count += 1;
        true
    }

    /// One connection from `key` ended.
    pub fn remove_ip(&self, key: IpKey) {
        let mut map = match self.stripe(key).lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(count) = map.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&key);
            }
        }
    }

    /// Live counted connections from `key` (for tests and diagnostics).
    #[cfg(test)]
    pub fn ip_count(&self, key: IpKey) -> u32 {
        let map = match self.stripe(key).lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(&key).copied().unwrap_or(0)
    }

    /// Live connections, all shards together.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// A token bucket: `rate` tokens per second, at most `capacity` saved up.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens held (the burst).
    capacity: f64,
    /// Tokens now.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, capacity: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// This shard's share of a listener's `rate`/s and `burst`: each divided
    /// by `shards` (at least one connection per second and per burst).
    pub fn shard_share(rate: u32, burst: u32, shards: usize, now: Instant) -> TokenBucket {
        let shards = shards.max(1) as f64;
        TokenBucket::new(
            (f64::from(rate) / shards).max(1.0),
            (f64::from(burst) / shards).ceil().max(1.0),
            now,
        )
    }

    /// Takes a token if there is one at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl TokenBucket {
    /// True when the bucket is full at `now` (it has been unused for long
    /// enough): forgetting it changes nothing.
    fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.capacity
    }
}

/// Addresses an [`AddressRates`] map holds before it first forgets the full
/// buckets; it then waits to double before it looks again, so forgetting
/// costs O(1) per new address.
const ADDRESS_RATES_PRUNE_AT: usize = 1024;

/// One shard's per-address connection-rate buckets for one listener (see
/// the module documentation).
#[derive(Debug)]
pub struct AddressRates {
    /// This shard's share of the rate per address, per second.
    rate: f64,
    /// This shard's share of the burst per address.
    burst: f64,
    /// The bucket of each address seen lately.
    buckets: HashMap<IpKey, TokenBucket>,
    /// Forget the full buckets once the map holds this many.
    prune_at: usize,
}

impl AddressRates {
    /// This shard's share of `rate`/s and `burst` per address, with
    /// `shards` shards (at least one connection per second and per burst).
    pub fn shard_share(rate: u32, burst: u32, shards: usize) -> AddressRates {
        let shards = shards.max(1) as f64;
        AddressRates {
            rate: (f64::from(rate) / shards).max(1.0),
            burst: (f64::from(burst) / shards).ceil().max(1.0),
            buckets: HashMap::new(),
            prune_at: ADDRESS_RATES_PRUNE_AT,
        }
    }

    /// Takes a token from `key`'s bucket at `now` if it has one.
    pub fn try_take(&mut self, key: IpKey, now: Instant) -> bool {
        if self.buckets.len() >= self.prune_at {
            self.buckets.retain(|_, b| !b.is_full(now));
            self.prune_at = (self.buckets.len() * 2).max(ADDRESS_RATES_PRUNE_AT);
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::new(rate, burst, now))
            .try_take(now)
    }

    /// Addresses held (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// Counts a live connection against `max_connections` until dropped. Its
/// count under `max_connections_per_ip` (its [`IpKey`], kept beside it in
/// what was padding, so a connection grows by nothing) is given back with
/// [`ConnectionSlot::release`].
#[derive(Debug)]
pub struct ConnectionSlot(pub Arc<ConnectionCounts>);

impl ConnectionSlot {
    /// The connection ended: gives back its count under `ip_key` (0: it
    /// was not counted per address) and, dropped, its place.
    pub fn release(self, ip_key: IpKey) {
        if ip_key != 0 {
            self.0.remove_ip(ip_key);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ipv4_by_address_ipv6_by_slash_64() {
        let counts = ConnectionCounts::default();
        let key = |s: &str| counts.ip_key(s.parse().unwrap());
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
        assert_eq!(key("10.0.0.1"), key("::ffff:10.0.0.1"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("0.0.0.0"), 0, "0 means not counted");
    }

    #[test]
    fn per_ip_counts_refuse_beyond_the_limit_and_free_on_close() {
        let counts = ConnectionCounts::default();
        let a = counts.ip_key("192.0.2.7".parse().unwrap());
        let b = counts.ip_key("192.0.2.8".parse().unwrap());
        assert!(counts.try_add_ip(a, 2));
        assert!(counts.try_add_ip(a, 2));
        assert!(!counts.try_add_ip(a, 2));
        assert!(counts.try_add_ip(b, 2));
        counts.remove_ip(a);
        assert_eq!(counts.ip_count(a), 1);
        assert!(counts.try_add_ip(a, 2));
        counts.remove_ip(a);
        counts.remove_ip(a);
        counts.remove_ip(a);
        assert_eq!(counts.ip_count(a), 0);
        assert!(!counts.try_add_ip(a, 0), "a zero limit admits nobody");
        assert_eq!(counts.ip_count(a), 0);
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3.0, t0);
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0));
        // 10/s: one token every 100 ms.
        assert!(!bucket.try_take(t0 + Duration::from_millis(50)));
        assert!(bucket.try_take(t0 + Duration::from_millis(110)));
        assert!(!bucket.try_take(t0 + Duration::from_millis(120)));
        // Never more than the burst saved up.
        let later = t0 + Duration::from_secs(60);
        let taken = (0..10).filter(|_| bucket.try_take(later)).count();
        assert_eq!(taken, 3);
    }

    #[test]
    fn address_rates_limit_each_address_on_its_own() {
        let t0 = Instant::now();
        // 2/s and a burst of 3 per address, one shard.
        let mut rates = AddressRates::shard_share(2, 3, 1);
        let taken = (0..10).filter(|_| rates.try_take(7, t0)).count();
        assert_eq!(taken, 3, "the burst, then refused");
        assert!(rates.try_take(8, t0), "another address has its own bucket");
        assert!(!rates.try_take(7, t0 + Duration::from_millis(100)));
        assert!(
            rates.try_take(7, t0 + Duration::from_millis(600)),
            "refilled at 2/s"
        );
    }

    #[test]
    fn address_rates_forget_full_buckets() {
        let t0 = Instant::now();
        let mut rates = AddressRates::shard_share(10, 1, 1);
        for key in 1..=ADDRESS_RATES_PRUNE_AT as IpKey {
            assert!(rates.try_take(key, t0));
        }
        assert_eq!(rates.len(), ADDRESS_RATES_PRUNE_AT);
        // A second later every bucket is full again: the next new address
        // makes the map forget them, and a forgotten address starts full.
        let later = t0 + Duration::from_secs(1);
        assert!(rates.try_take(ADDRESS_RATES_PRUNE_AT as IpKey + 1, later));
        assert_eq!(rates.len(), 1);
        assert!(rates.try_take(1, later));
        assert!(!rates.try_take(1, later), "burst of 1");
    }

    #[test]
    fn shard_share_divides_rate_and_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::shard_share(100, 8, 4, t0);
        let taken = (0..10).filter(|_| bucket.try_take(t0)).count();
        assert_eq!(taken, 2);
        let mut tiny = TokenBucket::shard_share(1, 1, 4, t0);
        assert!(tiny.try_take(t0), "at least one per burst");
    }
}
