//! Password files in Mosquitto's `mosquitto_passwd` format.
//!
//! One entry per line, `username:hash`; empty lines and lines starting with
//! `#` are ignored. Two hash formats are understood, both Mosquitto's:
//! - `$7$<iterations>$<base64 salt>$<base64 hash>`: PBKDF2-HMAC-SHA512 with a
//!   64-byte output (Mosquitto 2.x's default, 101 iterations, 12-byte salt).
//!   This is what `fanmq passwd` writes.
//! - `$6$<base64 salt>$<base64 hash>`: one SHA-512 of the password followed
//!   by the salt (Mosquitto 1.x; still accepted by Mosquitto 2.x).
//!
//! A file with any malformed line is refused as a whole (the error names the
//! line number, never its content): at start-up the broker does not start, on
//! reload the previous file stays in force. Comparisons are constant-time.
//!
//! # Cost of a verification
//! PBKDF2 is slow on purpose. Measured on the development VM (release build
//! of the `pbkdf2` 0.12 and `sha2` 0.10 crates, one core; the same loop as
//! `cargo test --release --lib password::tests::measure_cost -- --ignored
//! --nocapture`): 1 iteration 0.6 µs, 101 iterations 29 µs, 1,000 0.28 ms,
//! 10,000 2.9 ms, 100,000 29 ms: about 0.29 µs per iteration. A `$6$`
//! entry costs one SHA-512, under 1 µs. Entries above [`MAX_ITERATIONS`] are
//! refused so that one CONNECT costs at most ~30 ms of a CPU, and
//! [`crate::security::auth`] runs verifications above
//! [`crate::security::auth::INLINE_MAX_ITERATIONS`] off the shard.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// Iterations `fanmq passwd` uses by default: Mosquitto 2.x's default, so
/// files written by either tool cost the same to check.
pub const DEFAULT_ITERATIONS: u32 = 101;

/// Most PBKDF2 iterations an entry may ask for (about 30 ms of one CPU per
/// CONNECT at the measured ~0.29 µs per iteration; 1,000 times Mosquitto's
/// default). Higher counts would let a
/// password file turn every CONNECT into a long stall; such a file is refused.
pub const MAX_ITERATIONS: u32 = 100_000;

/// Salt length `fanmq passwd` writes, in bytes: Mosquitto's (12).
pub const SALT_LEN: usize = 12;

/// Hash length of both formats, in bytes: SHA-512's output.
pub const HASH_LEN: usize = 64;

/// Largest salt accepted from a file, in bytes: far above any real salt,
/// bounds what one entry can make us store.
const MAX_SALT_LEN: usize = 1024;

/// Errors reading or parsing a password file.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The file could not be read.
    #[error("cannot read password file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not a valid entry (its content is not repeated: it may hold
    /// a password hash).
    #[error("password file line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// How a password is hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hash {
    /// `$6$`: SHA-512(password ‖ salt).
    Sha512 {
        /// The salt.
        salt: Vec<u8>,
        /// The digest.
        hash: [u8; HASH_LEN],
    },
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        /// Iteration count (at most [`MAX_ITERATIONS`]).
        iterations: u32,
        /// The salt.
        salt: Vec<u8>,
        /// The derived key.
        hash: [u8; HASH_LEN],
    },
}

impl Hash {
    /// Hashes `password` with a fresh random salt, as `$7$` with `iterations`.
    ///
    /// # Errors
    /// The system's random source failed.
    pub fn new_pbkdf2(password: &[u8], iterations: u32) -> Result<Hash, getrandom::Error> {
        let mut salt = vec![0u8; SALT_LEN];
        getrandom::fill(&mut salt)?;
        let hash = pbkdf2_sha512(password, &salt, iterations);
        Ok(Hash::Pbkdf2Sha512 {
            iterations,
            salt,
            hash,
        })
    }

    /// Parses the part after `username:`.
    ///
    /// # Errors
    /// A string that is neither a `$6$` nor a `$7$` hash, bad base64, a
    /// wrong hash length, or an iteration count of 0 or above
    /// [`MAX_ITERATIONS`].
    pub fn parse(text: &str) -> Result<Hash, String> {
        let parts: Vec<&str> = text.split('$').collect();
        match parts.as_slice() {
            ["", "6", salt, hash] => Ok(Hash::Sha512 {
                salt: decode_salt(salt)?,
                hash: decode_hash(hash)?,
            }),
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 = iterations
                    .parse()
                    .map_err(|_| "iteration count is not a number".to_string())?;
                if iterations == 0 || iterations > MAX_ITERATIONS {
                    return Err(format!(
                        "iteration count {iterations} is outside 1..={MAX_ITERATIONS}"
                    ));
                }
                Ok(Hash::Pbkdf2Sha512 {
                    iterations,
                    salt: decode_salt(salt)?,
                    hash: decode_hash(hash)?,
                })
            }
            _ => Err("not a $6$ or $7$ password hash (plain-text passwords are not accepted; hash them with fanmq passwd)".to_string()),
        }
    }

    /// The iteration count (1 for `$6$`): what a verification costs.
    pub fn iterations(&self) -> u32 {
        match self {
            Hash::Sha512 { .. } => 1,
            Hash::Pbkdf2Sha512 { iterations, .. } => *iterations,
        }
    }

    /// True when `password` matches (constant-time comparison).
    pub fn verify(&self, password: &[u8]) -> bool {
        let computed = match self {
            Hash::Sha512 { salt, .. } => {
                let mut sha = Sha512::new();
                sha.update(password);
                sha.update(salt);
                let digest: [u8; HASH_LEN] = sha.finalize().into();
                digest
            }
            Hash::Pbkdf2Sha512 {
                iterations, salt, ..
            } => pbkdf2_sha512(password, salt, *iterations),
        };
        let expected = match self {
            Hash::Sha512 { hash, .. } | Hash::Pbkdf2Sha512 { hash, .. } => hash,
        };
        computed.ct_eq(expected).into()
    }
}

impl std::fmt::Display for Hash {
    /// The file format, as Mosquitto writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hash::Sha512 { salt, hash } => {
                write!(f, "$6${}${}", BASE64.encode(salt), BASE64.encode(hash))
            }
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => write!(
                f,
                "$7${iterations}${}${}",
                BASE64.encode(salt),
                BASE64.encode(hash)
            ),
        }
    }
}

/// PBKDF2-HMAC-SHA512 with a 64-byte output.
fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> [u8; HASH_LEN] {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
    out
}

/// Decodes a base64 salt.
fn decode_salt(text: &str) -> Result<Vec<u8>, String> {
    let salt = BASE64
        .decode(text)
        .map_err(|_| "salt is not valid base64".to_string())?;
    if salt.is_empty() || salt.len() > MAX_SALT_LEN {
        return Err(format!("salt must be 1 to {MAX_SALT_LEN} bytes"));
    }
    Ok(salt)
}

/// Decodes a base64 hash of exactly [`HASH_LEN`] bytes.
fn decode_hash(text: &str) -> Result<[u8; HASH_LEN], String> {
    let hash = BASE64
        .decode(text)
        .map_err(|_| "hash is not valid base64".to_string())?;
    hash.try_into()
        .map_err(|_| format!("hash is not {HASH_LEN} bytes (truncated line?)"))
}

/// The users of a password file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PasswordDb {
    /// Hash by user name.
    users: HashMap<String, Hash>,
}

impl PasswordDb {
    /// Reads and parses a password file.
    ///
    /// # Errors
    /// An unreadable file or any malformed line.
    pub fn load(path: &Path) -> Result<PasswordDb, PasswordError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswordError::Read {
            path: path.display().to_string(),
            source,
        })?;
        PasswordDb::parse(&text)
    }

    /// Parses a password file's text.
    ///
    /// # Errors
    /// Any malformed line: no `:`, an empty user name, a user listed twice,
    /// an invalid hash (see [`Hash::parse`]).
    pub fn parse(text: &str) -> Result<PasswordDb, PasswordError> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let bad = |why: String| PasswordError::Line {
                line: index + 1,
                why,
            };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((username, hash)) = line.split_once(':') else {
                return Err(bad("no ':' between user name and hash".to_string()));
            };
            if username.is_empty() {
                return Err(bad("empty user name".to_string()));
            }
            let hash = Hash::parse(hash).map_err(bad)?;
            if users.insert(username.to_string(), hash).is_some() {
                return Err(bad(format!("user {username:?} is listed twice")));
            }
        }
        Ok(PasswordDb { users })
    }

    /// The hash of `username`, if listed.
    pub fn get(&self, username: &str) -> Option<&Hash> {
        self.users.get(username)
    }

    /// Adds or replaces a user.
    #[cfg(test)]
    pub fn set(&mut self, username: &str, hash: Hash) {
        self.users.insert(username.to_string(), hash);
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// The file's text, one `user:hash` line per user, sorted by name.
    #[cfg(test)]
    pub fn to_file_text(&self) -> String {
        let mut names: Vec<&String> = self.users.keys().collect();
        names.sort();
        let mut text = String::new();
        for name in names {
            text.push_str(name);
            text.push(':');
            text.push_str(&self.users[name].to_string());
            text.push('\n');
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Mosquitto 2.0.11's `mosquitto_passwd -c -b pw alice secret`.
    const MOSQUITTO_7: &str = "alice:$7$101$u4c4JudwnxfrYn6R$GFRlxuRBB1MV9kiOnG0yTTSiEEVl+Bzrtx9zINCjneSVxz+sYx0hC9GUcr+iiWO6C3zDuQHZUGD+2QJ5tcqt7w==";

    /// A `$6$` entry for password "secret", salt "salt1234" (computed as
    /// Mosquitto 1.x does: SHA-512 of the password then the salt).
    fn sha512_entry(user: &str, password: &str, salt: &[u8]) -> String {
        let mut sha = Sha512::new();
        sha.update(password.as_bytes());
        sha.update(salt);
        let hash = sha.finalize();
        format!("{user}:$6${}${}", BASE64.encode(salt), BASE64.encode(hash))
    }

    #[test]
    fn mosquitto_pbkdf2_entries_verify() {
        let db = PasswordDb::parse(MOSQUITTO_7).unwrap();
        let hash = db.get("alice").unwrap();
        assert_eq!(hash.iterations(), 101);
        assert!(hash.verify(b"secret"));
        assert!(!hash.verify(b"Secret"));
        assert!(!hash.verify(b""));
        assert!(db.get("bob").is_none());
        // Written back exactly as Mosquitto wrote it.
        assert_eq!(db.to_file_text(), format!("{MOSQUITTO_7}\n"));
    }

    #[test]
    fn sha512_entries_verify() {
        let text = format!(
            "# comment\n\n{}\r\n{}\n",
            sha512_entry("bob", "pw", b"salt1234"),
            sha512_entry("carol", "other", b"xy")
        );
        let db = PasswordDb::parse(&text).unwrap();
        assert_eq!(db.len(), 2);
        assert!(db.get("bob").unwrap().verify(b"pw"));
        assert!(!db.get("bob").unwrap().verify(b"other"));
        assert!(db.get("carol").unwrap().verify(b"other"));
    }

    #[test]
    fn new_hashes_round_trip() {
        let hash = Hash::new_pbkdf2(b"p4ss", DEFAULT_ITERATIONS).unwrap();
        let mut db = PasswordDb::default();
        db.set("dave", hash);
        let again = PasswordDb::parse(&db.to_file_text()).unwrap();
        assert_eq!(again, db);
        assert!(again.get("dave").unwrap().verify(b"p4ss"));
        assert!(!again.get("dave").unwrap().verify(b"p4sS"));
        // Two hashes of one password differ (random salt).
        assert_ne!(
            Hash::new_pbkdf2(b"p4ss", 1).unwrap(),
            Hash::new_pbkdf2(b"p4ss", 1).unwrap()
        );
    }

    #[test]
    fn bad_lines_refuse_the_file_and_name_the_line() {
        let truncated = &MOSQUITTO_7[..MOSQUITTO_7.len() - 10];
        let cases = [
            ("alice", 1),                                  // no colon
            (":$6$c2FsdA==$AAAA", 1),                      // empty user
            ("alice:secret", 1),                           // plain text
            (truncated, 1),                                // truncated hash
            ("alice:$7$abc$AAAA$AAAA", 1),                 // iterations not a number
            ("alice:$7$0$c2FsdA==$AAAA", 1),               // zero iterations
            ("alice:$6$!!!$AAAA", 1),                      // bad base64
            ("# ok\nalice:$5$c2FsdA==$AAAA", 2),           // unknown scheme
            ("alice:$7$101$$AAAA", 1),                     // empty salt
            (&format!("{MOSQUITTO_7}\n{MOSQUITTO_7}"), 2), // listed twice
        ];
        for (text, line) in cases {
            match PasswordDb::parse(text) {
                Err(PasswordError::Line { line: l, why }) => {
                    assert_eq!(l, line, "{text:?}: {why}");
                    assert!(!why.contains("GFRlxu"), "hash leaked into {why}");
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn iteration_counts_above_the_cap_are_refused() {
        let hash = Hash::new_pbkdf2(b"x", 1).unwrap().to_string();
        let high = hash.replacen("$7$1$", &format!("$7${}$", MAX_ITERATIONS + 1), 1);
        assert!(PasswordDb::parse(&format!("u:{high}")).is_err());
        let at_cap = hash.replacen("$7$1$", &format!("$7${MAX_ITERATIONS}$"), 1);
        assert!(PasswordDb::parse(&format!("u:{at_cap}")).is_ok());
    }

    /// Prints the cost of one verification (run with --release --ignored).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_cost() {
        for iterations in [1u32, 101, 1000, 10_000, MAX_ITERATIONS] {
            let hash = Hash::new_pbkdf2(b"password", iterations).unwrap();
            let rounds = (200_000 / iterations).max(3);
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                assert!(hash.verify(b"password"));
            }
            let each = start.elapsed() / rounds;
            println!("PBKDF2-HMAC-SHA512, {iterations} iterations: {each:?} per verification");
        }
    }
}
