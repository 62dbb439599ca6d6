//! MQTT topics and filters as NATS subjects, and back (docs/design/cluster.md
//! §4; README, "Running a cluster", has the table for users).
//!
//! Each MQTT level is one NATS token: an empty level becomes `/`, and in a
//! non-empty level every `.` becomes `//`; tokens are joined with `.`. Level
//! by level this is nats-server's own MQTT rule, so NATS applications can
//! read and write fanmq topics. Topics whose first level starts with `$` go
//! under `<root>.d.`, every other topic under `<root>.t.`, so `#` and `+/…`
//! (which never match `$` topics, MQTT §4.7.2) need no filtering at the
//! receiver. A topic that cannot be a subject (a byte ≤ 0x20 or 0x7F, a
//! level that is exactly `*` or `>`, or a subject over
//! [`MAX_SUBJECT_LEN`]) goes on `<root>.x` with the topic in a header.
//!
//! Filters map the same way with `+` → `*` and `#` → `>`; `a/#` also holds
//! `a` (MQTT's `#` matches the parent level, NATS's `>` does not), and every
//! filter that could match an escaped topic (a wildcard filter, or one that
//! cannot be mapped itself) also holds `<root>.x`.

use crate::protocol::topic;

/// Longest subject made from a topic: the protocol line that carries it is
/// bounded (nats-server's `max_control_line`, 4 KiB by default), and the
/// line also holds a reply subject and sizes.
pub const MAX_SUBJECT_LEN: usize = 1024;

/// The token that roots ordinary topics: `<root>.t.<levels>`.
const ORDINARY: &str = "t";
/// The token that roots `$` topics: `<root>.d.<levels>`.
const DOLLAR: &str = "d";
/// The subject of escaped topics: `<root>.x`.
const ESCAPED: &str = "x";
/// What an empty MQTT level becomes (never a valid token otherwise).
const EMPTY_LEVEL: &str = "/";
/// What a `.` inside a level becomes.
const ESCAPED_DOT: &str = "//";

/// Where a topic goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicSubject {
    /// A subject that spells the topic.
    Mapped(String),
    /// `<root>.x`: the topic travels in a header.
    Escaped(String),
}

impl TopicSubject {
    /// The subject to publish on.
    pub fn subject(&self) -> &str {
        match self {
            TopicSubject::Mapped(s) | TopicSubject::Escaped(s) => s,
        }
    }
}

/// Whether a topic level cannot be a NATS token: whitespace or control
/// bytes, or a NATS wildcard on its own.
fn unmappable_level(level: &str) -> bool {
    level == "*" || level == ">" || level.bytes().any(|b| b <= 0x20 || b == 0x7F)
}

/// Appends one level as a token.
fn push_level(level: &str, out: &mut String) {
    if level.is_empty() {
        out.push_str(EMPTY_LEVEL);
    } else {
        for (i, part) in level.split('.').enumerate() {
            if i > 0 {
                out.push_str(ESCAPED_DOT);
            }
            out.push_str(part);
        }
    }
}

/// `<root>.t`, or `<root>.d` for a topic or filter whose first level starts
/// with `$`.
fn prefix(root: &str, dollar: bool) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(root);
    out.push('.');
    out.push_str(if dollar { DOLLAR } else { ORDINARY });
    out
}

/// The subject of escaped topics.
pub fn escaped_subject(root: &str) -> String {
    format!("{root}.{ESCAPED}")
}

/// The NATS queue group of the shared subscription `$share/<group>/<filter>`
/// under `root`: `<root>_` and the base64url of the ShareName, a NUL and
/// the filter. The filter is part of it because two shared subscriptions of
/// one ShareName with different filters are different groups (MQTT
/// §4.8.2), and both may hold the escaped subject.
pub fn queue_group(root: &str, group: &str, filter: &str) -> String {
    use base64::Engine;
    let mut name = Vec::with_capacity(group.len() + 1 + filter.len());
    name.extend_from_slice(group.as_bytes());
    name.push(0);
    name.extend_from_slice(filter.as_bytes());
    format!(
        "{root}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
    )
}

/// The subject a message on `topic` is published on.
pub fn topic_subject(root: &str, topic: &str) -> TopicSubject {
    let mut out = prefix(root, topic::is_sys_topic(topic));
    for level in topic.split('/') {
        if unmappable_level(level) {
            return TopicSubject::Escaped(escaped_subject(root));
        }
        out.push('.');
        push_level(level, &mut out);
        if out.len() > MAX_SUBJECT_LEN {
            return TopicSubject::Escaped(escaped_subject(root));
        }
    }
    TopicSubject::Mapped(out)
}

/// The NATS subscriptions a node holds for an MQTT filter: the mapped
/// subjects (one, or two for a trailing `#`) and whether `<root>.x` is
/// needed too. A `$SYS` filter holds none: `$SYS` is per node.
pub fn filter_subjects(root: &str, filter: &str) -> (Vec<String>, bool) {
    if filter == "$SYS" || filter.starts_with("$SYS/") {
        return (Vec::new(), false);
    }
    let wildcard = filter.contains(['+', '#']);
    let first = filter.split('/').next().unwrap_or("");
    let mut out = prefix(root, first.starts_with('$'));
    let mut parent = None;
    for level in filter.split('/') {
        match level {
            "+" => out.push_str(".*"),
            "#" => {
                parent = Some(out.clone());
                out.push_str(".>");
            }
            _ if unmappable_level(level) => return (Vec::new(), true),
            _ => {
                out.push('.');
                push_level(level, &mut out);
            }
        }
        if out.len() > MAX_SUBJECT_LEN {
            return (Vec::new(), true);
        }
    }
    let mut subjects = vec![out];
    // `#` alone has no parent level: `<root>.t` is no topic.
    if let Some(parent) = parent.filter(|_| filter != "#") {
        subjects.push(parent);
    }
    (subjects, wildcard)
}

/// Why a subject is not a fanmq topic.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// Not under `<root>.t.` or `<root>.d.`.
    #[error("subject {0:?} is not under the cluster's .t or .d root")]
    Foreign(String),
    /// An empty token, or a token that does not decode to a level.
    #[error("subject {0:?} has a token that is no MQTT level")]
    BadToken(String),
    /// The topic is no valid MQTT Topic Name (wildcards, a `$` first level
    /// under `.t`, or the reverse).
    #[error("subject {0:?} is no valid MQTT topic")]
    InvalidTopic(String),
}

/// The MQTT topic a subject under `<root>.t.` or `<root>.d.` spells (the
/// reverse of [`topic_subject`]); a foreign publisher's subject that does
/// not follow the rule is refused.
///
/// # Errors
/// See [`SubjectError`].
pub fn subject_topic(root: &str, subject: &str) -> Result<String, SubjectError> {
    let rest = subject
        .strip_prefix(root)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| SubjectError::Foreign(subject.to_string()))?;
    let (dollar, levels) = if let Some(levels) = rest.strip_prefix("t.") {
        (false, levels)
    } else if let Some(levels) = rest.strip_prefix("d.") {
        (true, levels)
    } else {
        return Err(SubjectError::Foreign(subject.to_string()));
    };
    let mut topic = String::with_capacity(levels.len());
    for (i, token) in levels.split('.').enumerate() {
        if i > 0 {
            topic.push('/');
        }
        if token == EMPTY_LEVEL {
            continue;
        }
        if token.is_empty() || unmappable_level(token) {
            return Err(SubjectError::BadToken(subject.to_string()));
        }
        // `//` is a dot; a `/` left over is no level's spelling.
        for (j, part) in token.split(ESCAPED_DOT).enumerate() {
            if part.contains('/') {
                return Err(SubjectError::BadToken(subject.to_string()));
            }
            if j > 0 {
                topic.push('.');
            }
            topic.push_str(part);
        }
    }
    if topic::validate_topic_name(&topic).is_err() || topic::is_sys_topic(&topic) != dollar {
        return Err(SubjectError::InvalidTopic(subject.to_string()));
    }
    Ok(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_groups_are_valid_tokens_and_differ_by_share_name_and_filter() {
        let g = queue_group("fanmq", "g", "a/#");
        assert_eq!(g, "fanmq_ZwBhLyM");
        assert_ne!(g, queue_group("fanmq", "g", "a/+"));
        assert_ne!(
            g,
            queue_group("fanmq", "g/a", "#"),
            "the NUL keeps them apart"
        );
        let odd = queue_group("fanmq", "grüppe .*>", "a b/#");
        assert!(
            odd.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "{odd}"
        );
    }

    /// The mapped subject of `topic`, panicking when escaped.
    fn mapped(topic: &str) -> String {
        match topic_subject("fanmq", topic) {
            TopicSubject::Mapped(s) => s,
            TopicSubject::Escaped(_) => panic!("{topic:?} escaped"),
        }
    }

    #[test]
    fn topics_map_level_by_level_as_the_design_table_says() {
        for (topic, subject) in [
            ("sensors/cold-1/temp", "fanmq.t.sensors.cold-1.temp"),
            ("/sensors/temp", "fanmq.t./.sensors.temp"),
            ("sensors/temp/", "fanmq.t.sensors.temp./"),
            ("sensors//temp", "fanmq.t.sensors./.temp"),
            ("spBv1.0/plant1", "fanmq.t.spBv1//0.plant1"),
            ("/", "fanmq.t././"),
            ("$app/status", "fanmq.d.$app.status"),
            ("a..b", "fanmq.t.a////b"),
        ] {
            assert_eq!(mapped(topic), subject, "{topic}");
            assert_eq!(subject_topic("fanmq", subject).as_deref(), Ok(topic));
        }
    }

    #[test]
    fn topics_that_cannot_be_subjects_are_escaped() {
        for topic in ["a b/c", "a/*", "a/>", "tab\there", &"x".repeat(2000)] {
            assert_eq!(
                topic_subject("fanmq", topic),
                TopicSubject::Escaped("fanmq.x".into()),
                "{topic}"
            );
        }
        // `*` or `>` inside a level is an ordinary character for NATS too.
        assert_eq!(mapped("a*b/c>"), "fanmq.t.a*b.c>");
    }

    #[test]
    fn filters_map_with_wildcards_and_the_parent_level_of_hash() {
        let f = |filter| filter_subjects("fanmq", filter);
        assert_eq!(
            f("sensors/+/temp"),
            (vec!["fanmq.t.sensors.*.temp".into()], true)
        );
        assert_eq!(
            f("sensors/#"),
            (
                vec!["fanmq.t.sensors.>".into(), "fanmq.t.sensors".into()],
                true
            )
        );
        assert_eq!(f("#"), (vec!["fanmq.t.>".into()], true));
        assert_eq!(f("+/status"), (vec!["fanmq.t.*.status".into()], true));
        assert_eq!(
            f("$app/#"),
            (vec!["fanmq.d.$app.>".into(), "fanmq.d.$app".into()], true)
        );
        assert_eq!(f("a/b"), (vec!["fanmq.t.a.b".into()], false));
        assert_eq!(f("a.b//c"), (vec!["fanmq.t.a//b./.c".into()], false));
        assert_eq!(f("$SYS/#"), (vec![], false));
        assert_eq!(f("a b/c"), (vec![], true), "only escaped topics match it");
    }

    #[test]
    fn every_mapped_filter_subject_matches_the_subject_of_each_topic_it_matches() {
        // A small NATS matcher: `*` one token, `>` one or more to the end.
        fn nats_matches(pattern: &str, subject: &str) -> bool {
            let mut p = pattern.split('.');
            let mut s = subject.split('.');
            loop {
                match (p.next(), s.next()) {
                    (Some(">"), Some(_)) => return true,
                    (Some("*"), Some(_)) => {}
                    (Some(a), Some(b)) if a == b => {}
                    (None, None) => return true,
                    _ => return false,
                }
            }
        }
        let topics = [
            "a", "a/b", "a/b/c", "/a", "a/", "a//b", "a.b/c", "$d/a", "$d",
        ];
        let filters = [
            "#", "a/#", "+", "+/b", "a/+/c", "/+", "a/+", "$d/#", "+/+", "a.b/#",
        ];
        for filter in filters {
            let (subjects, _) = filter_subjects("fanmq", filter);
            for t in topics {
                let subject = mapped(t);
                let nats = subjects
                    .iter()
                    .filter(|s| nats_matches(s, &subject))
                    .count();
                let mqtt = topic::filter_matches(filter, t);
                assert_eq!(nats, usize::from(mqtt), "filter {filter:?}, topic {t:?}");
            }
        }
    }

    #[test]
    fn foreign_or_malformed_subjects_are_refused() {
        for subject in [
            "other.t.a",
            "fanmq.q.a",
            "fanmq.t.a..b",
            "fanmq.t.a/b",
            "fanmq.t.a.*",
            "fanmq.t.$a",
            "fanmq.d.a",
        ] {
            assert!(subject_topic("fanmq", subject).is_err(), "{subject}");
        }
    }
}
