//! Topic Names and Topic Filters (MQTT 3.1.1 §4.7): validation and matching.
//!
//! A *Topic Name* is what a PUBLISH (or a will) is sent to: levels separated by
//! `/`, no wildcards. A *Topic Filter* is what a SUBSCRIBE asks for: it may use
//! `+` (exactly one level) and `#` (this level and everything below, last level
//! only). The codec only checks that these are UTF-8 strings; this module checks
//! what they mean, and [`filter_matches`] is the reference the router's trie is
//! tested against.
//!
//! Empty levels are valid (`a//b`, `/a`, `a/`), and topics starting with `$`
//! (such as `$SYS/...`) are not matched by filters whose first level is a wildcard
//! (§4.7.2).

use thiserror::Error;

/// Longest Topic Name or Topic Filter in bytes (§4.7.3): it is a UTF-8 string
/// with a 16-bit length prefix.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Topic level separator (§4.7.1.1).
pub const LEVEL_SEPARATOR: char = '/';

/// Multi-level wildcard (§4.7.1.2): this level and all below it.
pub const MULTI_LEVEL_WILDCARD: &str = "#";

/// Single-level wildcard (§4.7.1.3): exactly one level.
pub const SINGLE_LEVEL_WILDCARD: &str = "+";

/// How a shared subscription's filter starts (MQTT 5.0 §4.8.2).
pub const SHARED_PREFIX: &str = "$share/";

/// Why a string is not a valid Topic Name or Topic Filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum TopicError {
    /// Topic Names and Topic Filters must be at least one character long
    /// (§4.7.3, MQTT-4.7.3-1).
    #[error("empty topic")]
    Empty,
    /// Longer than [`MAX_TOPIC_LEN`] bytes (MQTT-4.7.3-3).
    #[error("topic of {0} bytes exceeds {MAX_TOPIC_LEN}")]
    TooLong(usize),
    /// Contains U+0000 (MQTT-4.7.3-2).
    #[error("topic contains U+0000")]
    NullCharacter,
    /// A Topic Name containing `+` or `#` (MQTT-3.3.2-2).
    #[error("wildcard in a topic name")]
    WildcardInTopicName,
    /// A `#` that is not a whole level, or not the last level (MQTT-4.7.1-2).
    #[error("'#' must be the last level and alone in it")]
    MisplacedMultiLevelWildcard,
    /// A `+` that is not a whole level (MQTT-4.7.1-3).
    #[error("'+' must be alone in its level")]
    MisplacedSingleLevelWildcard,
}

/// Checks the rules common to names and filters: length and U+0000.
fn validate_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(topic.len()));
    }
    if topic.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// True when `topic` (a Topic Name or Filter) has more than `max` levels
/// (`max_topic_levels`; 0: no limit). One byte scan, once per PUBLISH or
/// filter received, never per delivery.
pub fn exceeds_levels(topic: &str, max: usize) -> bool {
    max > 0 && topic.bytes().filter(|&b| b == b'/').count() >= max
}

/// Checks a Topic Name (a PUBLISH's or a will's topic): non-empty, at most
/// [`MAX_TOPIC_LEN`] bytes, no U+0000, no wildcard characters.
///
/// # Errors
///
/// The first rule broken, as a [`TopicError`].
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    validate_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInTopicName);
    }
    Ok(())
}

/// Checks a Topic Filter (from SUBSCRIBE or UNSUBSCRIBE): non-empty, at most
/// [`MAX_TOPIC_LEN`] bytes, no U+0000, `#` only as the whole last level, `+` only
/// as a whole level.
///
/// # Errors
///
/// The first rule broken, as a [`TopicError`].
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    validate_common(filter)?;
    let mut levels = filter.split(LEVEL_SEPARATOR).peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != MULTI_LEVEL_WILDCARD || levels.peek().is_some()) {
            return Err(TopicError::MisplacedMultiLevelWildcard);
        }
        if level.contains('+') && level != SINGLE_LEVEL_WILDCARD {
            return Err(TopicError::MisplacedSingleLevelWildcard);
        }
    }
    Ok(())
}

/// Whether `topic` starts with `$`: a server-specific topic such as `$SYS/...`,
/// which filters starting with a wildcard do not match (§4.7.2).
pub fn is_sys_topic(topic: &str) -> bool {
    topic.starts_with('$')
}

/// Whether the Topic Filter `filter` matches the Topic Name `topic` (§4.7).
///
/// Level by level: `+` matches any one level (including an empty one), `#` matches
/// the rest including the parent level itself (`sport/#` matches `sport`), other
/// levels match exactly (case-sensitive). A `$` topic is not matched by a filter
/// whose first level is `+` or `#` (MQTT-4.7.2-1).
///
/// Both arguments are expected to be valid; invalid input gives an unspecified
/// answer but never panics.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if is_sys_topic(topic) && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split(LEVEL_SEPARATOR);
    let mut topic_levels = topic.split(LEVEL_SEPARATOR);
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some(MULTI_LEVEL_WILDCARD), _) => return true,
            (Some(SINGLE_LEVEL_WILDCARD), Some(_)) => {}
            (Some(filter_level), Some(topic_level)) => {
                if filter_level != topic_level {
                    return false;
                }
            }
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in [
            "a",
            "/",
            "a/b/c",
            "/finance",
            "sport/",
            "a//b",
            "$SYS/broker/load",
            " ",
            "ä/ö",
        ] {
            assert_eq!(validate_topic_name(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert_eq!(
            validate_topic_name("a/+"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(
            validate_topic_name("a/#"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(
            validate_topic_name("a+b"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(validate_topic_name("a\0b"), Err(TopicError::NullCharacter));
        let max = "x".repeat(MAX_TOPIC_LEN);
        assert_eq!(validate_topic_name(&max), Ok(()));
        let long = "x".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            validate_topic_name(&long),
            Err(TopicError::TooLong(MAX_TOPIC_LEN + 1))
        );
    }

    #[test]
    fn topic_filters_from_the_spec() {
        // §4.7.1.2 and §4.7.1.3 valid examples.
        for ok in [
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "+/+",
            "/+",
            "sport/+",
            "a//b",
            "/",
            "$SYS/#",
        ] {
            assert_eq!(validate_topic_filter(ok), Ok(()), "{ok:?}");
        }
        // §4.7.1.2 and §4.7.1.3 invalid examples.
        assert_eq!(
            validate_topic_filter("sport/tennis#"),
            Err(TopicError::MisplacedMultiLevelWildcard)
        );
        assert_eq!(
            validate_topic_filter("sport/tennis/#/ranking"),
            Err(TopicError::MisplacedMultiLevelWildcard)
        );
        assert_eq!(
            validate_topic_filter("#/"),
            Err(TopicError::MisplacedMultiLevelWildcard)
        );
        assert_eq!(
            validate_topic_filter("##"),
            Err(TopicError::MisplacedMultiLevelWildcard)
        );
        assert_eq!(
            validate_topic_filter("sport+"),
            Err(TopicError::MisplacedSingleLevelWildcard)
        );
        assert_eq!(
            validate_topic_filter("a/++/b"),
            Err(TopicError::MisplacedSingleLevelWildcard)
        );
        assert_eq!(validate_topic_filter(""), Err(TopicError::Empty));
        assert_eq!(
            validate_topic_filter("a/\0"),
            Err(TopicError::NullCharacter)
        );
        let long = "+/".repeat(MAX_TOPIC_LEN / 2 + 1);
        assert_eq!(
            validate_topic_filter(&long),
            Err(TopicError::TooLong(long.len()))
        );
    }

    #[test]
    fn multi_level_wildcard_examples() {
        // §4.7.1.2.
        for topic in [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ] {
            assert!(filter_matches("sport/tennis/player1/#", topic), "{topic}");
        }
        assert!(filter_matches("sport/#", "sport"));
        assert!(filter_matches("sport/#", "sport/"));
        assert!(filter_matches("#", "sport/tennis"));
        assert!(filter_matches("#", "/"));
        assert!(!filter_matches("sport/tennis/player1/#", "sport/tennis"));
        assert!(!filter_matches("sport/#", "sports"));
    }

    #[test]
    fn single_level_wildcard_examples() {
        // §4.7.1.3.
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!filter_matches(
            "sport/tennis/+",
            "sport/tennis/player1/ranking"
        ));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(filter_matches("/+", "/finance"));
        assert!(!filter_matches("+", "/finance"));
        assert!(filter_matches("+", "finance"));
        assert!(filter_matches("+/tennis/#", "sport/tennis/player1"));
        assert!(filter_matches("+/tennis/#", "sport/tennis"));
        assert!(filter_matches("sport/+/player1", "sport/tennis/player1"));
        assert!(filter_matches("a/+/b", "a//b"));
    }

    #[test]
    fn dollar_topics() {
        // §4.7.2.
        assert!(is_sys_topic("$SYS/broker"));
        assert!(is_sys_topic("$"));
        assert!(!is_sys_topic("SYS/$"));
        assert!(!filter_matches("#", "$SYS/broker/clients"));
        assert!(!filter_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS"));
        // Only the first level matters: a '$' later is ordinary.
        assert!(filter_matches("a/+", "a/$b"));
        assert!(filter_matches("#", "a/$b"));
    }

    #[test]
    fn exact_and_case_sensitive() {
        assert!(filter_matches("ACCOUNTS", "ACCOUNTS"));
        assert!(!filter_matches("ACCOUNTS", "Accounts"));
        assert!(!filter_matches("a/b", "a/b/c"));
        assert!(!filter_matches("a/b/c", "a/b"));
        assert!(filter_matches("/", "/"));
        assert!(!filter_matches("/", "a"));
        assert!(filter_matches("a//b", "a//b"));
        assert!(!filter_matches("a/b", "a//b"));
        // "/finance" and "finance" are different topics.
        assert!(!filter_matches("finance", "/finance"));
        // Spaces are ordinary characters.
        assert!(filter_matches("a b/+", "a b/c d"));
    }

    #[test]
    fn invalid_input_never_panics() {
        for filter in ["", "#/a", "a#", "++", "/", "//"] {
            for topic in ["", "/", "a", "$", "a/b/c"] {
                let _ = filter_matches(filter, topic);
            }
        }
    }

    #[test]
    fn level_limit() {
        assert!(!exceeds_levels("a/b/c", 3));
        assert!(exceeds_levels("a/b/c/d", 3));
        assert!(exceeds_levels("///", 3), "empty levels count");
        assert!(!exceeds_levels("a/b/c/d/e/f", 0), "0: no limit");
        assert!(!exceeds_levels("a", 1));
        assert!(exceeds_levels("a/", 1));
    }
}
