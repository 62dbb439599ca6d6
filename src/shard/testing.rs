//! Fixtures for the unit tests of a shard and the layers that need one: a
//! shard as the broker makes it, and sessions attached to it, either with a
//! link that has no socket or with a real socket pair whose far end the
//! test reads as the client would.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use bytes::BytesMut;
use bytestring::ByteString;

use crate::config::Config;
use crate::protocol::v3::{self as codec, Packet, QoS, Subscribe};
use crate::security::auth::Auth;
use crate::session::link::{Link, SessionKey, test_link};
use crate::session::{Session, SessionState};
use crate::shard::Shard;

/// Shard `id` of `nr_shards` with `config` and no password file or ACL.
pub fn shard_with(id: usize, nr_shards: usize, config: Config) -> Shard {
    Shard::new(id, nr_shards, Arc::new(config), Arc::new(Auth::open()))
}

/// Attaches a session journal that is never written to `shard` (tests
/// read what is pending in it, `Journal::pending_records`, and nothing
/// becomes durable unless they say so) and returns it.
pub fn unwritten_journal(shard: &mut Shard) -> std::rc::Rc<crate::store::journal::Journal> {
    let journal = std::rc::Rc::new(crate::store::journal::Journal::new(
        std::path::Path::new("/nonexistent"),
        0,
        1,
        0,
        crate::config::SyncMode::Ack,
        std::time::Duration::from_secs(1),
        Vec::new(),
        Arc::default(),
    ));
    shard.session_journal = Some(journal.clone());
    journal
}

/// An ACL that lets every client read everything but
/// `secret/{its client id}`.
pub fn acl_file() -> tempfile::NamedTempFile {
    let mut acl = tempfile::NamedTempFile::new().expect("acl file");
    std::io::Write::write_all(&mut acl, b"topic readwrite #\npattern deny secret/%c\n")
        .expect("write acl");
    acl
}

/// Shard `id` of `nr_shards` with the ACL `acl` ([`acl_file`]).
pub fn shard_with_acl(id: usize, nr_shards: usize, acl: &tempfile::NamedTempFile) -> Shard {
    let config = Config {
        acl_file: Some(acl.path().to_path_buf()),
        ..Config::default()
    };
    let auth = Auth::load(&config).expect("the ACL loads");
    Shard::new(id, nr_shards, Arc::new(config), Arc::new(auth))
}

/// A one-shard shard with the default configuration.
pub fn shard() -> Shard {
    shard_with(0, 1, Config::default())
}

/// Inserts a session for `client_id` with a link that has no socket (the
/// shard never writes to it), subscribed to `filter` at `qos` through
/// [`Shard::subscribe`].
pub fn attach(shard: &mut Shard, client_id: &str, filter: &str, qos: QoS) -> SessionKey {
    attach_with_link(shard, client_id, test_link(), filter, qos)
}

/// A client whose session's link is a real socket: the test reads what the
/// shard writes from `peer`.
pub struct Client {
    /// The session's key on the shard.
    pub key: SessionKey,
    /// The client's end of the socket pair (non-blocking).
    pub peer: UnixStream,
    /// The shard's end, kept open while the link refers to it.
    _ours: UnixStream,
}

impl Client {
    /// Reads and decodes every PUBLISH the shard has written so far (the
    /// SUBACK and other packets are skipped), as `(topic, payload, qos)`.
    pub fn publishes(&mut self) -> Vec<(String, Vec<u8>, QoS)> {
        let mut bytes = BytesMut::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.peer.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        let mut out = Vec::new();
        // Server-to-client packets other than PUBLISH do not decode as client
        // packets: skip each whole frame by its length.
        while let Some(&first) = bytes.first() {
            let Ok(Some((body, header))) = codec::decode_remaining_length(&bytes[1..]) else {
                break;
            };
            let len = 1 + header + body;
            if bytes.len() < len {
                break;
            }
            let is_publish = first >> 4 == 3;
            if is_publish {
                // A PUBLISH decodes the same in both directions.
                match codec::decode(&mut bytes, usize::MAX) {
                    Ok(Some(Packet::Publish(p))) => {
                        out.push((p.topic.to_string(), p.payload.to_vec(), p.qos));
                    }
                    other => panic!("not a PUBLISH: {other:?}"),
                }
            } else {
                let _ = bytes.split_to(len);
            }
        }
        out
    }
}

/// Inserts a session for `client_id` whose link writes to a new socket pair
/// (the shard's end with a send buffer of `sndbuf` bytes when given, so
/// that "socket full" is easy to reach), subscribed to `filter` at `qos`.
pub fn attach_client(
    shard: &mut Shard,
    client_id: &str,
    filter: &str,
    qos: QoS,
    sndbuf: Option<usize>,
) -> Client {
    let (ours, peer) = UnixStream::pair().expect("socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    peer.set_nonblocking(true).expect("non-blocking");
    if let Some(size) = sndbuf {
        socket2::SockRef::from(&ours)
            .set_send_buffer_size(size)
            .expect("SO_SNDBUF");
    }
    let conn_id = shard.new_conn_id();
    let link = Link::new(conn_id, ours.as_raw_fd(), 0, shard.now_ticks());
    let key = attach_with_link(shard, client_id, link, filter, qos);
    Client {
        key,
        peer,
        _ours: ours,
    }
}

/// Inserts a clean session with `link` and subscribes it to `filter`.
pub fn attach_with_link(
    shard: &mut Shard,
    client_id: &str,
    link: Link,
    filter: &str,
    qos: QoS,
) -> SessionKey {
    let mut session = Session::new(ByteString::from(client_id), true, SessionState::default());
    session.link = Some(link);
    let key = shard.insert_session(session);
    let subscribe = Subscribe {
        packet_id: 1,
        filters: vec![(ByteString::from(filter), qos)],
    };
    shard.subscribe(key, subscribe, None);
    key
}

/// The payloads of what a test client got (`publishes`), as text.
pub fn payloads(got: &[(String, Vec<u8>, QoS)]) -> Vec<String> {
    got.iter()
        .map(|(_, p, _)| String::from_utf8_lossy(p).into_owned())
        .collect()
}
