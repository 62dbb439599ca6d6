//! Every socket system call fanmq makes itself, behind safe wrappers.
//!
//! glommio owns most sockets, but the hot path writes to sockets directly
//! (one vectored `sendmsg` per subscriber per step), parked connections are
//! read with plain `recv` and waited on through epoll, and a few socket
//! options have no wrapper in glommio or socket2. Each `unsafe` call lives
//! here, once, with the reason it is sound; callers see `io::Result`s.
//! (The two host queries of `crate::config::os`, `getrlimit`/`setrlimit`
//! and `sysinfo`, stay there: config/ is the bottom floor and imports
//! nothing of the crate.)

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use log::debug;

use crate::net::proxy;

/// A duplicate of socket `fd`, owned (glommio's stream cannot give its
/// descriptor up, so a connection that leaves the stream keeps a duplicate
/// and drops the stream).
///
/// # Errors
/// The process is out of descriptors.
pub fn duplicate(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the caller's descriptor is open for the duration of this call
    // (it holds the stream that owns it).
    unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
}

/// Takes the next connection from listening socket `listener`, which must
/// be non-blocking ([`set_nonblocking`]), with `accept4(SOCK_CLOEXEC)`:
/// one system call, and the socket is owned here from the start. glommio's
/// own accept costs four (it makes the listener non-blocking and back
/// around each `accept`), and its stream cannot give its descriptor up, so
/// a connection taken from it costs a `dup` and a `close` more. The new
/// socket is blocking like glommio's (every call on it here passes
/// `MSG_DONTWAIT`; glommio's stream, for TLS and WebSocket, expects it).
///
/// # Errors
/// `WouldBlock` when no connection waits; otherwise what `accept4` says
/// (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`: out of descriptors or memory;
/// `ECONNABORTED`: the client left first).
pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: a plain system call on the caller's listening socket; no
        // address is asked for (null pointers are allowed).
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` is a new descriptor nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Makes `fd` non-blocking (O_NONBLOCK on its open file).
///
/// # Errors
/// `fd` is not open.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain system calls on the caller's descriptor (a closed one
    // is refused with EBADF).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives an owned socket (one a connection took from glommio's stream
/// with [`duplicate`]) back to glommio as a stream, so the connection can
/// wait on it through glommio again. The descriptor keeps its number, so
/// what the shard knows of it (the link's descriptor) stays true.
pub fn into_tcp_stream(fd: OwnedFd) -> glommio::net::TcpStream {
    // SAFETY: the descriptor is an open TCP socket whose ownership moves
    // into the stream (`into_raw_fd` gives it up), so it is closed once.
    unsafe { glommio::net::TcpStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }
}

/// Makes the coming `close` of `fd` send a reset and discard unsent data
/// (SO_LINGER with a zero timeout).
pub fn reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(e) = set_socket_option(fd, libc::SO_LINGER, &linger) {
        debug!("SO_LINGER on a shed connection failed: {e}");
    }
}

/// Sets socket `fd`'s receive low-water mark (SO_RCVLOWAT) to `bytes` (1:
/// the kernel's default). For TCP, readiness (poll, epoll, io_uring's
/// POLL_ADD) is then reported only once that many bytes wait, or the peer
/// closed; a non-blocking `recv` still returns whatever waits. Lowering
/// it wakes a waiter at once when the bytes waiting reach the new mark.
///
/// # Errors
/// The socket is gone or not TCP.
pub fn set_receive_low_water(fd: RawFd, bytes: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
    set_socket_option(fd, libc::SO_RCVLOWAT, &value)
}

/// Sets the SOL_SOCKET option `name` of socket `fd` to `value`, whose type
/// is the one the option takes (`c_int`, `linger`).
fn set_socket_option<T>(fd: RawFd, name: libc::c_int, value: &T) -> io::Result<()> {
    let size = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is a socket of the caller's, borrowed for this call (a
    // closed one is refused with EBADF); `value` points at `size` valid
    // bytes of the type the option takes.
    let rc =
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, name, (value as *const T).cast(), size) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The peer address of socket `fd` (getpeername), whatever a PROXY
/// protocol header said.
///
/// # Errors
/// The peer is gone (`ENOTCONN`), or `fd` is not a socket.
pub fn socket_peer(fd: RawFd) -> io::Result<std::net::SocketAddr> {
    // SAFETY: `fd` is the caller's open socket, borrowed for this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd)
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The client address of a connection's socket `fd`: the one its PROXY
/// protocol header named ([`crate::net::proxy`]), else the socket's peer
/// address (getpeername). None if the peer is gone or `fd` is not a socket
/// descriptor (negative).
pub fn peer_addr(fd: RawFd) -> Option<std::net::SocketAddr> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a connection's socket, open while the connection (or
    // its link: the connection removes the link before it closes the
    // socket) exists; it is only borrowed for this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&fd);
    let peer = socket.peer_addr().ok()?.as_socket()?;
    if proxy::in_use()
        && let Some(local) = socket.local_addr().ok().and_then(|a| a.as_socket())
        && let Some(client) = proxy::client_behind(local, peer)
    {
        return Some(client);
    }
    Some(peer)
}

/// One non-blocking `recv` from a plain socket into `buf`.
///
/// # Errors
/// `WouldBlock` when nothing waits; any other error means the connection
/// is broken.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length; `fd` is the
        // connection's open socket.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether socket `fd` has something to read now: bytes, or the peer's
/// close (a `recv` with `MSG_PEEK`, which leaves them in the socket).
pub fn has_input(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `byte` is valid for a write of one byte; `fd` is open.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    // 1: bytes wait; 0: the peer closed; an error other than "nothing yet"
    // is also for the reader to see.
    n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
}

/// One `sendmsg(MSG_DONTWAIT | MSG_NOSIGNAL)` of `iovecs`.
pub fn send_vectored(fd: RawFd, iovecs: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: `msghdr` is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovecs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iovecs.len() as _;
    // SAFETY: `msg` points at `iovecs.len()` iovecs describing live slices
    // of the queued frames, which outlive the call; the kernel only reads
    // them. An invalid `fd` yields EBADF, not UB.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A new epoll instance (close-on-exec).
///
/// # Errors
/// The system refusing one (out of descriptors or memory).
pub fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; the result is checked and then owned.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `epoll` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(epoll) })
}

/// One `epoll_ctl` call: `op` on `fd` with `events` and `token`.
///
/// # Errors
/// The kernel refusing it (`ENOENT` for a modification of a socket that is
/// not registered, `EBADF` for a closed one, `ENOMEM`).
pub fn epoll_ctl(
    epoll: RawFd,
    op: libc::c_int,
    fd: RawFd,
    token: u64,
    events: u32,
) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: `event` is a valid epoll_event for the duration of the call.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits (without a timeout) until `epoll` reports ready descriptors, and
/// returns how many of `events` it filled.
///
/// # Errors
/// `Interrupted` on a signal; anything else means the instance is broken.
pub fn epoll_wait(epoll: &OwnedFd, events: &mut [libc::epoll_event]) -> io::Result<usize> {
    let room = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `events` has room for `room` entries.
    let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), room, -1) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (close-on-exec): each
/// send arrives as one message.
///
/// # Errors
/// The system refusing the pair (out of descriptors).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut pair = [0; 2];
    // SAFETY: `pair` has room for the two descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) })
}

/// One blocking `send` of `bytes` on socket `fd` (MSG_NOSIGNAL: a closed
/// peer is an error, not a SIGPIPE).
///
/// # Errors
/// The peer is gone, or `Interrupted` by a signal.
pub fn send(fd: &OwnedFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is valid for its length.
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `accept` on a non-blocking listener: would-block while nothing is
    /// queued, then the queued connection, whose peer is the client and
    /// which is closed on exec; the listener stays non-blocking.
    #[test]
    fn accept_takes_queued_connections_and_would_block_otherwise() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let raw = listener.as_raw_fd();
        set_nonblocking(raw).expect("non-blocking");
        let e = accept(raw).expect_err("nothing queued");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
        let socket = accept(raw).expect("the queued connection");
        assert_eq!(
            socket_peer(socket.as_raw_fd()).expect("peer"),
            client.local_addr().unwrap()
        );
        // SAFETY: plain fcntl queries on open descriptors.
        let (fd_flags, file_flags) = unsafe {
            (
                libc::fcntl(socket.as_raw_fd(), libc::F_GETFD),
                libc::fcntl(socket.as_raw_fd(), libc::F_GETFL),
            )
        };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0, "close-on-exec");
        assert_eq!(file_flags & libc::O_NONBLOCK, 0, "blocking, as glommio's");
        let e = accept(raw).expect_err("queue empty again");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
