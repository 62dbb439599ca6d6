//! The PROXY protocol (HAProxy's, versions 1 and 2; AWS NLB and most TCP
//! load balancers send version 2): the client's address, sent by a load
//! balancer at the start of the TCP stream, before anything else.
//!
//! A listener configured with `proxy_protocol = true` reads the header
//! ([`read_header`]) before the TLS handshake, the WebSocket upgrade or
//! CONNECT, within `proxy_protocol_timeout_secs`; a connection without a
//! valid header is closed. Parsing is the `ppp` crate's; this module decides
//! what a header means for the broker ([`parse`]):
//!
//! - v1 `TCP4` / `TCP6`, v2 `PROXY` with an IPv4 or IPv6 address: the
//!   client is the header's source address;
//! - v1 `UNKNOWN`, v2 `LOCAL` (the balancer's own health checks), v2 with
//!   `AF_UNSPEC` or a Unix socket address: the connection is the balancer's
//!   own, its address the socket's peer address;
//! - v2 TLVs are skipped (their length counts toward [`MAX_HEADER_LEN`]).
//!
//! The header is peeked (`MSG_PEEK`) and then exactly its bytes are read,
//! so what follows (a TLS ClientHello, CONNECT) stays in the socket for the
//! transport to read as usual.
//!
//! The client's address is kept beside the connection, not in it: in a
//! table keyed by the socket's own local and peer addresses
//! ([`remember`], [`client_behind`]), which [`crate::net::fd::peer_addr`]
//! consults, so log lines and the admin API show the client without any
//! per-connection field (a plain connection's descriptor is duplicated when
//! it leaves glommio's stream, so the descriptor number is no key; its
//! addresses are). An entry is replaced when the balancer reuses the same
//! source port towards the same listener, so the table holds at most one
//! entry per balancer address, source port and listener (about 100 bytes
//! each; a balancer uses at most its ephemeral port range, ~28k ports on
//! Linux), however long the broker runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;
use ppp::{PartialResult, v1, v2};

/// The longest header accepted, TLVs included. Addresses take at most
/// 16 + 216 bytes (v2 with Unix socket paths; a v1 line is at most 107);
/// the TLVs balancers add (AWS's VPC endpoint id, Azure's link id, GCP's
/// connection id, HAProxy's TLS details) are well under 1 KiB. 4 KiB leaves
/// room for them and bounds what a connection waiting for its header costs.
pub const MAX_HEADER_LEN: usize = 4096;

/// Bytes first peeked for a header: a v1 line (at most 107) or a v2
/// header with its addresses (at most 16 + 216) fits, so a connection
/// waiting for its header holds this much, not [`MAX_HEADER_LEN`]; a v2
/// header whose TLVs need more grows the buffer to its stated length.
pub const FIRST_PEEK_LEN: usize = 256;

/// Pause before peeking again at a header that arrived in pieces. Balancers
/// write the header in one piece, so this is the rare path; the header
/// timeout bounds the retries.
pub const PEEK_RETRY: Duration = Duration::from_millis(5);

/// Stripes of the client-address table (see [`remember`]): touched once per
/// accepted connection on a PROXY protocol listener and once per log line
/// or admin lookup, so contention is rare even with few.
const STRIPES: usize = 16;

/// How a version 1 header starts.
const V1_PREFIX: &[u8] = b"PROXY ";

/// The longest version 1 header, line end included (the specification's
/// 107 bytes).
const V1_MAX_LEN: usize = 107;

/// Errors reading a PROXY protocol header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The connection does not start like a header at all (a client that
    /// connected to the broker directly: a CONNECT, a TLS ClientHello).
    #[error("no PROXY protocol header (the first byte is {0:#04x})")]
    Missing(u8),
    /// Not a valid version 1 (text) header.
    #[error("invalid PROXY protocol v1 header: {0}")]
    V1(#[source] v1::BinaryParseError),
    /// Not a valid version 2 (binary) header.
    #[error("invalid PROXY protocol v2 header: {0}")]
    V2(#[source] v2::ParseError),
    /// Longer than [`MAX_HEADER_LEN`] (or not ended within it).
    #[error("PROXY protocol header longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
    /// The peer closed the connection before the header was complete.
    #[error("connection closed before a complete PROXY protocol header")]
    Closed,
    /// No complete header within the timeout.
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    /// Reading the socket failed.
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[source] std::io::Error),
}

/// What a header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Relayed for this client (the header's source address and port).
    Client(SocketAddr),
    /// The balancer's own connection (v2 LOCAL, v1 UNKNOWN, v2 without an
    /// internet address): its address is the socket's peer address.
    Balancer,
}

/// Parses the header at the start of `buf`: Ok(Some((origin, header
/// length))), Ok(None) when `buf` holds only the beginning of a header.
///
/// # Errors
/// Anything that cannot become a valid header with more bytes, or a header
/// longer than [`MAX_HEADER_LEN`].
pub fn parse(buf: &[u8]) -> Result<Option<(Origin, usize)>, ProxyError> {
    match buf.first() {
        None => return Ok(None),
        Some(b'P') => return parse_v1(buf),
        Some(b'\r') => {}
        Some(&first) => return Err(ProxyError::Missing(first)),
    }
    let result = v2::Header::try_from(buf);
    if result.is_incomplete() {
        // A v2 header says its length up front: refuse a long one now
        // instead of waiting for bytes that would change nothing.
        if let Err(v2::ParseError::Partial(_, length)) = &result
            && v2::PROTOCOL_PREFIX.len() + 4 + length > MAX_HEADER_LEN
        {
            return Err(ProxyError::TooLong);
        }
        if buf.len() >= MAX_HEADER_LEN {
            return Err(ProxyError::TooLong);
        }
        return Ok(None);
    }
    match result {
        Ok(header) => {
            if header.len() > MAX_HEADER_LEN {
                return Err(ProxyError::TooLong);
            }
            let origin = match (header.command, header.addresses) {
                (v2::Command::Local, _) => Origin::Balancer,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => {
                    Origin::Balancer
                }
            };
            Ok(Some((origin, header.len())))
        }
        Err(e) => Err(ProxyError::V2(e)),
    }
}

/// [`parse`] for a version 1 header (a text line): parsed once its line
/// end is in `buf` (`ppp` takes some cut lines for wrong ones, and some
/// complete but wrong ones for cut ones, so the line end decides).
fn parse_v1(buf: &[u8]) -> Result<Option<(Origin, usize)>, ProxyError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        let prefix = &buf[..buf.len().min(V1_PREFIX.len())];
        if !V1_PREFIX.starts_with(prefix) {
            return Err(ProxyError::V1(v1::ParseError::InvalidPrefix.into()));
        }
        if buf.len() >= V1_MAX_LEN {
            return Err(ProxyError::TooLong);
        }
        return Ok(None);
    };
    if end + 1 > V1_MAX_LEN {
        return Err(ProxyError::TooLong);
    }
    let header = v1::Header::try_from(&buf[..=end]).map_err(ProxyError::V1)?;
    let origin = match header.addresses {
        v1::Addresses::Tcp4(a) => {
            Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
        }
        v1::Addresses::Tcp6(a) => {
            Origin::Client(SocketAddr::from((a.source_address, a.source_port)))
        }
        v1::Addresses::Unknown => Origin::Balancer,
    };
    // ppp reads up to the first CR: the line must end right after it.
    if header.header.len() != end + 1 {
        return Err(ProxyError::V1(v1::ParseError::InvalidSuffix.into()));
    }
    Ok(Some((origin, end + 1)))
}

/// The promises of [`parse`] on arbitrary bytes (the `proxy_header` fuzz
/// target's checks, also run by the unit tests): it never panics; a header
/// it accepts lies within the input and [`MAX_HEADER_LEN`] and is accepted
/// alone, with the same meaning; and every cut of it shorter than its length
/// waits for more (so reading it as it arrives, in any pieces, never
/// refuses or accepts what the whole header would not).
///
/// # Panics
/// When one of them is broken (that is the point).
pub fn check_parse(data: &[u8]) {
    let Ok(Some((origin, len))) = parse(data) else {
        return;
    };
    assert!(
        len > 0 && len <= data.len() && len <= MAX_HEADER_LEN,
        "length {len}"
    );
    assert_eq!(
        parse(&data[..len]).ok().flatten(),
        Some((origin, len)),
        "alone"
    );
    for cut in 0..len {
        assert!(
            matches!(parse(&data[..cut]), Ok(None)),
            "a cut at {cut} of a {len}-byte header does not wait for more"
        );
    }
}

/// Reads the PROXY protocol header from the start of `tcp` within
/// `timeout`, consuming exactly its bytes.
///
/// # Errors
/// No valid header within `timeout` ([`ProxyError`]).
pub async fn read_header(tcp: &mut TcpStream, timeout: Duration) -> Result<Origin, ProxyError> {
    let read = async {
        let mut buf = vec![0u8; FIRST_PEEK_LEN];
        let mut seen = 0;
        loop {
            let n = tcp.peek(&mut buf).await.map_err(io_error)?;
            if n == 0 {
                return Err(ProxyError::Closed);
            }
            if let Some((origin, len)) = parse(&buf[..n])? {
                tcp.read_exact(&mut buf[..len])
                    .await
                    .map_err(ProxyError::Io)?;
                return Ok(origin);
            }
            // A v2 header longer than the buffer (TLVs): make room for it
            // (parse refused it if over MAX_HEADER_LEN).
            if let Some(len) = v2_stated_len(&buf[..n])
                && len > buf.len()
            {
                buf.resize(len, 0);
                continue;
            }
            if n == seen {
                // Nothing new since the last peek: let more arrive.
                glommio::timer::sleep(PEEK_RETRY).await;
            }
            seen = n;
        }
    };
    match glommio::timer::timeout(timeout, async { Ok(read.await) }).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout(timeout)),
    }
}

/// The whole length a v2 header states in its first 16 bytes, if `buf`
/// holds them.
fn v2_stated_len(buf: &[u8]) -> Option<usize> {
    let fixed = v2::PROTOCOL_PREFIX.len() + 4;
    if buf.len() < fixed || !buf.starts_with(v2::PROTOCOL_PREFIX) {
        return None;
    }
    Some(fixed + usize::from(u16::from_be_bytes([buf[fixed - 2], buf[fixed - 1]])))
}

/// glommio's error as an I/O error.
fn io_error(e: glommio::GlommioError<()>) -> ProxyError {
    ProxyError::Io(e.into())
}

/// A connection's socket as the kernel names it: (local, peer) addresses.
type SocketKey = (SocketAddr, SocketAddr);

/// Whether any connection ever came with a client address (so that sockets
/// of brokers without PROXY protocol listeners skip the table entirely).
static IN_USE: AtomicBool = AtomicBool::new(false);

/// Clients behind the balancer, by the socket that carries them.
static CLIENTS: LazyLock<Vec<Mutex<HashMap<SocketKey, SocketAddr>>>> =
    LazyLock::new(|| (0..STRIPES).map(|_| Mutex::default()).collect());

/// The stripe holding `key`.
fn stripe(key: &SocketKey) -> std::sync::MutexGuard<'static, HashMap<SocketKey, SocketAddr>> {
    // The balancer's source port differs between its connections.
    let index = usize::from(key.1.port()) % STRIPES;
    match CLIENTS[index].lock() {
        Ok(map) => map,
        // Each update is one statement: a panic cannot leave it half done.
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Records that the connection from `peer` to `local` carries `origin`'s
/// client (a balancer's own connection clears what an earlier connection of
/// the same addresses left).
pub fn remember(local: SocketAddr, peer: SocketAddr, origin: Origin) {
    let key = (local, peer);
    match origin {
        Origin::Client(client) => {
            IN_USE.store(true, Ordering::Relaxed);
            stripe(&key).insert(key, client);
        }
        Origin::Balancer => {
            if IN_USE.load(Ordering::Relaxed) {
                stripe(&key).remove(&key);
            }
        }
    }
}

/// Whether [`client_behind`] can answer anything (false until a header
/// named a client): lets callers skip looking up the local address.
pub fn in_use() -> bool {
    IN_USE.load(Ordering::Relaxed)
}

/// The client a PROXY protocol header named for the connection from `peer`
/// to `local`, if any.
pub fn client_behind(local: SocketAddr, peer: SocketAddr) -> Option<SocketAddr> {
    let key = (local, peer);
    stripe(&key).get(&key).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;

    /// A v2 header: `command` (0 LOCAL, 1 PROXY), `family` byte, address
    /// bytes and TLVs.
    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = v2::PROTOCOL_PREFIX.to_vec();
        h.push(0x20 | command);
        h.push(family);
        let len = u16::try_from(addresses.len() + tlvs.len()).unwrap();
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    /// IPv4 addresses: 203.0.113.7:40001 to 192.0.2.1:1883.
    const V4: [u8; 12] = [203, 0, 113, 7, 192, 0, 2, 1, 0x9c, 0x41, 0x07, 0x5b];

    fn client(s: &str) -> Origin {
        Origin::Client(s.parse().unwrap())
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 1883\r\n";
        let mut buf = line.to_vec();
        buf.extend_from_slice(&[0x10, 0x0c]); // CONNECT follows
        assert_eq!(
            parse(&buf).unwrap(),
            Some((client("203.0.113.7:40001"), line.len()))
        );
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 8883\r\n";
        assert_eq!(
            parse(line).unwrap(),
            Some((client("[2001:db8::7]:40001"), line.len()))
        );
        let line = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(parse(line).unwrap(), Some((Origin::Balancer, line.len())));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((Origin::Balancer, 15))
        );
    }

    #[test]
    fn v2_proxy_local_ipv6_unspec_and_tlvs() {
        let h = v2(1, 0x11, &V4, &[]);
        assert_eq!(parse(&h).unwrap(), Some((client("203.0.113.7:40001"), 28)));
        let mut v6 = Vec::new();
        v6.extend_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        v6.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        v6.extend_from_slice(&[0x9c, 0x41, 0x07, 0x5b]);
        let h = v2(1, 0x21, &v6, &[]);
        assert_eq!(
            parse(&h).unwrap(),
            Some((client("[2001:db8::7]:40001"), 16 + 36))
        );
        // LOCAL (health checks): the balancer's own connection, whatever
        // addresses it carries.
        let h = v2(0, 0x11, &V4, &[]);
        assert_eq!(parse(&h).unwrap(), Some((Origin::Balancer, 28)));
        let h = v2(0, 0x00, &[], &[]);
        assert_eq!(parse(&h).unwrap(), Some((Origin::Balancer, 16)));
        // PROXY with AF_UNSPEC: the socket's peer address.
        let h = v2(1, 0x00, &[], &[]);
        assert_eq!(parse(&h).unwrap(), Some((Origin::Balancer, 16)));
        // TLVs (AWS's VPC endpoint id, type 0xEA; a NOOP, type 0x04) are
        // skipped, their bytes consumed with the header.
        let tlvs = [
            0xEA, 0x00, 0x05, 0x01, b'v', b'p', b'c', b'e', 0x04, 0x00, 0x00,
        ];
        let mut buf = v2(1, 0x11, &V4, &tlvs);
        let len = buf.len();
        buf.extend_from_slice(b"\x10\x0c");
        assert_eq!(
            parse(&buf).unwrap(),
            Some((client("203.0.113.7:40001"), len))
        );
    }

    #[test]
    fn truncated_headers_wait_for_more() {
        let line = b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 1883\r\n";
        for cut in 1..line.len() {
            assert_eq!(parse(&line[..cut]).unwrap(), None, "v1 cut at {cut}");
        }
        let h = v2(1, 0x11, &V4, &[0x04, 0x00, 0x01, 0x00]);
        for cut in 1..h.len() {
            assert_eq!(parse(&h[..cut]).unwrap(), None, "v2 cut at {cut}");
        }
        check_parse(line);
        check_parse(&h);
    }

    #[test]
    fn garbage_and_bad_headers_are_refused() {
        // A client that talks MQTT straight away: CONNECT, no header.
        let connect = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";
        assert!(matches!(parse(connect), Err(ProxyError::Missing(0x10))));
        // A TLS ClientHello.
        assert!(parse(b"\x16\x03\x01\x02\x00\x01").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 203.0.113.7\r\n").is_err());
        assert!(parse(b"PROXY TCP4 300.0.113.7 192.0.2.1 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 2\r\n").is_err());
        assert!(parse(b"PROXY TCP5 203.0.113.7 192.0.2.1 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP6 203.0.113.7 192.0.2.1 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\n").is_err());
        assert!(parse(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\rx\n").is_err());
        assert!(parse(b"PRIXY").is_err());
        assert!(parse(b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c").is_err());
        // v2: version 1 in the version nibble, an unknown command, an
        // unknown family, addresses longer than the length says.
        let mut h = v2(1, 0x11, &V4, &[]);
        h[12] = 0x11;
        assert!(matches!(parse(&h), Err(ProxyError::V2(_))));
        let mut h = v2(1, 0x11, &V4, &[]);
        h[12] = 0x2F;
        assert!(parse(&h).is_err());
        let mut h = v2(1, 0x11, &V4, &[]);
        h[13] = 0x41;
        assert!(parse(&h).is_err());
        let mut h = v2(1, 0x11, &V4, &[]);
        h[15] = 4;
        assert!(parse(&h).is_err());
    }

    #[test]
    fn too_long_headers_are_refused_without_waiting() {
        // v1: no line end within 107 bytes.
        let mut line = b"PROXY TCP4 ".to_vec();
        line.resize(200, b'1');
        assert!(parse(&line).is_err());
        // v2: a length past the limit is refused from the first 16 bytes.
        let mut h = v2::PROTOCOL_PREFIX.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&h), Err(ProxyError::TooLong)));
        let tlv_len = MAX_HEADER_LEN - 16 - 12 - 3 + 1;
        let mut tlvs = vec![0x04, (tlv_len >> 8) as u8, tlv_len as u8];
        tlvs.resize(3 + tlv_len, 0);
        assert!(matches!(
            parse(&v2(1, 0x11, &V4, &tlvs)),
            Err(ProxyError::TooLong)
        ));
        // Exactly at the limit: accepted.
        let tlv_len = tlv_len - 1;
        let mut tlvs = vec![0x04, (tlv_len >> 8) as u8, tlv_len as u8];
        tlvs.resize(3 + tlv_len, 0);
        assert_eq!(
            parse(&v2(1, 0x11, &V4, &tlvs)).unwrap(),
            Some((client("203.0.113.7:40001"), MAX_HEADER_LEN))
        );
    }

    #[test]
    fn random_bytes_keep_the_promises_of_parse() {
        let mut rng = XorShift(0x5052_4f58);
        let mut below = |n: u64| rng.next() % n;
        let valid = [
            b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 1883\r\n".to_vec(),
            v2(1, 0x11, &V4, &[0x04, 0x00, 0x01, 0x00]),
            v2(0, 0x00, &[], &[]),
        ];
        for round in 0..20_000 {
            let buf = if round % 2 == 0 {
                // Random bytes, sometimes behind a valid prefix.
                let len = below(300) as usize;
                let mut buf: Vec<u8> = (0..len).map(|_| below(256) as u8).collect();
                if round % 4 == 0 {
                    let prefix = &valid[below(valid.len() as u64) as usize];
                    let cut = below(prefix.len() as u64) as usize;
                    buf.splice(0..0, prefix[..cut].iter().copied());
                }
                buf
            } else {
                // A valid header with a few bytes flipped.
                let mut buf = valid[below(valid.len() as u64) as usize].clone();
                for _ in 0..1 + below(3) {
                    let at = below(buf.len() as u64) as usize;
                    buf[at] = below(256) as u8;
                }
                buf
            };
            check_parse(&buf);
        }
    }

    #[test]
    fn a_v2_header_states_its_length_up_front() {
        let h = v2(1, 0x11, &V4, &[0x04, 0x00, 0x01, 0x00]);
        assert_eq!(v2_stated_len(&h[..16]), Some(h.len()));
        assert_eq!(v2_stated_len(&h[..15]), None);
        assert_eq!(v2_stated_len(b"PROXY TCP4 203.0.113.7 192"), None);
        let mut tlvs = vec![0x04, 0x01, 0x00];
        tlvs.resize(3 + 256, 0);
        let long = v2(1, 0x11, &V4, &tlvs);
        assert!(long.len() > FIRST_PEEK_LEN);
        assert_eq!(v2_stated_len(&long[..FIRST_PEEK_LEN]), Some(long.len()));
        assert_eq!(parse(&long[..FIRST_PEEK_LEN]).unwrap(), None);
    }

    #[test]
    fn the_table_answers_for_its_socket_only() {
        let local: SocketAddr = "192.0.2.1:1883".parse().unwrap();
        let balancer: SocketAddr = "198.51.100.2:50123".parse().unwrap();
        let other: SocketAddr = "198.51.100.2:50124".parse().unwrap();
        remember(local, balancer, client("203.0.113.7:40001"));
        assert!(in_use());
        assert_eq!(
            client_behind(local, balancer),
            Some("203.0.113.7:40001".parse().unwrap())
        );
        assert_eq!(client_behind(local, other), None);
        assert_eq!(
            client_behind("192.0.2.1:1884".parse().unwrap(), balancer),
            None
        );
        // The same source port again, now for a health check: forgotten.
        remember(local, balancer, Origin::Balancer);
        assert_eq!(client_behind(local, balancer), None);
    }
}
