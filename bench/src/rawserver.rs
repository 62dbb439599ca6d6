//! The `raw` ceiling: a plain TCP forwarder, no MQTT, on the same `mio`
//! event loop as the load generator.
//!
//! A client's first byte says what it is: `S` (subscriber, answered with
//! `K` once registered) or `P` (publisher). Every chunk read from a publisher
//! is written verbatim to every subscriber socket: one `send` per subscriber
//! per read. When the publisher is paced, one read is one message, so this is
//! the kernel's cost of one send per delivery; in a burst one read carries
//! many messages, which is the most any broker could coalesce.
//!
//! Memory is bounded: a subscriber that cannot keep up gets at most
//! [`PENDING_CAP`] bytes queued; while any subscriber is over it, the
//! forwarder stops reading the publisher, so TCP pushes back on the
//! publisher instead of bytes being dropped (dropping part of a chunk would
//! corrupt the subscribers' frame stream).

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;

/// Token of the listening socket.
const LISTENER: Token = Token(usize::MAX);

/// Listen backlog (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Publisher read size: large, so a burst is forwarded in few sends.
const READ_CHUNK: usize = 256 * 1024;

/// Per-subscriber queue bound (see the module doc).
const PENDING_CAP: usize = 1024 * 1024;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("raw forwarder {0}: {1}")]
    Io(&'static str, io::Error),
}

/// What a connection turned out to be.
#[derive(PartialEq, Eq, Clone, Copy)]
enum Role {
    Hello,
    Subscriber,
    Publisher,
}

struct Client {
    stream: mio::net::TcpStream,
    role: Role,
    /// Bytes queued for a subscriber the socket did not take yet.
    pending: Vec<u8>,
}

/// Runs the forwarder on `listen` until killed.
///
/// # Errors
/// The address cannot be bound or the event loop fails.
pub fn run(listen: SocketAddr) -> Result<(), RawError> {
    crate::procfs::raise_nofile();
    let mut listener = bind(listen).map_err(|e| RawError::Io("bind", e))?;
    let mut poll = Poll::new().map_err(|e| RawError::Io("poll", e))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| RawError::Io("register", e))?;
    let mut clients: Vec<Option<Client>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut subs: Vec<usize> = Vec::new();
    let mut over_cap = 0usize;
    let mut publishers: Vec<usize> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut events = Events::with_capacity(1024);
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RawError::Io("poll", e)),
        }
        let mut ready_pubs: Vec<usize> = Vec::new();
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            let i = free.pop().unwrap_or_else(|| {
                                clients.push(None);
                                clients.len() - 1
                            });
                            if poll
                                .registry()
                                .register(
                                    &mut stream,
                                    Token(i),
                                    Interest::READABLE | Interest::WRITABLE,
                                )
                                .is_ok()
                            {
                                clients[i] = Some(Client {
                                    stream,
                                    role: Role::Hello,
                                    pending: Vec::new(),
                                });
                            } else {
                                free.push(i);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // EMFILE and friends: log and keep serving.
                            log::warn!("raw forwarder accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let i = ev.token().0;
            let Some(Some(c)) = clients.get_mut(i) else {
                continue;
            };
            match c.role {
                Role::Hello => {
                    let mut b = [0u8; 1];
                    match c.stream.read(&mut b) {
                        Ok(1) if b[0] == b'S' => {
                            c.role = Role::Subscriber;
                            c.pending.push(b'K');
                            let _ = flush(c);
                            subs.push(i);
                        }
                        Ok(1) if b[0] == b'P' => {
                            c.role = Role::Publisher;
                            publishers.push(i);
                            ready_pubs.push(i);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        _ => close(&poll, &mut clients, &mut free, i),
                    }
                }
                Role::Publisher => ready_pubs.push(i),
                Role::Subscriber => {
                    let was_over = c.pending.len() > PENDING_CAP;
                    if ev.is_writable() && flush(c).is_err() {
                        if was_over {
                            over_cap -= 1;
                        }
                        subs.retain(|&s| s != i);
                        close(&poll, &mut clients, &mut free, i);
                        continue;
                    }
                    if was_over && c.pending.len() <= PENDING_CAP {
                        over_cap -= 1;
                        // Publishers may have stopped on us: read them again.
                        ready_pubs.extend(publishers.iter().copied());
                    }
                    if ev.is_readable() || ev.is_read_closed() {
                        // Subscribers send nothing; EOF means gone.
                        let mut sink = [0u8; 512];
                        if matches!(c.stream.read(&mut sink), Ok(0)) {
                            if c.pending.len() > PENDING_CAP {
                                over_cap -= 1;
                            }
                            subs.retain(|&s| s != i);
                            close(&poll, &mut clients, &mut free, i);
                        }
                    }
                }
            }
        }
        ready_pubs.sort_unstable();
        ready_pubs.dedup();
        for p in ready_pubs {
            // Forward until the publisher would block or a subscriber is full.
            while over_cap == 0 {
                let Some(Some(c)) = clients.get_mut(p) else {
                    break;
                };
                let n = match c.stream.read(&mut chunk) {
                    Ok(0) => {
                        publishers.retain(|&x| x != p);
                        close(&poll, &mut clients, &mut free, p);
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        publishers.retain(|&x| x != p);
                        close(&poll, &mut clients, &mut free, p);
                        break;
                    }
                };
                let data = &chunk[..n];
                for &s in &subs {
                    let Some(Some(sub)) = clients.get_mut(s) else {
                        continue;
                    };
                    if sub.pending.is_empty() {
                        match sub.stream.write(data) {
                            Ok(w) if w == n => continue,
                            Ok(w) => sub.pending.extend_from_slice(&data[w..]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                sub.pending.extend_from_slice(data)
                            }
                            Err(_) => continue, // closed: its readable event removes it.
                        }
                    } else {
                        let before = sub.pending.len();
                        sub.pending.extend_from_slice(data);
                        if before > PENDING_CAP {
                            continue;
                        }
                    }
                    if sub.pending.len() > PENDING_CAP {
                        over_cap += 1;
                    }
                }
            }
        }
    }
}

/// Binds with a backlog of [`BACKLOG`] (mio's `bind` uses 128, which a
/// connect storm overflows into 1 s SYN retransmits).
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(TcpListener::from_std(s.into()))
}

/// Writes a subscriber's queued bytes; `Err` if the socket is broken.
fn flush(c: &mut Client) -> io::Result<()> {
    while !c.pending.is_empty() {
        match c.stream.write(&c.pending) {
            Ok(n) => {
                c.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if c.pending.is_empty() {
        c.pending = Vec::new();
    }
    Ok(())
}

fn close(poll: &Poll, clients: &mut [Option<Client>], free: &mut Vec<usize>, i: usize) {
    if let Some(mut c) = clients[i].take() {
        let _ = poll.registry().deregister(&mut c.stream);
        free.push(i);
    }
}
