//! `fanmq passwd`: manage a password file, like Mosquitto's `mosquitto_passwd`.
//!
//! ```text
//! fanmq passwd -c FILE USER            # create (or overwrite) FILE, prompt
//! fanmq passwd FILE USER               # add or update USER, prompt
//! fanmq passwd -b FILE USER PASSWORD   # batch: password on the command line
//! fanmq passwd -D FILE USER            # delete USER
//! fanmq passwd -I 10000 -b FILE USER PASSWORD   # more PBKDF2 iterations
//! ```
//!
//! Entries are written as `$7$` (PBKDF2-HMAC-SHA512, random 12-byte salt,
//! 101 iterations unless `-I`), the format Mosquitto 2.x writes and reads.
//! Editing keeps the file's other lines (comments, order) and refuses a file
//! that does not parse. The new file is written next to the old one and
//! renamed over it, so a broker re-reading it on SIGHUP never sees half a
//! file; a new file is created readable by its owner only.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::security::password::{
    DEFAULT_ITERATIONS, Hash, MAX_ITERATIONS, PasswordDb, PasswordError,
};

/// Mode of a password file `fanmq passwd` creates: owner read/write only
/// (the hashes are slow to crack, not impossible).
const NEW_FILE_MODE: u32 = 0o600;

/// Errors of `fanmq passwd`.
#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The existing file does not parse.
    #[error(transparent)]
    Parse(#[from] PasswordError),
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// The user to delete is not in the file.
    #[error("user {0:?} is not in the password file")]
    NoSuchUser(String),
    /// The system's random source failed.
    #[error("cannot get random bytes for the salt: {0}")]
    Random(getrandom::Error),
}

/// `fanmq passwd`'s arguments (mosquitto_passwd's flags).
#[derive(clap::Args, Debug, Clone)]
pub struct PasswdArgs {
    /// Create a new password file, overwriting an existing one.
    #[arg(short = 'c', conflicts_with = "delete")]
    pub create: bool,
    /// Delete the user.
    #[arg(short = 'D')]
    pub delete: bool,
    /// Batch mode: the password is the third argument (visible to other
    /// users in the process list; prefer the prompt).
    #[arg(short = 'b', conflicts_with = "delete")]
    pub batch: bool,
    /// PBKDF2 iterations for the new hash.
    #[arg(short = 'I', value_name = "N", default_value_t = DEFAULT_ITERATIONS)]
    pub iterations: u32,
    /// The password file.
    pub file: PathBuf,
    /// The user name.
    pub username: String,
    /// The password (with -b only).
    pub password: Option<String>,
}

/// Runs `fanmq passwd`; silent on success, as `mosquitto_passwd`.
///
/// # Errors
/// Bad arguments, an unreadable or invalid file, a write that fails.
pub fn run(args: &PasswdArgs) -> Result<(), PasswdError> {
    check_username(&args.username)?;
    if args.iterations == 0 || args.iterations > MAX_ITERATIONS {
        return Err(PasswdError::Usage(format!(
            "-I must be between 1 and {MAX_ITERATIONS} (the broker refuses more)"
        )));
    }
    if args.password.is_some() && !args.batch {
        return Err(PasswdError::Usage(
            "a password argument needs -b (batch mode)".to_string(),
        ));
    }
    let existing = if args.create {
        String::new()
    } else {
        fs::read_to_string(&args.file).map_err(|source| PasswdError::Io {
            path: args.file.clone(),
            source,
        })?
    };
    // Refuse to edit a file the broker would refuse.
    PasswordDb::parse(&existing)?;
    if args.delete {
        let text = remove_user(&existing, &args.username)
            .ok_or_else(|| PasswdError::NoSuchUser(args.username.clone()))?;
        return write_atomically(&args.file, &text);
    }
    let password = match (&args.password, args.batch) {
        (Some(p), _) => p.clone(),
        (None, true) => {
            return Err(PasswdError::Usage(
                "-b needs the password as the third argument".to_string(),
            ));
        }
        (None, false) => prompt()?,
    };
    if password.is_empty() {
        return Err(PasswdError::Usage("empty password".to_string()));
    }
    let hash =
        Hash::new_pbkdf2(password.as_bytes(), args.iterations).map_err(PasswdError::Random)?;
    let text = set_user(&existing, &args.username, &hash);
    write_atomically(&args.file, &text)
}

/// A user name the file format can hold: not empty, no `:` (the separator),
/// no control characters (line breaks would split the entry).
fn check_username(username: &str) -> Result<(), PasswdError> {
    if username.is_empty() || username.contains(':') || username.chars().any(char::is_control) {
        return Err(PasswdError::Usage(
            "a user name must be non-empty, without ':' or control characters".to_string(),
        ));
    }
    Ok(())
}

/// Asks for the password twice on the terminal.
fn prompt() -> Result<String, PasswdError> {
    let io = |source| PasswdError::Io {
        path: PathBuf::from("/dev/tty"),
        source,
    };
    let first = rpassword::prompt_password("Password: ").map_err(io)?;
    let second = rpassword::prompt_password("Reenter password: ").map_err(io)?;
    if first != second {
        return Err(PasswdError::Usage("passwords do not match".to_string()));
    }
    Ok(first)
}

/// True when `line` is the entry of `username`.
fn is_entry_of(line: &str, username: &str) -> bool {
    line.split_once(':')
        .is_some_and(|(name, _)| name == username)
}

/// The file's text with `username`'s entry replaced (or appended).
fn set_user(text: &str, username: &str, hash: &Hash) -> String {
    let entry = format!("{username}:{hash}");
    let mut out = String::with_capacity(text.len() + entry.len() + 1);
    let mut replaced = false;
    for line in text.lines() {
        if is_entry_of(line, username) {
            out.push_str(&entry);
            replaced = true;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !replaced {
        out.push_str(&entry);
        out.push('\n');
    }
    out
}

/// The file's text without `username`'s entry; None when it has none.
fn remove_user(text: &str, username: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut found = false;
    for line in text.lines() {
        if is_entry_of(line, username) {
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    found.then_some(out)
}

/// Writes `text` to a temporary file beside `path` and renames it over
/// `path`, keeping an existing file's permissions.
fn write_atomically(path: &Path, text: &str) -> Result<(), PasswdError> {
    let io = |source| PasswdError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mode = match fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(_) => NEW_FILE_MODE,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(file: &Path, flags: &str, user: &str, password: Option<&str>) -> PasswdArgs {
        PasswdArgs {
            create: flags.contains('c'),
            delete: flags.contains('D'),
            batch: flags.contains('b'),
            iterations: DEFAULT_ITERATIONS,
            file: file.to_path_buf(),
            username: user.to_string(),
            password: password.map(str::to_string),
        }
    }

    #[test]
    fn create_add_update_delete_keep_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        run(&args(&file, "cb", "alice", Some("one"))).unwrap();
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            NEW_FILE_MODE
        );
        let text = fs::read_to_string(&file).unwrap();
        fs::write(&file, format!("# admins\n{text}")).unwrap();
        run(&args(&file, "b", "bob", Some("two"))).unwrap();
        run(&args(&file, "b", "alice", Some("three"))).unwrap();
        let text = fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("# admins\nalice:$7$101$"), "{text}");
        let db = PasswordDb::parse(&text).unwrap();
        assert_eq!(db.len(), 2);
        assert!(db.get("alice").unwrap().verify(b"three"));
        assert!(db.get("bob").unwrap().verify(b"two"));
        run(&args(&file, "D", "alice", None)).unwrap();
        let db = PasswordDb::load(&file).unwrap();
        assert!(db.get("alice").is_none());
        assert!(matches!(
            run(&args(&file, "D", "alice", None)),
            Err(PasswdError::NoSuchUser(_))
        ));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bad_arguments_and_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        assert!(run(&args(&file, "b", "a:b", Some("x"))).is_err());
        assert!(run(&args(&file, "cb", "a", Some(""))).is_err());
        assert!(run(&args(&file, "cb", "a", None)).is_err());
        assert!(
            run(&args(&file, "", "a", Some("x"))).is_err(),
            "password needs -b"
        );
        assert!(matches!(
            run(&args(&file, "b", "a", Some("x"))),
            Err(PasswdError::Io { .. })
        ));
        fs::write(&file, "broken\n").unwrap();
        assert!(matches!(
            run(&args(&file, "b", "a", Some("x"))),
            Err(PasswdError::Parse(_))
        ));
        let mut a = args(&file, "cb", "a", Some("x"));
        a.iterations = MAX_ITERATIONS + 1;
        assert!(run(&a).is_err());
    }
}
