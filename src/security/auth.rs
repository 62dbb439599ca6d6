//! Authentication (CONNECT) and authorisation (PUBLISH, SUBSCRIBE, wills),
//! as Mosquitto does them: a `password_file` ([`crate::security::password`]), an
//! `acl_file` ([`crate::security::acl`]) and `allow_anonymous`.
//!
//! Both files live behind [`ArcSwap`]: every shard reads them without a lock,
//! and [`Auth::reload`] (SIGHUP) swaps in freshly read copies. A file that no
//! longer parses keeps the previous copy in force (and logs an error).
//! Existing connections keep their session and subscriptions; new CONNECTs
//! and later PUBLISH and SUBSCRIBE packets see the new data.
//!
//! CONNACK codes follow Mosquitto 2.x, checked against Mosquitto 2.0.11:
//! every refusal (no user name while anonymous clients are refused, unknown
//! user, wrong or missing password) is answered with return code 5, "not
//! authorised", not 4 ("bad user name or password"). Telling an unknown user
//! from a wrong password would tell a prober which user names exist, and
//! clients written against Mosquitto expect 5.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use bytes::Bytes;
use log::{error, info};

use crate::config::Config;
use crate::security::acl::{Acl, AclError, Coverage, Who};
use crate::security::password::{Hash, PasswordDb, PasswordError};

/// Largest PBKDF2 iteration count verified on the shard itself: at the
/// measured ~0.29 µs per iteration ([`crate::security::password`]) that is at most
/// ~0.3 ms, the cost of a few dozen sends. Mosquitto's default of 101
/// iterations (29 µs) stays inline, where a hand-off to another thread would
/// cost about as much as the work; costlier entries (up to
/// [`crate::security::password::MAX_ITERATIONS`], ~30 ms) run on the shard's blocking
/// thread (glommio's `spawn_blocking`, one unpinned thread per shard), so
/// one CONNECT never stalls the other clients of its shard.
pub const INLINE_MAX_ITERATIONS: u32 = 1000;

/// Errors loading the password or ACL file at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The password file is unreadable or invalid.
    #[error(transparent)]
    Password(#[from] PasswordError),
    /// The ACL file is unreadable or invalid.
    #[error(transparent)]
    Acl(#[from] AclError),
}

/// Why a CONNECT was refused (all answered with CONNACK 5, see the module
/// documentation); the text is for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No user name, and `allow_anonymous` is false.
    #[error("anonymous clients are not allowed")]
    Anonymous,
    /// The user name is not in the password file.
    #[error("unknown user")]
    UnknownUser,
    /// The password is missing or does not match.
    #[error("wrong or missing password")]
    BadPassword,
}

/// The broker's authentication and authorisation data.
#[derive(Debug)]
pub struct Auth {
    /// The password file, re-read on reload; None: no password checks.
    password_file: Option<PathBuf>,
    /// Its users (empty when there is no file).
    passwords: ArcSwap<PasswordDb>,
    /// The ACL file, re-read on reload; None: everything is allowed.
    acl_file: Option<PathBuf>,
    /// Its entries (empty when there is no file).
    acl: ArcSwap<Acl>,
    /// Whether clients without a user name may connect.
    allow_anonymous: bool,
}

/// What the CONNECT check still has to do after the cheap decisions.
enum Step {
    /// Decided.
    Done(Result<(), Refusal>),
    /// Compare this password with this hash.
    Verify(Box<Hash>, Bytes),
}

impl Auth {
    /// No password file, no ACL, anonymous clients allowed.
    pub fn open() -> Auth {
        Auth {
            password_file: None,
            passwords: ArcSwap::from_pointee(PasswordDb::default()),
            acl_file: None,
            acl: ArcSwap::from_pointee(Acl::default()),
            allow_anonymous: true,
        }
    }

    /// Loads the files the configuration names.
    ///
    /// # Errors
    /// An unreadable or invalid password or ACL file.
    pub fn load(config: &Config) -> Result<Auth, AuthError> {
        let passwords = match &config.password_file {
            Some(path) => PasswordDb::load(path)?,
            None => PasswordDb::default(),
        };
        let acl = match &config.acl_file {
            Some(path) => Acl::load(path)?,
            None => Acl::default(),
        };
        Ok(Auth {
            password_file: config.password_file.clone(),
            passwords: ArcSwap::from_pointee(passwords),
            acl_file: config.acl_file.clone(),
            acl: ArcSwap::from_pointee(acl),
            allow_anonymous: config.allow_anonymous(),
        })
    }

    /// True when an ACL file is in force (and the user name of a connection
    /// must be kept for its checks).
    pub fn acl_enabled(&self) -> bool {
        self.acl_file.is_some()
    }

    /// Whether clients without a user name may connect.
    pub fn allow_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Warnings for the start-up log: anonymous clients accepted on a
    /// listener that is not loopback-only.
    pub fn startup_warnings(&self, listeners: &[SocketAddr]) -> Vec<String> {
        if !self.allow_anonymous {
            return Vec::new();
        }
        listeners
            .iter()
            .filter(|addr| !addr.ip().is_loopback())
            .map(|addr| {
                format!(
                    "anonymous clients are accepted on {addr}, which is not loopback-only: \
                     anyone who can reach it may connect (set password_file, or allow_anonymous = false)"
                )
            })
            .collect()
    }

    /// Checks a CONNECT's credentials. `tls_identity` is the client
    /// certificate's identity when the listener uses it as the user name
    /// (Mosquitto's `use_identity_as_username`): the certificate then
    /// authenticates the client and the password file is not consulted.
    /// Costly PBKDF2 checks run off the shard (see [`INLINE_MAX_ITERATIONS`]).
    ///
    /// # Errors
    /// Why the client is refused.
    pub async fn check_connect(
        &self,
        username: Option<&str>,
        password: Option<&Bytes>,
        tls_identity: Option<&str>,
    ) -> Result<(), Refusal> {
        match self.first_step(username, password, tls_identity) {
            Step::Done(result) => result,
            Step::Verify(hash, password) if hash.iterations() <= INLINE_MAX_ITERATIONS => {
                verified(hash.verify(&password))
            }
            Step::Verify(hash, password) => {
                let ok = glommio::executor()
                    .spawn_blocking(move || hash.verify(&password))
                    .await;
                verified(ok)
            }
        }
    }

    /// [`Auth::check_connect`] without an executor: every verification
    /// inline (unit tests).
    #[cfg(test)]
    ///
    /// # Errors
    /// Why the client is refused.
    pub fn check_connect_inline(
        &self,
        username: Option<&str>,
        password: Option<&Bytes>,
        tls_identity: Option<&str>,
    ) -> Result<(), Refusal> {
        match self.first_step(username, password, tls_identity) {
            Step::Done(result) => result,
            Step::Verify(hash, password) => verified(hash.verify(&password)),
        }
    }

    /// The decisions that need no hashing.
    fn first_step(
        &self,
        username: Option<&str>,
        password: Option<&Bytes>,
        tls_identity: Option<&str>,
    ) -> Step {
        if tls_identity.is_some() {
            return Step::Done(Ok(()));
        }
        let Some(username) = username else {
            return Step::Done(if self.allow_anonymous {
                Ok(())
            } else {
                Err(Refusal::Anonymous)
            });
        };
        if self.password_file.is_none() {
            // Nothing to check a user name against (Mosquitto does the same).
            return Step::Done(Ok(()));
        }
        let db = self.passwords.load();
        let Some(hash) = db.get(username) else {
            return Step::Done(Err(Refusal::UnknownUser));
        };
        let Some(password) = password else {
            return Step::Done(Err(Refusal::BadPassword));
        };
        Step::Verify(Box::new(hash.clone()), password.clone())
    }

    /// May `who` publish to `topic`? Always true without an ACL file.
    pub fn can_publish(&self, who: Who<'_>, topic: &str) -> bool {
        !self.acl_enabled() || self.acl.load().can_publish(who, topic)
    }

    /// How much of `filter` `who` may read ([`Coverage`]): all of it
    /// without an ACL file.
    pub fn subscription(&self, who: Who<'_>, filter: &str) -> Coverage {
        if self.acl_enabled() {
            self.acl.load().subscription(who, filter)
        } else {
            Coverage::Full
        }
    }

    /// May `who` receive a message on `topic`? Always true without an ACL
    /// file. Asked per delivery only for clients with a
    /// [`Coverage::Partial`] subscription.
    pub fn can_read(&self, who: Who<'_>, topic: &str) -> bool {
        !self.acl_enabled() || self.acl.load().can_read(who, topic)
    }

    /// Read checks of one message on `topic` for the subscribers it is
    /// offered to ([`ReadChecker`]).
    pub fn read_checker<'a>(&self, topic: &'a str) -> ReadChecker<'a> {
        ReadChecker {
            acl: self.acl_enabled().then(|| self.acl.load()),
            topic,
            last: None,
        }
    }

    /// Re-reads the password and ACL files (SIGHUP). A file that fails to
    /// load leaves its previous contents in force; the outcome is logged.
    pub fn reload(&self) {
        if let Some(path) = &self.password_file {
            match PasswordDb::load(path) {
                Ok(db) => {
                    info!(
                        "SIGHUP: password file {} reloaded ({} users)",
                        path.display(),
                        db.len()
                    );
                    self.passwords.store(Arc::new(db));
                }
                Err(e) => error!("SIGHUP: {e}; the previous password file stays in force"),
            }
        }
        if let Some(path) = &self.acl_file {
            match Acl::load(path) {
                Ok(acl) => {
                    info!("SIGHUP: ACL file {} reloaded", path.display());
                    self.acl.store(Arc::new(acl));
                }
                Err(e) => error!("SIGHUP: {e}; the previous ACL file stays in force"),
            }
        }
    }
}

/// The read checks of one message's topic for the subscribers it is
/// offered to: the ACL is loaded once, not per subscriber, and while no
/// entry names the client id (`%c`) the answer depends on the user name
/// alone, so the last user name's answer is kept (the subscribers of a
/// fan-out are mostly one user, or all anonymous).
pub struct ReadChecker<'a> {
    /// The ACL in force; None without an ACL file (everything readable).
    acl: Option<Guard<Arc<Acl>>>,
    /// The message's topic.
    topic: &'a str,
    /// The last user name checked and its answer.
    last: Option<(Option<Box<str>>, bool)>,
}

impl ReadChecker<'_> {
    /// May `who` receive the message?
    pub fn can_read(&mut self, who: Who<'_>) -> bool {
        let Some(acl) = &self.acl else {
            return true;
        };
        if acl.names_client_id() {
            return acl.can_read(who, self.topic);
        }
        if let Some((username, answer)) = &self.last
            && username.as_deref() == who.username
        {
            return *answer;
        }
        let answer = acl.can_read(who, self.topic);
        self.last = Some((who.username.map(Box::from), answer));
        answer
    }
}

/// The outcome of a password comparison.
fn verified(ok: bool) -> Result<(), Refusal> {
    if ok {
        Ok(())
    } else {
        Err(Refusal::BadPassword)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn config(
        password_file: Option<&str>,
        allow_anonymous: Option<bool>,
    ) -> (Config, tempfile::NamedTempFile) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        if let Some(text) = password_file {
            file.write_all(text.as_bytes()).unwrap();
        }
        let config = Config {
            password_file: password_file.map(|_| file.path().to_path_buf()),
            allow_anonymous,
            ..Config::default()
        };
        (config, file)
    }

    fn entry(user: &str, password: &str, iterations: u32) -> String {
        let hash = Hash::new_pbkdf2(password.as_bytes(), iterations).unwrap();
        format!("{user}:{hash}\n")
    }

    #[test]
    fn anonymous_default_follows_the_password_file() {
        let (c, _f) = config(None, None);
        let auth = Auth::load(&c).unwrap();
        assert!(auth.allow_anonymous());
        assert_eq!(auth.check_connect_inline(None, None, None), Ok(()));
        // Without a password file any user name is accepted.
        let pw = Bytes::from_static(b"x");
        assert_eq!(
            auth.check_connect_inline(Some("u"), Some(&pw), None),
            Ok(())
        );

        let (c, _f) = config(Some(&entry("alice", "secret", 1)), None);
        let auth = Auth::load(&c).unwrap();
        assert!(!auth.allow_anonymous());
        assert_eq!(
            auth.check_connect_inline(None, None, None),
            Err(Refusal::Anonymous)
        );
        // The explicit setting wins.
        let (c, _f) = config(Some(&entry("alice", "secret", 1)), Some(true));
        assert!(Auth::load(&c).unwrap().allow_anonymous());
        let (c, _f) = config(None, Some(false));
        assert!(!Auth::load(&c).unwrap().allow_anonymous());
    }

    #[test]
    fn users_and_passwords() {
        let (c, _f) = config(Some(&entry("alice", "secret", 101)), None);
        let auth = Auth::load(&c).unwrap();
        let good = Bytes::from_static(b"secret");
        let bad = Bytes::from_static(b"Secret");
        assert_eq!(
            auth.check_connect_inline(Some("alice"), Some(&good), None),
            Ok(())
        );
        assert_eq!(
            auth.check_connect_inline(Some("alice"), Some(&bad), None),
            Err(Refusal::BadPassword)
        );
        assert_eq!(
            auth.check_connect_inline(Some("alice"), None, None),
            Err(Refusal::BadPassword)
        );
        assert_eq!(
            auth.check_connect_inline(Some("bob"), Some(&good), None),
            Err(Refusal::UnknownUser)
        );
        // A TLS identity authenticates on its own.
        assert_eq!(
            auth.check_connect_inline(None, None, Some("CN=dev")),
            Ok(())
        );
    }

    #[test]
    fn reload_swaps_good_files_and_keeps_the_old_on_errors() {
        let (c, mut f) = config(Some(&entry("alice", "secret", 1)), None);
        let auth = Auth::load(&c).unwrap();
        let pw = Bytes::from_static(b"pw2");
        assert!(
            auth.check_connect_inline(Some("bob"), Some(&pw), None)
                .is_err()
        );
        std::fs::write(f.path(), entry("bob", "pw2", 1)).unwrap();
        auth.reload();
        assert_eq!(
            auth.check_connect_inline(Some("bob"), Some(&pw), None),
            Ok(())
        );
        f.write_all(b"garbage line\n").unwrap();
        auth.reload();
        assert_eq!(
            auth.check_connect_inline(Some("bob"), Some(&pw), None),
            Ok(())
        );
    }

    #[test]
    fn no_acl_allows_everything() {
        let auth = Auth::open();
        let who = Who {
            client_id: "c",
            username: None,
        };
        assert!(auth.can_publish(who, "a/b"));
        assert_eq!(auth.subscription(who, "#"), Coverage::Full);
        assert!(auth.can_read(who, "a/b"));
        assert!(auth.read_checker("a/b").can_read(who));
    }

    #[test]
    fn a_read_checker_answers_per_user_name_and_per_client_with_client_id_patterns() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"topic read a/#\nuser bob\ntopic read b/#\n")
            .unwrap();
        let config = Config {
            acl_file: Some(file.path().to_path_buf()),
            ..Config::default()
        };
        let auth = Auth::load(&config).unwrap();
        let anon = Who {
            client_id: "c1",
            username: None,
        };
        let bob = Who {
            client_id: "c2",
            username: Some("bob"),
        };
        let mut checker = auth.read_checker("a/x");
        for _ in 0..2 {
            assert!(checker.can_read(anon));
            assert!(!checker.can_read(bob));
        }
        std::fs::write(file.path(), "pattern read d/%c\n").unwrap();
        auth.reload();
        let mut checker = auth.read_checker("d/c1");
        assert!(checker.can_read(anon));
        assert!(!checker.can_read(Who {
            client_id: "c3",
            username: None
        }));
    }

    #[test]
    fn anonymous_on_a_public_listener_is_warned_about() {
        let auth = Auth::open();
        let local: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:1883".parse().unwrap();
        assert!(auth.startup_warnings(&[local]).is_empty());
        assert_eq!(auth.startup_warnings(&[local, public]).len(), 1);
        let (c, _f) = config(Some(&entry("alice", "secret", 1)), None);
        assert!(
            Auth::load(&c)
                .unwrap()
                .startup_warnings(&[public])
                .is_empty()
        );
    }
}
