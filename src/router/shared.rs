//! Shared subscriptions (MQTT 5.0 §4.8.2, accepted from 3.1.1 clients too):
//! the groups `$share/{ShareName}/{filter}` and their members, as one shard
//! sees them.
//!
//! Every shard keeps a full replica of every group: its own members, added
//! and removed directly, and the other shards' members, added and removed by
//! the updates ([`MemberUpdate`]) those shards send over the mesh. The shard
//! where a message is published walks its replica ([`SharedGroups::for_each_match`]),
//! chooses one member per matching group ([`SharedGroups::choose`]) and
//! delivers to it, on its own shard or by sending the message to the
//! member's shard. No lock: each replica belongs to one shard.
//!
//! A shard with no group pays one `is_empty` check per publish.

use ahash::AHashMap;
use bytestring::ByteString;

use crate::config::SharedStrategy;
use crate::protocol::message::Message;
use crate::protocol::topic;
use crate::protocol::v3::QoS;
use crate::router::Router;

/// A Topic Filter parsed for the shared-subscription form.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Not `$share/...`: an ordinary filter.
    Plain,
    /// `$share/{name}/{filter}` with a valid ShareName and a non-empty filter
    /// (still to be validated as a Topic Filter by the caller).
    Shared {
        /// The ShareName.
        name: &'a str,
        /// The Topic Filter after the ShareName.
        filter: &'a str,
    },
    /// `$share/...` that breaks §4.8.2: empty ShareName, a ShareName with
    /// `+` or `#`, or no filter after it.
    Invalid,
}

/// Parses `filter` as a shared subscription (§4.8.2): the ShareName is at
/// least one character and holds no `/`, `+` or `#`; a filter follows it.
pub fn parse(filter: &str) -> Parsed<'_> {
    let Some(rest) = filter.strip_prefix(topic::SHARED_PREFIX) else {
        return Parsed::Plain;
    };
    let Some((name, filter)) = rest.split_once('/') else {
        return Parsed::Invalid;
    };
    if name.is_empty() || name.contains(['+', '#']) || filter.is_empty() {
        return Parsed::Invalid;
    }
    Parsed::Shared { name, filter }
}

/// True when `filter` is written as a shared subscription (valid or not).
pub fn is_shared(filter: &str) -> bool {
    filter.starts_with(topic::SHARED_PREFIX)
}

/// One member of a group: a session on some shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The shard that holds the session.
    pub shard: usize,
    /// The session's key on that shard.
    pub key: u32,
    /// The session's client id (admin API; the `hash_clientid` strategy
    /// hashes the publisher's, not this).
    pub client_id: ByteString,
    /// The QoS granted to this member's subscription.
    pub qos: QoS,
    /// False while the member is a persistent session without a
    /// connection: it is chosen only when no connected member is left.
    pub online: bool,
    /// True when the session has a subscription the ACL covers only partly
    /// (its reads are checked per delivery): the shard that chooses the
    /// member checks the topic first, so that a message the member may not
    /// read goes to another member instead of being sent to its shard and
    /// dropped there.
    pub read_check: bool,
    /// The user name those read checks are made under (with `client_id`).
    pub username: Option<ByteString>,
}

/// A change to one membership, sent by the member's shard to every other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberUpdate {
    /// The session joined the group `share` (the whole `$share/...` filter),
    /// or changed its QoS or connection state in it.
    Join {
        /// The whole `$share/{ShareName}/{filter}` string.
        share: ByteString,
        /// The member.
        member: Member,
    },
    /// The session left the group `share`.
    Leave {
        /// The whole `$share/{ShareName}/{filter}` string.
        share: ByteString,
        /// The member's shard.
        shard: usize,
        /// The member's session key there.
        key: u32,
        /// Set when the session was taken over by a connection on this
        /// shard, whose `Join` of the same client id to the group reached
        /// the sender: a replica that has not applied that `Join` yet (it
        /// travels on another channel) keeps the entry until it does
        /// ([`SharedGroups::leave_moved`]), so that no replica ever lacks
        /// the member in between.
        moved_to: Option<usize>,
    },
}

/// A message for one member, sent to the member's shard by the shard that
/// chose it.
#[derive(Clone, Debug)]
pub struct SharedDelivery {
    /// The message as published.
    pub message: Message,
    /// The group (the whole `$share/...` filter).
    pub share: ByteString,
    /// The chosen member's session key on the receiving shard.
    pub key: u32,
    /// Set when the member's old shard passes the message on after the
    /// session was taken over by a connection on the receiving shard: the
    /// member is named by client id there (`key` is the old shard's), and
    /// the message is not passed on again.
    pub client_id: Option<ByteString>,
    /// How many times it was passed on so (a session taken over again
    /// while the message followed it): bounded by the shard that passes it.
    pub passes: u8,
    /// With persistence, when the publisher's acknowledgement waits for
    /// it: the publishing shard and its barrier token there. The shard
    /// that settles the delivery (gives it to a member, or drops it) answers
    /// once its journal holds what that wrote; one passing it on leaves
    /// that to the next shard.
    pub barrier: Option<(usize, u64)>,
}

/// One group as a shard sees it.
#[derive(Debug)]
pub struct Group {
    /// The whole `$share/{ShareName}/{filter}` string.
    pub share: ByteString,
    /// Its members, in the order this shard learnt of them.
    pub members: Vec<Member>,
    /// Round robin: the index to try first next time.
    next: usize,
    /// Entries of sessions taken over by another shard's connection whose
    /// `Leave` came before that shard's `Join` (see
    /// [`SharedGroups::leave_moved`]); usually empty.
    replaced: Vec<Replaced>,
}

/// An entry kept after its `Leave` until the `Join` that replaces it is
/// applied (a take-over by a connection on another shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Replaced {
    /// The entry's shard.
    shard: usize,
    /// The entry's session key there.
    key: u32,
    /// The shard whose `Join` of the same client id ends it.
    to: usize,
    /// When its `Leave` arrived, in the caller's ticks: one kept too long
    /// ([`SharedGroups::end_replaced`]) goes anyway.
    since: u32,
}

/// Every group, with a trie of their filters.
#[derive(Debug)]
pub struct SharedGroups {
    /// Groups by id (the trie's key).
    groups: slab::Slab<Group>,
    /// Group ids by the whole `$share/...` filter.
    by_share: AHashMap<ByteString, u32>,
    /// The groups' Topic Filters (after the ShareName); the key is the
    /// group id.
    router: Router<u32>,
    /// Scratch: the ids of the groups matching the current topic.
    matched: Vec<u32>,
    /// The choice among members.
    strategy: SharedStrategy,
    /// Random numbers for the `random` strategy.
    rng: fastrand::Rng,
    /// How many [`Replaced`] entries all groups hold: the sweep looks at
    /// the groups only when some are.
    replaced: usize,
}

impl SharedGroups {
    /// No group yet; members chosen by `strategy`.
    pub fn new(strategy: SharedStrategy) -> SharedGroups {
        SharedGroups {
            groups: slab::Slab::new(),
            by_share: AHashMap::new(),
            router: Router::new(),
            matched: Vec::new(),
            strategy,
            rng: fastrand::Rng::new(),
            replaced: 0,
        }
    }

    /// Whether there is no group at all (the publish path's only check).
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Number of memberships, all groups together.
    pub fn members(&self) -> usize {
        self.groups.iter().map(|(_, g)| g.members.len()).sum()
    }

    /// Number of memberships of sessions on `shard`.
    pub fn members_of(&self, shard: usize) -> usize {
        self.groups
            .iter()
            .map(|(_, g)| g.members.iter().filter(|m| m.shard == shard).count())
            .sum()
    }

    /// Number of memberships whose session is connected.
    pub fn connected_members(&self) -> usize {
        self.groups
            .iter()
            .map(|(_, g)| g.members.iter().filter(|m| m.online).count())
            .sum()
    }

    /// Every group, for the admin API.
    pub fn iter(&self) -> impl Iterator<Item = &Group> + Clone {
        self.groups.iter().map(|(_, g)| g)
    }

    /// The group `share`, if it has members.
    pub fn group(&self, share: &str) -> Option<&Group> {
        let id = *self.by_share.get(share)?;
        self.groups.get(id as usize)
    }

    /// Applies a membership change (from this shard or another) at `now`
    /// (ticks, for [`SharedGroups::end_replaced`]).
    pub fn apply(&mut self, update: MemberUpdate, now: u32) {
        match update {
            MemberUpdate::Join { share, member } => self.join(share, member),
            MemberUpdate::Leave {
                share,
                shard,
                key,
                moved_to: None,
            } => self.leave(&share, shard, key),
            MemberUpdate::Leave {
                share,
                shard,
                key,
                moved_to: Some(to),
            } => self.leave_moved(&share, shard, key, to, now),
        }
    }

    /// Adds `member` to group `share`, or replaces its entry (same shard and
    /// key). `share` must parse as [`Parsed::Shared`]; anything else is
    /// ignored.
    pub fn join(&mut self, share: ByteString, member: Member) {
        let Parsed::Shared { filter, .. } = parse(&share) else {
            return;
        };
        if topic::validate_topic_filter(filter).is_err() {
            return;
        }
        let id = match self.by_share.get(&share) {
            Some(&id) => id,
            None => {
                let id = self.groups.insert(Group {
                    share: share.clone(),
                    members: Vec::new(),
                    next: 0,
                    replaced: Vec::new(),
                }) as u32;
                self.router.subscribe_shared(filter, id, QoS::AtMostOnce);
                self.by_share.insert(share, id);
                id
            }
        };
        let Some(group) = self.groups.get_mut(id as usize) else {
            return;
        };
        if !group.replaced.is_empty() {
            // The Join that ends a kept entry: the same client id on the
            // shard it moved to. A Join of the kept entry's own shard and
            // key is a new session's (the key was reused): it is no longer
            // kept for a move.
            let before = group.replaced.len();
            let Group {
                members, replaced, ..
            } = group;
            replaced.retain(|r| {
                if r.shard == member.shard && r.key == member.key {
                    return false;
                }
                let ends = r.to == member.shard
                    && members.iter().any(|m| {
                        m.shard == r.shard && m.key == r.key && m.client_id == member.client_id
                    });
                if ends {
                    members.retain(|m| !(m.shard == r.shard && m.key == r.key));
                }
                !ends
            });
            self.replaced -= before - group.replaced.len();
        }
        match group
            .members
            .iter_mut()
            .find(|m| m.shard == member.shard && m.key == member.key)
        {
            Some(entry) => *entry = member,
            None => group.members.push(member),
        }
    }

    /// The `Leave` of entry (`shard`, `key`) of group `share`, a session
    /// taken over by a connection on shard `to`: removed now if this
    /// replica has `to`'s entry of the same client id, else kept (still
    /// chosen, its shard passes the messages on) until that `Join` is
    /// applied here. The two updates come on different channels (from the
    /// old shard and from `to`), so with three or more shards this one may
    /// come first; removing the entry then would leave the group without
    /// the member in between. Kept at most until [`SharedGroups::end_replaced`].
    pub fn leave_moved(&mut self, share: &str, shard: usize, key: u32, to: usize, now: u32) {
        let Some(group) = self
            .by_share
            .get(share)
            .and_then(|&id| self.groups.get_mut(id as usize))
        else {
            return;
        };
        let Some(entry) = group
            .members
            .iter()
            .find(|m| m.shard == shard && m.key == key)
        else {
            return;
        };
        let joined = group
            .members
            .iter()
            .any(|m| m.shard == to && m.client_id == entry.client_id);
        if joined {
            self.leave(share, shard, key);
            return;
        }
        if !group
            .replaced
            .iter()
            .any(|r| r.shard == shard && r.key == key)
        {
            group.replaced.push(Replaced {
                shard,
                key,
                to,
                since: now,
            });
            self.replaced += 1;
        }
    }

    /// Removes the entries kept by [`SharedGroups::leave_moved`] for more
    /// than `wait` ticks at `now`: the `Join` they wait for did not come
    /// (the session left the group on its new shard before this replica
    /// applied its `Join`, or ended there).
    pub fn end_replaced(&mut self, now: u32, wait: u32) {
        if self.replaced == 0 {
            return;
        }
        let mut ended = Vec::new();
        for (_, group) in &self.groups {
            for r in &group.replaced {
                if now.saturating_sub(r.since) > wait {
                    ended.push((group.share.clone(), r.shard, r.key));
                }
            }
        }
        for (share, shard, key) in ended {
            self.leave(&share, shard, key);
        }
    }

    /// Removes the member (`shard`, `key`) from group `share`; the group
    /// goes with its last member.
    pub fn leave(&mut self, share: &str, shard: usize, key: u32) {
        let Some(&id) = self.by_share.get(share) else {
            return;
        };
        let Some(group) = self.groups.get_mut(id as usize) else {
            return;
        };
        group
            .members
            .retain(|m| !(m.shard == shard && m.key == key));
        let kept = group.replaced.len();
        group
            .replaced
            .retain(|r| !(r.shard == shard && r.key == key));
        self.replaced -= kept - group.replaced.len();
        if !group.members.is_empty() {
            return;
        }
        self.replaced -= group.replaced.len();
        self.groups.remove(id as usize);
        self.by_share.remove(share);
        if let Parsed::Shared { filter, .. } = parse(share) {
            self.router.unsubscribe(filter, id);
        }
    }

    /// Calls `f(group, first)` once per group whose filter matches `topic`,
    /// `first` being the index of the member to try first, chosen by the
    /// strategy (`publisher_hash`: the hash of the publisher's client id,
    /// for `hash_clientid`). The caller tries the members from there on, in
    /// order ([`Group::members_from`]), skipping those that cannot take the
    /// message. Advances each matching group's round robin.
    pub fn for_each_match(
        &mut self,
        topic: &str,
        publisher_hash: u64,
        mut f: impl FnMut(&Group, usize),
    ) {
        let mut matched = std::mem::take(&mut self.matched);
        matched.clear();
        self.router.for_each_match(topic, |id, _| matched.push(id));
        for &id in &matched {
            let Some(group) = self.groups.get_mut(id as usize) else {
                continue;
            };
            let n = group.members.len().max(1);
            let first = match self.strategy {
                SharedStrategy::RoundRobin => {
                    let first = group.next % n;
                    group.next = (first + 1) % n;
                    first
                }
                SharedStrategy::Random => self.rng.usize(..n),
                SharedStrategy::HashClientid => (publisher_hash % n as u64) as usize,
            };
            f(group, first);
        }
        self.matched = matched;
    }
}

impl SharedGroups {
    /// Calls `f(group)` once per group whose filter matches `topic`,
    /// choosing no member and leaving the round robin as it is (the admin
    /// API's "who would receive a publish").
    pub fn for_each_matching_group(&mut self, topic: &str, mut f: impl FnMut(&Group)) {
        let SharedGroups { groups, router, .. } = self;
        router.for_each_match(topic, |id, _| {
            if let Some(group) = groups.get(id as usize) {
                f(group);
            }
        });
    }
}

impl Group {
    /// The members in the order to try them, starting at `first`.
    pub fn members_from(&self, first: usize) -> impl Iterator<Item = &Member> {
        let n = self.members.len();
        (0..n).filter_map(move |i| self.members.get((first + i) % n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(shard: usize, key: u32, online: bool) -> Member {
        Member {
            shard,
            key,
            client_id: ByteString::from(format!("c{shard}-{key}")),
            qos: QoS::AtLeastOnce,
            online,
            read_check: false,
            username: None,
        }
    }

    #[test]
    fn parse_follows_the_share_name_rules() {
        assert_eq!(parse("a/b"), Parsed::Plain);
        assert_eq!(parse("$share"), Parsed::Plain);
        assert_eq!(
            parse("$share/g/a/+"),
            Parsed::Shared {
                name: "g",
                filter: "a/+"
            }
        );
        for bad in [
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/g+/a",
            "$share/#/a",
        ] {
            assert_eq!(parse(bad), Parsed::Invalid, "{bad}");
        }
    }

    #[test]
    fn groups_match_by_their_filter_and_go_with_their_last_member() {
        let mut groups = SharedGroups::new(SharedStrategy::RoundRobin);
        groups.join("$share/g/a/+".into(), member(0, 1, true));
        groups.join("$share/g/a/+".into(), member(1, 1, true));
        groups.join("$share/h/a/b".into(), member(1, 2, true));
        assert_eq!((groups.groups(), groups.members()), (2, 3));
        let mut seen = Vec::new();
        groups.for_each_match("a/b", 0, |g, _| seen.push(g.share.to_string()));
        seen.sort();
        assert_eq!(seen, ["$share/g/a/+", "$share/h/a/b"]);
        groups.leave("$share/h/a/b", 1, 2);
        groups.leave("$share/g/a/+", 0, 1);
        assert_eq!((groups.groups(), groups.members()), (1, 1));
        let mut seen = 0;
        groups.for_each_match("a/b", 0, |_, _| seen += 1);
        assert_eq!(seen, 1);
        groups.apply(
            MemberUpdate::Leave {
                share: "$share/g/a/+".into(),
                shard: 1,
                key: 1,
                moved_to: None,
            },
            0,
        );
        assert!(groups.is_empty());
    }

    #[test]
    fn a_second_join_replaces_the_member_entry() {
        let mut groups = SharedGroups::new(SharedStrategy::RoundRobin);
        groups.join("$share/g/t".into(), member(0, 1, true));
        groups.join("$share/g/t".into(), member(0, 1, false));
        let group = groups.group("$share/g/t").expect("the group");
        assert_eq!(group.members.len(), 1);
        assert!(!group.members[0].online);
    }

    #[test]
    fn round_robin_takes_each_member_in_turn_and_hash_always_the_same() {
        let mut groups = SharedGroups::new(SharedStrategy::RoundRobin);
        for key in 0..3 {
            groups.join("$share/g/t".into(), member(0, key, true));
        }
        let mut firsts = Vec::new();
        for _ in 0..6 {
            groups.for_each_match("t", 0, |_, first| firsts.push(first));
        }
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        groups.strategy = SharedStrategy::HashClientid;
        let mut picks = Vec::new();
        for _ in 0..5 {
            groups.for_each_match("t", 7, |_, first| picks.push(first));
        }
        assert_eq!(picks, [1; 5], "7 % 3 members, every time");
        let group = groups.group("$share/g/t").expect("the group");
        let order: Vec<u32> = group.members_from(2).map(|m| m.key).collect();
        assert_eq!(order, [2, 0, 1]);
    }

    /// A member `client_id` on `shard` with session `key`.
    fn named(shard: usize, key: u32, client_id: &str) -> Member {
        Member {
            client_id: ByteString::from(client_id),
            ..member(shard, key, false)
        }
    }

    fn entries(groups: &SharedGroups) -> Vec<(usize, u32)> {
        groups
            .group("$share/g/t")
            .map(|g| g.members.iter().map(|m| (m.shard, m.key)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_moved_leave_before_the_new_shards_join_keeps_the_entry_until_the_join() {
        // Shard 2's replica: the member is on shard 0, taken over by a
        // connection on shard 1; shard 0's Leave comes first.
        let mut groups = SharedGroups::new(SharedStrategy::RoundRobin);
        groups.join("$share/g/t".into(), named(0, 5, "m"));
        groups.apply(
            MemberUpdate::Leave {
                share: "$share/g/t".into(),
                shard: 0,
                key: 5,
                moved_to: Some(1),
            },
            10,
        );
        assert_eq!(entries(&groups), [(0, 5)], "still chosen meanwhile");
        let mut chosen = 0;
        groups.for_each_match("t", 0, |_, _| chosen += 1);
        assert_eq!(chosen, 1);
        // Another client's Join ends nothing.
        groups.join("$share/g/t".into(), named(1, 9, "other"));
        assert_eq!(entries(&groups), [(0, 5), (1, 9)]);
        // Shard 1's Join of "m" replaces it.
        groups.join("$share/g/t".into(), named(1, 3, "m"));
        assert_eq!(entries(&groups), [(1, 9), (1, 3)]);
        assert_eq!(groups.replaced, 0);
    }

    #[test]
    fn a_moved_leave_after_the_new_shards_join_removes_the_entry_at_once() {
        let mut groups = SharedGroups::new(SharedStrategy::RoundRobin);
        groups.join("$share/g/t".into(), named(0, 5, "m"));
        groups.join("$share/g/t".into(), named(1, 3, "m"));
        groups.leave_moved("$share/g/t", 0, 5, 1, 0);
        assert_eq!(entries(&groups), [(1, 3)]);
        assert_eq!(groups.replaced, 0);
    }

    #[test]
    fn a_kept_entry_goes_after_the_wait_or_with_a_new_session_of_its_key() {
        let mut groups = SharedGroups::new(SharedStrategy::RoundRobin);
        groups.join("$share/g/t".into(), named(0, 5, "m"));
        groups.join("$share/g/t".into(), named(0, 6, "n"));
        groups.leave_moved("$share/g/t", 0, 5, 1, 100);
        groups.leave_moved("$share/g/t", 0, 6, 1, 100);
        assert_eq!(groups.replaced, 2);
        // Key 6 reused on shard 0 by a new session: no longer kept for a
        // move, so a Join of "n" from shard 1 leaves it alone.
        groups.join("$share/g/t".into(), named(0, 6, "new"));
        groups.join("$share/g/t".into(), named(1, 1, "n"));
        assert_eq!(entries(&groups), [(0, 5), (0, 6), (1, 1)]);
        groups.end_replaced(150, 100);
        assert_eq!(entries(&groups).len(), 3, "not yet");
        groups.end_replaced(201, 100);
        assert_eq!(entries(&groups), [(0, 6), (1, 1)]);
        assert_eq!(groups.replaced, 0);
    }
}
