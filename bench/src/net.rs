//! Socket setup shared by the workers, the publisher and the raw forwarder:
//! non-blocking connect from a chosen source address, loopback checks, and
//! naming why a connection failed.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("source address {0:?}: expected an address, FIRST-LAST or ADDR/PREFIX")]
    Source(String),
    #[error("--source-addrs names {0} addresses, more than the {MAX_SOURCES} allowed")]
    TooManySources(u128),
    #[error("{0}: {1}")]
    Io(&'static str, io::Error),
}

/// Resolves `host:port` to one address (IPv4 preferred).
///
/// # Errors
/// The name does not resolve.
pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, NetError> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|_| NetError::Resolve(host.to_owned()))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| NetError::Resolve(host.to_owned()))
}

/// Most source addresses one run takes: 1M subscribers need about 40 (at
/// 28k ephemeral ports each); 65,536 (a /16) is far past any plan and keeps
/// a mistyped `/8` from making a list of 16M addresses.
pub const MAX_SOURCES: u128 = 65_536;

/// Parses `--source-addrs` items: `10.0.0.5`, `10.0.0.10-10.0.0.29`
/// (inclusive) or `10.0.1.0/28` (every address of the block, network and
/// broadcast included: on a load host they are just addresses). IPv6 too.
/// Duplicates are dropped, order kept.
///
/// # Errors
/// An item of none of these forms, a range from high to low or across
/// families, or more than [`MAX_SOURCES`] addresses.
pub fn parse_sources(items: &[String]) -> Result<Vec<IpAddr>, NetError> {
    let mut out: Vec<IpAddr> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        let bad = || NetError::Source(item.to_owned());
        let (first, last) = if let Some((a, b)) = item.split_once('-') {
            let a: IpAddr = a.trim().parse().map_err(|_| bad())?;
            let b: IpAddr = b.trim().parse().map_err(|_| bad())?;
            (a, b)
        } else if let Some((a, len)) = item.split_once('/') {
            let a: IpAddr = a.trim().parse().map_err(|_| bad())?;
            let len: u32 = len.trim().parse().map_err(|_| bad())?;
            let bits = if a.is_ipv4() { 32 } else { 128 };
            if len > bits {
                return Err(bad());
            }
            let host_mask = if len == 0 {
                u128::MAX
            } else {
                (1u128 << (bits - len)) - 1
            };
            let host_mask = if bits == 32 {
                host_mask & u128::from(u32::MAX)
            } else {
                host_mask
            };
            let base = ip_to_u128(a) & !host_mask;
            (from_u128(a, base), from_u128(a, base | host_mask))
        } else {
            let a: IpAddr = item.parse().map_err(|_| bad())?;
            (a, a)
        };
        if first.is_ipv4() != last.is_ipv4() || ip_to_u128(first) > ip_to_u128(last) {
            return Err(bad());
        }
        let count = ip_to_u128(last) - ip_to_u128(first) + 1;
        if count + out.len() as u128 > MAX_SOURCES {
            return Err(NetError::TooManySources(count + out.len() as u128));
        }
        for v in ip_to_u128(first)..=ip_to_u128(last) {
            let ip = from_u128(first, v);
            if seen.insert(ip) {
                out.push(ip);
            }
        }
    }
    Ok(out)
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address of `like`'s family with value `v` (`v` fits the family).
fn from_u128(like: IpAddr, v: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpAddr::V6(_) => IpAddr::V6(v.into()),
    }
}

/// The addresses of `sources` this host cannot bind (not configured on
/// any of its interfaces): one bind to port 0 each, closed at once.
pub fn unconfigured(sources: &[IpAddr]) -> Vec<IpAddr> {
    sources
        .iter()
        .copied()
        .filter(|&ip| std::net::TcpListener::bind(SocketAddr::new(ip, 0)).is_err())
        .collect()
}

/// Source addresses for loopback targets: `127.0.0.1`, `127.0.0.2`, ... Each
/// gives a fresh ephemeral port range towards the same broker port, so many
/// more than ~28k connections fit.
pub fn loopback_sources(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| Ipv4Addr::new(127, 0, (i / 254) as u8, (1 + i % 254) as u8).to_string())
        .collect()
}

/// A free TCP port on 127.0.0.1 (bind port 0, read it, close).
///
/// # Errors
/// No port could be bound.
pub fn free_port() -> Result<u16, NetError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| NetError::Io("bind", e))?;
    Ok(l.local_addr()
        .map_err(|e| NetError::Io("local_addr", e))?
        .port())
}

/// Starts a non-blocking connect to `target`, bound to `source` first if
/// given. The connect completes later (writable readiness).
///
/// `IP_BIND_ADDRESS_NO_PORT` defers the port choice to connect(), so a bound
/// source address can reuse ports per destination instead of reserving one
/// per socket at bind() time.
///
/// # Errors
/// socket(), bind() or connect() failed immediately (e.g. EMFILE).
pub fn start_connect(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<mio::net::TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(src) = source {
        let one: libc::c_int = 1;
        // SAFETY: valid fd and a pointer to a c_int of the given size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
    }
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(mio::net::TcpStream::from_std(socket.into()))
}

/// Is this a loopback address (where the bench may send without `--host`)?
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// A short, stable name for why a connection failed, for the error counts.
pub fn error_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => "too many open files (EMFILE)".into(),
        Some(libc::EADDRNOTAVAIL) => "no free source port (EADDRNOTAVAIL)".into(),
        Some(libc::ECONNREFUSED) => "connection refused".into(),
        Some(libc::ECONNRESET) => "reset by broker".into(),
        Some(libc::ETIMEDOUT) => "TCP timeout".into(),
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "kernel out of memory".into(),
        Some(libc::EPIPE) => "broken pipe".into(),
        Some(code) => format!("os error {code}"),
        None => format!("{:?}", e.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_source_addresses() {
        let s = loopback_sources(300);
        assert_eq!(s[0], "127.0.0.1");
        assert_eq!(s[253], "127.0.0.254");
        assert_eq!(s[254], "127.0.1.1");
    }

    #[test]
    fn source_lists_ranges_and_blocks() {
        let items = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let v = parse_sources(&items(&[
            "10.0.0.254-10.0.1.1",
            "10.0.0.255",
            "192.168.7.8/30",
        ]))
        .unwrap();
        let v: Vec<String> = v.iter().map(IpAddr::to_string).collect();
        assert_eq!(
            v,
            [
                "10.0.0.254",
                "10.0.0.255",
                "10.0.1.0",
                "10.0.1.1",
                "192.168.7.8",
                "192.168.7.9",
                "192.168.7.10",
                "192.168.7.11"
            ]
        );
        assert_eq!(
            parse_sources(&items(&["fd00::1-fd00::3"])).unwrap().len(),
            3
        );
        assert_eq!(parse_sources(&items(&["10.1.2.3/32"])).unwrap().len(), 1);
        for bad in [
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-fd00::1",
            "10.0.0.0/33",
            "eth0",
        ] {
            assert!(
                matches!(parse_sources(&items(&[bad])), Err(NetError::Source(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_sources(&items(&["10.0.0.0/8"])),
            Err(NetError::TooManySources(_))
        ));
    }

    #[test]
    fn unconfigured_sources_are_named() {
        let (lo, far): (IpAddr, IpAddr) =
            ("127.0.0.3".parse().unwrap(), "192.0.2.77".parse().unwrap());
        assert_eq!(unconfigured(&[lo, far]), vec![far]);
    }

    #[test]
    fn loopback_check_and_error_names() {
        assert!(is_loopback(&resolve("127.0.0.5", 1).unwrap()));
        assert!(!is_loopback(&"10.0.0.1:1".parse().unwrap()));
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(error_kind(&e).contains("EMFILE"));
    }

    #[test]
    fn connect_from_second_source_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = l.local_addr().unwrap();
        let _s = start_connect(target, Some("127.0.0.2".parse().unwrap())).unwrap();
        let (_, peer) = l.accept().unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.2");
    }
}
