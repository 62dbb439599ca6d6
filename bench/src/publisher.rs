//! The publisher: one connection, paced (open loop) or burst.
//!
//! - **Paced** (`--rate R`): message `k` is due at `start + k/R`; each goes
//!   out in its own `send`, stamped when sent. A late loop catches up by
//!   sending everything due (open loop: the schedule does not wait for the
//!   broker).
//! - **Burst** (no `--rate`): messages are encoded into a batch of up to
//!   [`BURST_BATCH`] bytes, stamped at encode time, and written as fast as TCP
//!   takes them; a new batch is made only once the last one is fully written,
//!   so a stamp is never more than one batch older than its send.
//!
//! QoS 1/2 keep at most [`INFLIGHT`] messages unacknowledged (PUBREL is sent
//! on PUBREC).
//!
//! Paced runs also record each message's *slip*: how late it went out
//! against its schedule (`sent - due`). An open-loop publisher that falls
//! behind (the broker stops reading, or the publisher itself is too slow)
//! hides that backlog from the stamped latency, which starts at the actual
//! send; the latency scenario adds the slip back when it judges whether the
//! lag grows.

use crate::mqtt::{self, Frame};
use crate::stats;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Burst batch size: big enough to amortize the syscall, small enough that
/// stamps stay fresh.
const BURST_BATCH: usize = 64 * 1024;

/// Unacknowledged QoS 1/2 publishes allowed; more only queue in the broker.
const INFLIGHT: usize = 256;

/// How long the MQTT handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publisher {0}: {1}")]
    Io(&'static str, io::Error),
    #[error("publisher: {0}")]
    Protocol(String),
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    pub topic: String,
    pub qos: u8,
    pub payload: usize,
    pub msgs: u64,
    /// Messages per second; `None` = burst.
    pub rate: Option<f64>,
    /// Speak to the raw forwarder (hello `P`, no CONNECT).
    pub raw: bool,
    /// Speak MQTT 5.0 (else 3.1.1).
    pub v5: bool,
    pub client_id: String,
    /// Sequence number of the first message (the latency scenario's steps
    /// continue the numbering, so late messages of a step are recognized).
    pub first_seq: u64,
    /// Record the slip of every `track_stride`-th message (paced only)...
    pub track_stride: u64,
    /// ... and of at most this many (8 bytes each).
    pub track_msgs: u64,
    /// The clock of the payload stamps (the subscribers read the same one).
    pub clock: stats::Clock,
}

/// What was published.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Published {
    pub sent: u64,
    pub acked: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// Paced: per tracked message, ns between its due time and its send.
    pub slip_ns: Vec<u64>,
}

/// Publishes until `plan.msgs` are sent (and acked for QoS > 0), `stop` is
/// set, or `deadline_ns` passes.
///
/// # Errors
/// Connect, handshake or socket errors.
pub fn run(
    plan: &Plan,
    stop: &Arc<AtomicBool>,
    deadline_ns: u64,
) -> Result<Published, PublishError> {
    let mut stream = handshake(plan)?;
    let mut poll = Poll::new().map_err(|e| PublishError::Io("poll", e))?;
    poll.registry()
        .register(
            &mut stream,
            Token(0),
            Interest::READABLE | Interest::WRITABLE,
        )
        .map_err(|e| PublishError::Io("register", e))?;
    let mut events = Events::with_capacity(16);
    let mut out: Vec<u8> = Vec::with_capacity(BURST_BATCH + plan.payload + 64);
    let mut written = 0usize;
    let mut inbuf: Vec<u8> = Vec::new();
    let mut scratch = vec![0u8; 16 * 1024];
    let mut payload = vec![0u8; plan.payload];
    let mut pub_ = Published::default();
    let mut inflight = 0usize;
    let mut next_pkid: u16 = 1;
    let start = stats::monotonic_ns();
    let interval_ns = plan.rate.map(|r| (1e9 / r.max(0.001)) as u64);
    loop {
        let now = stats::monotonic_ns();
        if stop.load(Ordering::Relaxed) || now > deadline_ns {
            break;
        }
        let all_sent = pub_.sent >= plan.msgs;
        if all_sent && inflight == 0 && written == out.len() {
            break;
        }
        // Encode what is due, when the previous batch is out.
        if written == out.len() {
            out.clear();
            written = 0;
            while pub_.sent < plan.msgs && (plan.qos == 0 || inflight < INFLIGHT) {
                let due = interval_ns.map_or(0, |i| start + pub_.sent * i);
                if due > now || out.len() >= BURST_BATCH {
                    break;
                }
                let pkid = if plan.qos > 0 {
                    let p = next_pkid;
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                    inflight += 1;
                    p
                } else {
                    0
                };
                let sent_ns = stats::monotonic_ns();
                let stamp_ns = match plan.clock {
                    stats::Clock::Monotonic => sent_ns,
                    clock => clock.now_ns(),
                };
                stats::stamp(&mut payload, stamp_ns, plan.first_seq + pub_.sent);
                let stride = plan.track_stride.max(1);
                if interval_ns.is_some()
                    && pub_.sent.is_multiple_of(stride)
                    && pub_.sent / stride < plan.track_msgs
                {
                    pub_.slip_ns.push(sent_ns.saturating_sub(due));
                }
                mqtt::encode_publish_header(
                    &plan.topic,
                    plan.qos,
                    pkid,
                    payload.len(),
                    plan.v5,
                    &mut out,
                );
                out.extend_from_slice(&payload);
                if pub_.first_ns == 0 {
                    pub_.first_ns = sent_ns;
                }
                pub_.last_ns = sent_ns;
                pub_.sent += 1;
                if interval_ns.is_some() {
                    break; // paced: one message per send.
                }
            }
        }
        // Write.
        while written < out.len() {
            match stream.write(&out[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PublishError::Io("write", e)),
            }
        }
        // Read acks.
        loop {
            match stream.read(&mut scratch) {
                Ok(0) => {
                    return Err(PublishError::Protocol(
                        "broker closed the connection".into(),
                    ));
                }
                Ok(n) => inbuf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PublishError::Io("read", e)),
            }
        }
        let mut used = 0;
        while let Some((frame, n)) = mqtt::parse_as(&inbuf[used..], plan.v5)
            .map_err(|e| PublishError::Protocol(e.to_string()))?
        {
            used += n;
            match frame {
                Frame::Ack {
                    kind: mqtt::kind::PUBACK,
                    ..
                } if plan.qos == 1 => {
                    inflight = inflight.saturating_sub(1);
                    pub_.acked += 1;
                }
                Frame::Ack {
                    kind: mqtt::kind::PUBREC,
                    pkid,
                } => {
                    mqtt::encode_ack(mqtt::kind::PUBREL, pkid, &mut out);
                }
                Frame::Ack {
                    kind: mqtt::kind::PUBCOMP,
                    ..
                } => {
                    inflight = inflight.saturating_sub(1);
                    pub_.acked += 1;
                }
                _ => {}
            }
        }
        inbuf.drain(..used);
        // Wait: until the next message is due, or for socket readiness.
        let timeout = if written < out.len()
            || (all_sent && inflight > 0)
            || plan.qos > 0 && inflight >= INFLIGHT
        {
            Duration::from_millis(50)
        } else if let Some(i) = interval_ns {
            let due = start + pub_.sent * i;
            Duration::from_nanos(due.saturating_sub(stats::monotonic_ns()).min(50_000_000))
        } else {
            Duration::ZERO
        };
        if !timeout.is_zero() {
            match poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PublishError::Io("poll", e)),
            }
        }
    }
    // Let the last bytes leave before the socket closes.
    let _ = stream.write_all(&mqtt::DISCONNECT);
    Ok(pub_)
}

/// Connects and completes the MQTT (or raw) handshake with a blocking socket,
/// then switches to non-blocking for the event loop.
fn handshake(plan: &Plan) -> Result<mio::net::TcpStream, PublishError> {
    let mut s = std::net::TcpStream::connect_timeout(&plan.target, HANDSHAKE_TIMEOUT)
        .map_err(|e| PublishError::Io("connect", e))?;
    s.set_nodelay(true)
        .map_err(|e| PublishError::Io("nodelay", e))?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| PublishError::Io("timeout", e))?;
    if plan.raw {
        s.write_all(b"P")
            .map_err(|e| PublishError::Io("hello", e))?;
    } else {
        let mut buf = Vec::new();
        let connect = if plan.v5 {
            mqtt::encode_connect_v5(&plan.client_id, 60, true, 0, &mut buf)
        } else {
            mqtt::encode_connect(&plan.client_id, 60, true, &mut buf)
        };
        connect.map_err(|e| PublishError::Protocol(e.to_string()))?;
        s.write_all(&buf)
            .map_err(|e| PublishError::Io("CONNECT", e))?;
        let mut got = Vec::new();
        let mut chunk = [0u8; 64];
        loop {
            let n = s
                .read(&mut chunk)
                .map_err(|e| PublishError::Io("CONNACK", e))?;
            if n == 0 {
                return Err(PublishError::Protocol("closed before CONNACK".into()));
            }
            got.extend_from_slice(&chunk[..n]);
            match mqtt::parse_as(&got, plan.v5) {
                Ok(Some((Frame::ConnAck { code: 0 }, _))) => break,
                Ok(Some((f, _))) => {
                    return Err(PublishError::Protocol(format!(
                        "expected CONNACK, got {f:?}"
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(PublishError::Protocol(e.to_string())),
            }
        }
    }
    s.set_nonblocking(true)
        .map_err(|e| PublishError::Io("nonblocking", e))?;
    Ok(mio::net::TcpStream::from_std(s))
}
