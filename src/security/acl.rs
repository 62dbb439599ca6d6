//! Access control lists in Mosquitto's `acl_file` syntax.
//!
//! ```text
//! # Lines before any `user` line apply to anonymous clients.
//! topic read public/#
//! user alice
//! topic readwrite alice/#          # access defaults to readwrite
//! topic deny alice/secret
//! pattern write devices/%c/status  # every client; %c: its client id
//! pattern read users/%u/#          # %u: its user name
//! ```
//!
//! - `user <name>` starts the section of that user; `topic [read|write|
//!   readwrite|deny] <filter>` lines apply to the current section (before
//!   any `user` line: anonymous clients, those without a user name).
//! - `pattern [...] <filter>` lines apply to every client wherever they
//!   appear; a level that is exactly `%c` or `%u` is replaced by the client's
//!   id or user name. A pattern with `%u` does not apply to a client without
//!   a user name. An id or user name containing `+`, `#` or `/` would widen
//!   the pattern, so such a client matches no allowing pattern and every
//!   denying one (Mosquitto refuses such clients too).
//! - A `deny` entry that matches wins over any grant, whatever the order.
//!   Anything not granted is denied.
//!
//! **Subscriptions** ([`Acl::subscription`]): Mosquitto grants every
//! SUBSCRIBE and checks read access for each message it delivers. fanmq
//! sorts a filter into one of three cases when it is subscribed, so that the
//! common case costs nothing per delivery:
//! - [`Coverage::Full`]: a read-allowing entry *covers* the filter (every
//!   topic the filter can match is matched by the entry) and no `deny` entry
//!   *overlaps* it (no topic matched by both). Every message it matches is
//!   readable: nothing is checked per delivery.
//! - [`Coverage::Partial`]: some read-allowing entry overlaps the filter and
//!   no `deny` entry covers it. Granted, and read access
//!   ([`Acl::can_read`]) is checked for every message offered to that
//!   client, as Mosquitto does. So with `topic readwrite #` and
//!   `topic deny secret/x`, `+/+` is granted and gets everything but
//!   `secret/x`.
//! - [`Coverage::None`]: no read-allowing entry overlaps the filter, or a
//!   `deny` entry covers it: no message could ever be delivered, and the
//!   filter is refused (SUBACK 0x80 / 0x87), where Mosquitto grants it and
//!   delivers nothing.

use std::collections::HashMap;
use std::path::Path;

use smallvec::SmallVec;

use crate::protocol::topic;

/// Errors reading or parsing an ACL file.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read.
    #[error("cannot read ACL file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not valid.
    #[error("ACL file line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// What an entry allows (Mosquitto's access words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Subscribe (receive).
    Read,
    /// Publish.
    Write,
    /// Both; the default when no word is given.
    ReadWrite,
    /// Neither, and no other entry can grant what this one matches.
    Deny,
}

impl Access {
    /// True for entries that allow reading.
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    /// True for entries that allow writing.
    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// One level of an entry's topic filter.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    /// A literal level.
    Exact(String),
    /// `+`.
    Single,
    /// `#`.
    Multi,
    /// `%c` in a pattern: the client id.
    ClientId,
    /// `%u` in a pattern: the user name.
    Username,
}

/// A level with the client's id or user name filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolved<'a> {
    /// A literal level.
    Exact(&'a str),
    /// `+`.
    Single,
    /// `#`.
    Multi,
}

/// One `topic` or `pattern` line.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// What it allows.
    access: Access,
    /// Its filter, split into levels.
    levels: Vec<Level>,
}

/// The client a check is about.
#[derive(Clone, Copy, Debug)]
pub struct Who<'a> {
    /// Its client id (`%c`).
    pub client_id: &'a str,
    /// Its user name (`%u`, and which `user` section applies), if any.
    pub username: Option<&'a str>,
}

/// How much of a subscription's filter the ACL lets a client read (see the
/// module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// Every topic the filter matches is readable.
    Full,
    /// Some may be: read access is checked per delivered message.
    Partial,
    /// None is: the subscription is refused.
    None,
}

/// An entry's levels resolved for one client: inline up to 8 levels, so a
/// check allocates nothing for usual filters.
type Levels<'a> = SmallVec<[Resolved<'a>; 8]>;

/// Why a pattern cannot be filled in for a client.
enum Unresolved {
    /// `%u` and the client has no user name: the pattern does not apply.
    NotApplicable,
    /// The id or user name holds `+`, `#` or `/`, or is empty.
    Unsafe,
}

impl Entry {
    /// The entry's levels for `who`, written into `out` (reused by every
    /// entry of a check).
    fn resolve<'a>(&'a self, who: Who<'a>, out: &mut Levels<'a>) -> Result<(), Unresolved> {
        out.clear();
        for level in &self.levels {
            let value = match level {
                Level::Exact(s) => Resolved::Exact(s),
                Level::Single => Resolved::Single,
                Level::Multi => Resolved::Multi,
                Level::ClientId => Resolved::Exact(safe(who.client_id)?),
                Level::Username => {
                    Resolved::Exact(safe(who.username.ok_or(Unresolved::NotApplicable)?)?)
                }
            };
            out.push(value);
        }
        Ok(())
    }
}

/// An id or user name that may stand for one whole level.
fn safe(value: &str) -> Result<&str, Unresolved> {
    if value.is_empty() || value.contains(['+', '#', '/']) {
        Err(Unresolved::Unsafe)
    } else {
        Ok(value)
    }
}

/// A parsed ACL file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    /// `topic` entries before any `user` line: clients without a user name.
    anonymous: Vec<Entry>,
    /// `topic` entries by user name.
    users: HashMap<String, Vec<Entry>>,
    /// `pattern` entries: every client.
    patterns: Vec<Entry>,
    /// True when a pattern names the client id (`%c`): only then can two
    /// clients with the same user name get different answers.
    names_client_id: bool,
}

impl Acl {
    /// Reads and parses an ACL file.
    ///
    /// # Errors
    /// An unreadable file or any invalid line.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Acl::parse(&text)
    }

    /// Parses an ACL file's text.
    ///
    /// # Errors
    /// An unknown keyword, a `user` line without a name, an invalid topic
    /// filter, `%c`/`%u` in a `topic` line or not as a whole level.
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (index, line) in text.lines().enumerate() {
            let bad = |why: String| AclError::Line {
                line: index + 1,
                why,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(bad("user without a name".to_string()));
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let is_pattern = keyword == "pattern";
                    let entry = parse_entry(rest, is_pattern).map_err(bad)?;
                    if is_pattern {
                        acl.names_client_id |= entry.levels.contains(&Level::ClientId);
                        acl.patterns.push(entry);
                    } else if let Some(name) = &user {
                        acl.users.entry(name.clone()).or_default().push(entry);
                    } else {
                        acl.anonymous.push(entry);
                    }
                }
                other => {
                    return Err(bad(format!(
                        "unknown keyword {other:?} (expected user, topic or pattern)"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// The `topic` entries that apply to `who` (its user's, or the
    /// anonymous ones), followed by the patterns.
    fn entries<'a>(&'a self, who: Who<'_>) -> impl Iterator<Item = &'a Entry> {
        let own = match who.username {
            Some(name) => self.users.get(name).map_or(&[][..], Vec::as_slice),
            None => self.anonymous.as_slice(),
        };
        own.iter().chain(self.patterns.iter())
    }

    /// True when some answer depends on the client id (a pattern with
    /// `%c`); otherwise the user name alone decides.
    pub fn names_client_id(&self) -> bool {
        self.names_client_id
    }

    /// May `who` publish to `topic` (a valid topic name)? True when an entry
    /// allowing write matches and no `deny` entry does.
    pub fn can_publish(&self, who: Who<'_>, topic: &str) -> bool {
        self.permits(who, topic, Access::writes)
    }

    /// May `who` receive a message on `topic` (a valid topic name)? True
    /// when an entry allowing read matches and no `deny` entry does: the
    /// check made per delivery for [`Coverage::Partial`] subscriptions.
    pub fn can_read(&self, who: Who<'_>, topic: &str) -> bool {
        self.permits(who, topic, Access::reads)
    }

    /// True when an entry for which `allows` holds matches `topic` and no
    /// `deny` entry does.
    fn permits(&self, who: Who<'_>, topic: &str, allows: fn(Access) -> bool) -> bool {
        let mut levels = Levels::new();
        let mut allowed = false;
        for entry in self.entries(who) {
            match entry.resolve(who, &mut levels) {
                Ok(()) => {}
                Err(Unresolved::NotApplicable) => continue,
                Err(Unresolved::Unsafe) if entry.access == Access::Deny => return false,
                Err(Unresolved::Unsafe) => continue,
            }
            if matches_topic(&levels, topic) {
                if entry.access == Access::Deny {
                    return false;
                }
                allowed |= allows(entry.access);
            }
        }
        allowed
    }

    /// How much of `filter` (a valid topic filter) `who` may read: see the
    /// module documentation.
    pub fn subscription(&self, who: Who<'_>, filter: &str) -> Coverage {
        let filter: Levels<'_> = filter.split('/').map(resolved_level).collect();
        let mut levels = Levels::new();
        let (mut covered, mut overlapped, mut denied_in_part) = (false, false, false);
        for entry in self.entries(who) {
            match entry.resolve(who, &mut levels) {
                Ok(()) => {}
                Err(Unresolved::NotApplicable) => continue,
                Err(Unresolved::Unsafe) if entry.access == Access::Deny => return Coverage::None,
                Err(Unresolved::Unsafe) => continue,
            }
            if entry.access == Access::Deny {
                if covers(&levels, &filter) {
                    return Coverage::None;
                }
                denied_in_part |= overlaps(&levels, &filter);
            } else if entry.access.reads() && !covered {
                covered = covers(&levels, &filter);
                overlapped |= covered || overlaps(&levels, &filter);
            }
        }
        if covered && !denied_in_part {
            Coverage::Full
        } else if overlapped {
            Coverage::Partial
        } else {
            Coverage::None
        }
    }
}

/// Parses `[access] filter` of a `topic` or `pattern` line.
fn parse_entry(rest: &str, is_pattern: bool) -> Result<Entry, String> {
    let (word, after) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
    let (access, filter) = match word {
        "read" => (Access::Read, after.trim()),
        "write" => (Access::Write, after.trim()),
        "readwrite" => (Access::ReadWrite, after.trim()),
        "deny" => (Access::Deny, after.trim()),
        _ => (Access::ReadWrite, rest),
    };
    if let Err(e) = topic::validate_topic_filter(filter) {
        return Err(format!("invalid topic filter {filter:?}: {e}"));
    }
    let mut levels = Vec::new();
    for level in filter.split('/') {
        levels.push(match level {
            "+" => Level::Single,
            "#" => Level::Multi,
            "%c" if is_pattern => Level::ClientId,
            "%u" if is_pattern => Level::Username,
            _ if level.contains("%c") || level.contains("%u") => {
                return Err(if is_pattern {
                    format!("%c and %u must be a whole level, not part of {level:?}")
                } else {
                    "%c and %u are only substituted in pattern lines".to_string()
                });
            }
            _ => Level::Exact(level.to_string()),
        });
    }
    Ok(Entry { access, levels })
}

/// A filter level as a [`Resolved`] level.
fn resolved_level(level: &str) -> Resolved<'_> {
    match level {
        "+" => Resolved::Single,
        "#" => Resolved::Multi,
        _ => Resolved::Exact(level),
    }
}

/// True when the first level is `+` or `#`.
fn starts_with_wildcard(levels: &[Resolved<'_>]) -> bool {
    matches!(levels.first(), Some(Resolved::Single | Resolved::Multi))
}

/// True when the first level is a literal starting with `$` (§4.7.2).
fn starts_with_dollar(levels: &[Resolved<'_>]) -> bool {
    matches!(levels.first(), Some(Resolved::Exact(s)) if s.starts_with('$'))
}

/// Does the entry filter `levels` match the topic name `topic`?
fn matches_topic(levels: &[Resolved<'_>], topic: &str) -> bool {
    if topic::is_sys_topic(topic) && starts_with_wildcard(levels) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in levels {
        match (level, topic_levels.next()) {
            (Resolved::Multi, _) => return true,
            (Resolved::Single, Some(_)) => {}
            (Resolved::Exact(a), Some(b)) if *a == b => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Does `entry` match every topic that `filter` matches?
fn covers(entry: &[Resolved<'_>], filter: &[Resolved<'_>]) -> bool {
    if starts_with_dollar(filter) && starts_with_wildcard(entry) {
        return false;
    }
    let mut f = filter.iter();
    for e in entry {
        match (e, f.next()) {
            (Resolved::Multi, _) => return true,
            // The filter matches the parent level too ("a/#" matches "a"),
            // and more than one level; only "#" covers that.
            (_, Some(Resolved::Multi)) => return false,
            (Resolved::Single, Some(_)) => {}
            (Resolved::Exact(a), Some(Resolved::Exact(b))) if a == b => {}
            _ => return false,
        }
    }
    f.next().is_none()
}

/// Is there a topic that both `entry` and `filter` match?
fn overlaps(entry: &[Resolved<'_>], filter: &[Resolved<'_>]) -> bool {
    if (starts_with_dollar(filter) && starts_with_wildcard(entry))
        || (starts_with_dollar(entry) && starts_with_wildcard(filter))
    {
        return false;
    }
    let (mut a, mut b) = (entry.iter(), filter.iter());
    loop {
        match (a.next(), b.next()) {
            (Some(Resolved::Multi), _) | (_, Some(Resolved::Multi)) => return true,
            (None, None) => return true,
            (Some(Resolved::Single), Some(_)) | (Some(_), Some(Resolved::Single)) => {}
            (Some(Resolved::Exact(x)), Some(Resolved::Exact(y))) if x == y => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Coverage::{Full, Partial};
    use super::*;

    fn who<'a>(client_id: &'a str, username: Option<&'a str>) -> Who<'a> {
        Who {
            client_id,
            username,
        }
    }

    const FILE: &str = "\
# anonymous clients
topic read public/#
topic write anon/in

user alice
topic alice/#
topic deny alice/secret
topic read $SYS/#

user bob
topic write bob/out
pattern write devices/%c/status
pattern read users/%u/#
pattern deny users/%u/private/#
";

    #[test]
    fn anonymous_section_applies_to_clients_without_a_user_name() {
        let acl = Acl::parse(FILE).unwrap();
        let anon = who("c1", None);
        assert!(acl.can_publish(anon, "anon/in"));
        assert!(!acl.can_publish(anon, "public/x"), "read-only");
        assert_eq!(acl.subscription(anon, "public/#"), Full);
        assert_eq!(acl.subscription(anon, "public/+/x"), Full);
        assert_eq!(
            acl.subscription(anon, "anon/in"),
            Coverage::None,
            "write-only"
        );
        assert_eq!(acl.subscription(anon, "#"), Partial, "public/# in it");
        // A named user does not get the anonymous entries.
        assert_eq!(
            acl.subscription(who("c1", Some("alice")), "public/#"),
            Coverage::None
        );
        // Nor does a user name without a section: only the patterns.
        let carol = who("c9", Some("carol"));
        assert!(!acl.can_publish(carol, "anon/in"));
        assert!(acl.can_publish(carol, "devices/c9/status"));
    }

    #[test]
    fn user_sections_read_write_and_deny() {
        let acl = Acl::parse(FILE).unwrap();
        let alice = who("a1", Some("alice"));
        assert!(acl.can_publish(alice, "alice/x"), "readwrite by default");
        assert_eq!(acl.subscription(alice, "alice/x/+"), Full);
        assert!(!acl.can_publish(alice, "alice/secret"), "deny wins");
        assert_eq!(
            acl.subscription(alice, "alice/#"),
            Partial,
            "overlaps the deny"
        );
        assert_eq!(
            acl.subscription(alice, "alice/+"),
            Partial,
            "overlaps the deny"
        );
        assert_eq!(acl.subscription(alice, "alice/public"), Full);
        assert!(!acl.can_publish(alice, "bob/out"));
        assert_eq!(acl.subscription(alice, "$SYS/broker/#"), Full);
        let bob = who("b1", Some("bob"));
        assert!(acl.can_publish(bob, "bob/out"));
        assert_eq!(acl.subscription(bob, "bob/out"), Coverage::None);
    }

    #[test]
    fn patterns_substitute_client_id_and_user_name() {
        let acl = Acl::parse(FILE).unwrap();
        let bob = who("sensor-7", Some("bob"));
        assert!(acl.can_publish(bob, "devices/sensor-7/status"));
        assert!(!acl.can_publish(bob, "devices/sensor-8/status"));
        assert_eq!(acl.subscription(bob, "users/bob/inbox/#"), Full);
        assert_eq!(
            acl.subscription(bob, "users/bob/#"),
            Partial,
            "overlaps the deny"
        );
        assert_eq!(acl.subscription(bob, "users/alice/inbox"), Coverage::None);
        assert_eq!(
            acl.subscription(bob, "users/+/#"),
            Partial,
            "users/bob/# in it"
        );
        assert_eq!(acl.subscription(bob, "users/bob/inbox"), Full);
        assert_eq!(
            acl.subscription(bob, "users/bob/private/x"),
            Coverage::None,
            "deny pattern"
        );
        // Anonymous clients: %c patterns apply, %u ones do not.
        let anon = who("sensor-9", None);
        assert!(acl.can_publish(anon, "devices/sensor-9/status"));
        assert_eq!(acl.subscription(anon, "users/+/inbox"), Coverage::None);
    }

    #[test]
    fn ids_with_wildcards_or_slashes_gain_nothing_from_patterns() {
        let acl = Acl::parse(FILE).unwrap();
        for id in ["+", "#", "a/b", ""] {
            assert!(!acl.can_publish(who(id, None), "devices/+/status".replace('+', id).as_str()));
        }
        // A user name that cannot be substituted trips the deny pattern.
        assert!(!acl.can_publish(who("x", Some("b/c")), "devices/x/status"));
    }

    #[test]
    fn no_entries_deny_everything() {
        let acl = Acl::parse("# nothing\n\n").unwrap();
        assert!(!acl.can_publish(who("c", None), "a"));
        assert_eq!(acl.subscription(who("c", Some("u")), "a"), Coverage::None);
    }

    #[test]
    fn wildcard_entries_do_not_reach_dollar_topics() {
        let acl = Acl::parse("topic #\n").unwrap();
        let anon = who("c", None);
        assert!(acl.can_publish(anon, "a/b"));
        assert_eq!(acl.subscription(anon, "#"), Full);
        assert_eq!(acl.subscription(anon, "$SYS/#"), Coverage::None);
        assert!(!acl.can_publish(anon, "$foo"));
        // A deny on $SYS does not overlap "#", which never matches it.
        let acl = Acl::parse("topic #\ntopic deny $SYS/#\n").unwrap();
        assert_eq!(acl.subscription(anon, "#"), Full);
    }

    #[test]
    fn wildcards_over_a_denied_topic_are_granted_and_checked_per_message() {
        let acl = Acl::parse("topic readwrite #\ntopic deny secret/x\n").unwrap();
        let anon = who("c", None);
        assert_eq!(acl.subscription(anon, "+/+"), Partial);
        assert_eq!(acl.subscription(anon, "secret/+"), Partial);
        assert_eq!(acl.subscription(anon, "#"), Partial);
        assert_eq!(acl.subscription(anon, "a/b"), Full);
        assert_eq!(acl.subscription(anon, "secret/y"), Full);
        assert_eq!(acl.subscription(anon, "secret/x"), Coverage::None);
        assert!(acl.can_read(anon, "a/b"));
        assert!(acl.can_read(anon, "secret/y"));
        assert!(!acl.can_read(anon, "secret/x"));
        // A deny that covers the whole filter refuses it.
        let acl = Acl::parse("topic #\ntopic deny secret/#\n").unwrap();
        assert_eq!(acl.subscription(anon, "secret/+"), Coverage::None);
        assert_eq!(acl.subscription(anon, "+/x"), Partial);
        // Write-only entries give nothing to read.
        let acl = Acl::parse("topic write #\n").unwrap();
        assert_eq!(acl.subscription(anon, "+/+"), Coverage::None);
        assert!(!acl.can_read(anon, "a/b"));
        // Patterns: a wildcard over other clients' levels is partial, and
        // each message is read-checked with this client's id.
        let acl = Acl::parse("pattern read devices/%c/#\n").unwrap();
        let dev = who("d1", None);
        assert_eq!(acl.subscription(dev, "devices/d1/#"), Full);
        assert_eq!(acl.subscription(dev, "devices/+/status"), Partial);
        assert!(acl.can_read(dev, "devices/d1/status"));
        assert!(!acl.can_read(dev, "devices/d2/status"));
        assert_eq!(
            acl.subscription(who("a/b", None), "devices/+/status"),
            Coverage::None
        );
    }

    #[test]
    fn only_client_id_patterns_make_answers_depend_on_the_client_id() {
        assert!(
            !Acl::parse("topic #\npattern read u/%u/#\n")
                .unwrap()
                .names_client_id()
        );
        assert!(
            Acl::parse("pattern read d/%c/#\n")
                .unwrap()
                .names_client_id()
        );
    }

    #[test]
    fn coverage_of_wildcard_filters() {
        let r = |f: &'static str| f.split('/').map(resolved_level).collect::<Vec<_>>();
        let cases = [
            ("a/#", "a/#", true),
            ("a/#", "a", true),
            ("a/#", "a/b/+", true),
            ("a/+", "a/#", false),
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/b", "a/+", false),
            ("a/+/#", "a/#", false),
            ("+/b", "x/b", true),
            ("#", "#", true),
            ("a", "a/b", false),
            ("a/b", "a", false),
        ];
        for (entry, filter, want) in cases {
            assert_eq!(
                covers(&r(entry), &r(filter)),
                want,
                "{entry} covers {filter}"
            );
            if want {
                // Coverage implies MQTT matching for a sample topic.
                let sample = filter.replace('+', "z").replace("/#", "").replace('#', "z");
                assert!(topic::filter_matches(entry, &sample), "{entry} {sample}");
            }
        }
        let overlap = [
            ("a/x", "a/#", true),
            ("a/x", "a/+", true),
            ("a/x", "a/y", false),
            ("a/#", "a", true),
            ("a/+/c", "a/b/+", true),
            ("a/+", "a/b/c", false),
            ("a", "a/b", false),
        ];
        for (deny, filter, want) in overlap {
            assert_eq!(
                overlaps(&r(deny), &r(filter)),
                want,
                "{deny} overlaps {filter}"
            );
        }
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        for (text, line) in [
            ("topic read a/#/b", 1),
            ("\nuser", 2),
            ("users alice", 1),
            ("topic a/%c", 1),
            ("pattern read a/x%c", 1),
            ("topic read", 1),
        ] {
            match Acl::parse(text) {
                Err(AclError::Line { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn topics_may_contain_spaces_and_access_words_are_optional() {
        let acl = Acl::parse("topic  read   a b/c\ntopic write\tw\ntopic deny\n").unwrap_err();
        // "topic deny" with no filter is an error (empty filter).
        assert!(matches!(acl, AclError::Line { line: 3, .. }));
        let acl = Acl::parse("topic  read   a b/c\ntopic write\tw\n").unwrap();
        assert_eq!(acl.subscription(who("c", None), "a b/c"), Full);
        assert!(acl.can_publish(who("c", None), "w"));
    }
}
