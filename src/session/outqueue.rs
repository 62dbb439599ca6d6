//! A client's bounded outgoing queue and its vectored, non-blocking write.
//!
//! Fan-out never copies a frame per subscriber. During one *step* (one read
//! of a publisher's socket, or one batch from another shard) every QoS 0
//! frame is encoded once into the shard's *batch* buffer, and each matching
//! subscriber gets a [`OutFrame::Batch`] range of it. Consecutive frames of
//! the same step that go to the same subscriber are adjacent in the batch,
//! so they extend the subscriber's last range instead of adding an entry:
//! in a burst of 800 publishes to one topic each subscriber's queue grows by
//! one entry, not 800, and the write is one iovec, as a raw TCP forwarder's.
//! A QoS 1/2 PUBLISH shared by the subscribers given the same packet id lies
//! in the batch too (`protocol::message::Encoded::publish`), so a QoS 1
//! burst to subscribers whose ids go in step is one entry each as well.
//! At the end of the step the shard seals the batch into one shared,
//! reference-counted chunk ([`OutQueue::seal`]) and flushes each subscriber
//! that got something with **one** `sendmsg` of everything queued. When a
//! socket's send buffer is full the rest stays queued and the connection
//! task waits for the socket to become writable.
//!
//! Chunks are shard-local `Rc<[u8]>`, not `Bytes`: sharing one with 10k
//! subscribers costs plain increments, not atomic read-modify-writes (17% of
//! the broker's CPU in a burst fan-out when frames were `Bytes`).

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use crate::net::fd;

/// Most queue entries handed to one `sendmsg` (each is up to 3 iovecs;
/// Linux's `IOV_MAX` is 1024).
pub const MAX_IOVECS_PER_WRITE: usize = 256;

pub use crate::protocol::message::Frame;
use crate::protocol::message::{BatchRange, LANES};

thread_local! {
    /// Bytes queued in every [`OutQueue`] of this thread. A shard is one
    /// thread, so this is the shard's total, kept with one plain add or
    /// subtract per queue change (no atomics, nothing to pass around); the
    /// shard compares it with its share of `max_queued_bytes_total` once per
    /// step (see `shard::Shard::flush_dirty`).
    static QUEUED_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// Bytes queued in all the outgoing queues of this shard (thread). Counted
/// per queue: a frame shared by many queues counts once per queue.
pub fn shard_queued_bytes() -> usize {
    QUEUED_BYTES.with(Cell::get)
}

/// Adds `n` to this shard's queued bytes.
fn count_queued(n: usize) {
    QUEUED_BYTES.with(|c| c.set(c.get() + n));
}

/// Subtracts `n` from this shard's queued bytes.
fn uncount_queued(n: usize) {
    QUEUED_BYTES.with(|c| c.set(c.get().saturating_sub(n)));
}

/// One entry of a client's outgoing queue.
#[derive(Clone, Debug)]
pub enum OutFrame {
    /// Bytes `start..start + len` of `chunk`: one or more consecutive frames,
    /// `publishes` of them PUBLISH packets.
    Chunk {
        /// The shared bytes.
        chunk: Frame,
        /// First byte of the range.
        start: u32,
        /// Length of the range.
        len: u32,
        /// PUBLISH packets in the range (for the queue's message limit).
        publishes: u32,
    },
    /// Bytes `start..start + len` of the shard's batch of the current step;
    /// becomes a [`OutFrame::Chunk`] when the step ends ([`OutQueue::seal`]),
    /// before anything is written.
    Batch {
        /// The batch lane it lies in (`protocol::message::Batch`).
        lane: u8,
        /// First byte of the range in its lane.
        start: u32,
        /// Length of the range.
        len: u32,
        /// PUBLISH packets in the range.
        publishes: u32,
    },
    /// A QoS 1/2 PUBLISH: the shared head (fixed header + topic), this
    /// subscriber's packet id (big-endian), then the shared payload.
    Publish {
        /// Fixed header and topic, shared by every subscriber at this QoS.
        head: Frame,
        /// This subscriber's packet id, big-endian as on the wire.
        packet_id: [u8; 2],
        /// The message payload, shared.
        payload: Frame,
    },
    /// A small control packet (CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP,
    /// UNSUBACK, PINGRESP: all 2 or 4 bytes) kept inline, so answering a
    /// client allocates nothing.
    Control {
        /// The packet's bytes; only the first `len` are used.
        bytes: [u8; 4],
        /// How many of `bytes` are the packet.
        len: u8,
    },
}

impl OutFrame {
    /// A control packet of at most 4 bytes.
    pub fn control(packet: &[u8]) -> OutFrame {
        let mut bytes = [0u8; 4];
        let len = packet.len().min(4);
        bytes[..len].copy_from_slice(&packet[..len]);
        OutFrame::Control {
            bytes,
            len: len as u8,
        }
    }

    /// A whole encoded packet of its own (SUBACK, a retained message, a
    /// redelivery).
    pub fn whole(frame: Frame) -> OutFrame {
        let publishes = u32::from(frame.first().is_some_and(|h| h >> 4 == 3));
        OutFrame::Chunk {
            start: 0,
            len: u32::try_from(frame.len()).unwrap_or(u32::MAX),
            publishes,
            chunk: frame,
        }
    }

    /// Wire length of the entry in bytes.
    pub fn len(&self) -> usize {
        match self {
            OutFrame::Chunk { len, .. } | OutFrame::Batch { len, .. } => *len as usize,
            OutFrame::Publish { head, payload, .. } => head.len() + 2 + payload.len(),
            OutFrame::Control { len, .. } => usize::from(*len),
        }
    }

    /// PUBLISH packets in this entry (counted against the queue limits).
    fn publishes(&self) -> usize {
        match self {
            OutFrame::Chunk { publishes, .. } | OutFrame::Batch { publishes, .. } => {
                *publishes as usize
            }
            OutFrame::Publish { .. } => 1,
            OutFrame::Control { .. } => 0,
        }
    }

    /// The entry's bytes in up to three pieces (head, packet id, payload).
    /// An unsealed batch range has none yet (it is sealed before any write).
    fn parts(&self) -> [&[u8]; 3] {
        match self {
            OutFrame::Chunk {
                chunk, start, len, ..
            } => {
                let range = *start as usize..(*start as usize + *len as usize);
                [chunk.get(range).unwrap_or(&[]), &[], &[]]
            }
            OutFrame::Batch { .. } => [&[], &[], &[]],
            OutFrame::Publish {
                head,
                packet_id,
                payload,
            } => [head, packet_id, payload],
            OutFrame::Control { bytes, len } => [&bytes[..usize::from(*len)], &[], &[]],
        }
    }
}

/// What a flush achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued was written.
    All,
    /// The socket's send buffer is full; the rest stays queued.
    WouldBlock,
}

/// A client's outgoing frames, in order, with their byte and PUBLISH counts.
#[derive(Debug, Default)]
pub struct OutQueue {
    /// Entries not yet fully written, oldest first.
    frames: VecDeque<OutFrame>,
    /// Bytes of the front entry already written (a partial write).
    offset: usize,
    /// Bytes queued, counting the front entry in full.
    bytes: usize,
    /// PUBLISH packets queued (the limit on queued messages counts these;
    /// a partly written run counts until it is written in full). A `u32`
    /// (queues hold far fewer) so that `unsealed` fits beside it.
    publishes: u32,
    /// Batch entries of the current step not yet sealed. They are among
    /// the newest entries, but other entries (a QoS 1 PUBLISH, a SUBACK)
    /// may lie between them, so [`OutQueue::seal`] walks back until it has
    /// sealed this many, not just the trailing run.
    unsealed: u32,
}

impl OutQueue {
    /// True when nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes waiting to be written.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// PUBLISH frames waiting to be written.
    pub fn publishes(&self) -> usize {
        self.publishes as usize
    }

    /// Entries queued (tests: whether frames merged).
    #[cfg(test)]
    pub fn entries(&self) -> usize {
        self.frames.len()
    }

    /// Appends an entry.
    pub fn push(&mut self, frame: OutFrame) {
        self.bytes += frame.len();
        count_queued(frame.len());
        self.publishes += frame.publishes() as u32;
        self.frames.push_back(frame);
    }

    /// Appends one QoS 0 PUBLISH that lies at `range` of the current
    /// step's batch, extending the last entry when it ends exactly there in
    /// the same lane (the usual case in a burst: no new entry per message).
    #[inline]
    pub fn push_batch(&mut self, range: BatchRange) {
        self.push_batch_run(range, 1);
    }

    /// Appends `count` adjacent QoS 0 PUBLISH frames that lie at `range`
    /// of the current step's batch (a run of publishes to one topic,
    /// `shard::run`), as [`OutQueue::push_batch`] does for one.
    #[inline]
    pub fn push_batch_run(&mut self, range: BatchRange, count: u32) {
        let BatchRange { lane, start, len } = range;
        self.bytes += len as usize;
        count_queued(len as usize);
        self.publishes += count;
        if let Some(OutFrame::Batch {
            lane: l_lane,
            start: s,
            len: l,
            publishes,
        }) = self.frames.back_mut()
            && *l_lane == lane
            && *s + *l == start
        {
            *l += len;
            *publishes += count;
            return;
        }
        self.unsealed += 1;
        self.frames.push_back(OutFrame::Batch {
            lane,
            start,
            len,
            publishes: count,
        });
    }

    /// The step ended: the batch is now `chunk`, its lanes starting at
    /// `bases` (`protocol::message::Batch::seal`). Turns this step's batch
    /// ranges (all among the entries pushed this step, the newest) into
    /// ranges of the chunk; walks back only as far as the oldest of them.
    pub fn seal(&mut self, chunk: &Frame, bases: &[u32; LANES]) {
        for frame in self.frames.iter_mut().rev() {
            if self.unsealed == 0 {
                break;
            }
            let OutFrame::Batch {
                lane,
                start,
                len,
                publishes,
            } = *frame
            else {
                continue;
            };
            let base = bases.get(usize::from(lane)).copied().unwrap_or(0);
            *frame = OutFrame::Chunk {
                chunk: chunk.clone(),
                start: base + start,
                len,
                publishes,
            };
            self.unsealed -= 1;
        }
    }

    /// Drops everything queued and gives the memory back (the client is gone).
    pub fn clear(&mut self) {
        *self = OutQueue::default();
    }

    /// The unwritten bytes of the front frame's current piece, for a write
    /// that waits for the socket to become writable.
    #[cfg(test)]
    pub fn front_chunk(&self) -> Option<&[u8]> {
        let frame = self.frames.front()?;
        let mut skip = self.offset;
        for part in frame.parts() {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            return Some(&part[skip..]);
        }
        None
    }

    /// Marks `n` bytes as written, popping completed frames.
    pub fn advance(&mut self, n: usize) {
        let before = self.bytes;
        self.pop_written(n);
        uncount_queued(before - self.bytes);
    }

    /// [`OutQueue::advance`] without the shard's count.
    fn pop_written(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.frames.front() else {
                return;
            };
            let remaining = front.len() - self.offset;
            if n < remaining {
                self.offset += n;
                self.bytes -= n;
                return;
            }
            n -= remaining;
            self.bytes -= remaining;
            self.offset = 0;
            self.publishes -= front.publishes() as u32;
            self.frames.pop_front();
        }
        if self.frames.is_empty() {
            // Give the ring buffer back: an idle subscriber holds no queue.
            self.frames = VecDeque::new();
        }
    }

    /// Copies the queue's first bytes into `buf` (as many as fit) without
    /// consuming them; [`OutQueue::advance`] consumes what was written. For
    /// streams that must be written through a buffer (TLS, WebSocket).
    pub fn copy_front(&self, buf: &mut [u8]) -> usize {
        let mut skip = self.offset;
        let mut copied = 0;
        for frame in &self.frames {
            for part in frame.parts() {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                let rest = &part[skip..];
                skip = 0;
                let n = rest.len().min(buf.len() - copied);
                buf[copied..copied + n].copy_from_slice(&rest[..n]);
                copied += n;
                if copied == buf.len() {
                    return copied;
                }
            }
        }
        copied
    }

    /// Writes as much as the socket takes with non-blocking vectored sends.
    /// `iovecs` is scratch space kept by the caller (one per shard), so a
    /// flush allocates nothing.
    ///
    /// Returns the bytes written and whether everything went out.
    ///
    /// # Errors
    /// Any socket error other than "would block" (the peer is gone).
    pub fn flush(
        &mut self,
        fd: RawFd,
        iovecs: &mut Vec<libc::iovec>,
    ) -> io::Result<(usize, Flushed)> {
        let mut written = 0;
        loop {
            if self.frames.is_empty() {
                return Ok((written, Flushed::All));
            }
            iovecs.clear();
            let mut skip = self.offset;
            let mut total = 0;
            for frame in self.frames.iter().take(MAX_IOVECS_PER_WRITE) {
                for part in frame.parts() {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    let rest = &part[skip..];
                    iovecs.push(libc::iovec {
                        iov_base: rest.as_ptr() as *mut libc::c_void,
                        iov_len: rest.len(),
                    });
                    total += rest.len();
                    skip = 0;
                }
            }
            debug_assert!(total > 0, "an unsealed batch range at the queue's front");
            if total == 0 {
                // Nothing writable (cannot happen once every range is
                // sealed): never spin on empty sends, which would stall
                // the whole shard.
                iovecs.clear();
                return Ok((written, Flushed::All));
            }
            let sent = fd::send_vectored(fd, iovecs);
            // The iovecs point into `self.frames`: forget them before it changes.
            iovecs.clear();
            let n = match sent {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((written, Flushed::WouldBlock));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            written += n;
            self.advance(n);
            if n < total {
                return Ok((written, Flushed::WouldBlock));
            }
        }
    }
}

impl Drop for OutQueue {
    fn drop(&mut self) {
        // Whatever was never written leaves the shard's count with the queue
        // (this also covers `clear`, which replaces the queue).
        uncount_queued(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything `q` would write, front to back, consumed.
    fn drain(q: &mut OutQueue) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(part) = q.front_chunk() {
            let n = part.len();
            all.extend_from_slice(part);
            q.advance(n);
        }
        all
    }

    /// A range of lane `lane` of the batch.
    fn range(lane: u8, start: u32, len: u32) -> BatchRange {
        BatchRange { lane, start, len }
    }
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn publish_frame(id: u8) -> OutFrame {
        OutFrame::Publish {
            head: Frame::from(&[0x32, 7, 0, 1, b't'][..]),
            packet_id: [0, id],
            payload: Frame::from(&b"xy"[..]),
        }
    }

    #[test]
    fn counts_bytes_and_publishes() {
        let mut q = OutQueue::default();
        q.push(OutFrame::whole(Frame::from(&[0x30, 3, 0, 1, b't'][..])));
        q.push(OutFrame::control(&[0x40, 2, 0, 1]));
        q.push(publish_frame(1));
        assert_eq!(q.bytes(), 5 + 4 + 9);
        assert_eq!(q.publishes(), 2);
        q.advance(7);
        assert_eq!(q.bytes(), 11);
        assert_eq!(q.publishes(), 1);
        assert_eq!(q.front_chunk(), Some(&[0, 1][..]));
        q.advance(11);
        assert!(q.is_empty());
        assert_eq!(q.publishes(), 0);
    }

    #[test]
    fn copy_front_copies_across_frames_and_parts_without_consuming() {
        let mut q = OutQueue::default();
        q.push(OutFrame::whole(Frame::from(&b"ab"[..])));
        q.push(publish_frame(9));
        q.push(OutFrame::control(&[0xd0, 0]));
        let mut buf = [0u8; 64];
        let n = q.copy_front(&mut buf);
        assert_eq!(&buf[..n], b"ab\x32\x07\x00\x01t\x00\x09xy\xd0\x00");
        q.advance(5);
        let mut small = [0u8; 4];
        assert_eq!(q.copy_front(&mut small), 4);
        assert_eq!(&small, b"\x01t\x00\x09");
        assert_eq!(q.bytes(), 8);
        q.advance(8);
        assert_eq!(q.copy_front(&mut buf), 0);
    }

    #[test]
    fn flush_writes_every_frame_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut q = OutQueue::default();
        q.push(OutFrame::whole(Frame::from(&b"ab"[..])));
        q.push(publish_frame(9));
        q.push(OutFrame::control(&[0xd0, 0]));
        let (n, how) = q.flush(a.as_raw_fd(), &mut Vec::new()).unwrap();
        assert_eq!((n, how), (13, Flushed::All));
        let mut got = vec![0u8; 13];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, b"ab\x32\x07\x00\x01t\x00\x09xy\xd0\x00");
    }

    #[test]
    fn flush_stops_when_the_socket_is_full_and_resumes() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut q = OutQueue::default();
        let big = Frame::from(vec![7u8; 64 * 1024]);
        for _ in 0..64 {
            q.push(OutFrame::whole(big.clone()));
        }
        let (first, how) = q.flush(a.as_raw_fd(), &mut Vec::new()).unwrap();
        assert_eq!(how, Flushed::WouldBlock);
        assert!(first > 0 && first < 64 * 64 * 1024);
        assert_eq!(q.bytes(), 64 * 64 * 1024 - first);
        let mut total = first;
        let mut sink = vec![0u8; 1 << 20];
        while !q.is_empty() {
            let n = b.read(&mut sink).unwrap();
            assert!(n > 0);
            let (w, _) = q.flush(a.as_raw_fd(), &mut Vec::new()).unwrap();
            total += w;
        }
        assert_eq!(total, 64 * 64 * 1024);
    }

    #[test]
    fn batch_ranges_merge_and_are_sealed_into_one_chunk() {
        let batch = b"\x30\x03\x00\x01a\x30\x03\x00\x01b\x30\x03\x00\x01c";
        let mut q = OutQueue::default();
        q.push(OutFrame::control(&[0x20, 2, 0, 0]));
        q.push_batch(range(0, 0, 5));
        q.push_batch(range(0, 5, 5));
        q.push_batch(range(0, 10, 5));
        assert_eq!(q.frames.len(), 2, "adjacent ranges share one entry");
        assert_eq!(q.publishes(), 3);
        assert_eq!(q.bytes(), 19);
        q.seal(&Frame::from(&batch[..]), &[0; LANES]);
        let (a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(
            q.flush(a.as_raw_fd(), &mut Vec::new()).unwrap(),
            (19, Flushed::All)
        );
        let mut got = vec![0u8; 19];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &[0x20, 2, 0, 0]);
        assert_eq!(&got[4..], &batch[..]);
        assert_eq!(q.publishes(), 0);
    }

    #[test]
    fn batch_ranges_behind_a_qos1_publish_are_sealed_too() {
        // A QoS 0 range, then a QoS 1 PUBLISH queued in the same step: the
        // range must be sealed although it is not the newest entry (an
        // unsealed range has no bytes and made flush spin).
        let batch = b"\x30\x03\x00\x01a";
        let mut q = OutQueue::default();
        q.push_batch(range(0, 0, 5));
        q.push(OutFrame::whole(Frame::from(
            &b"\x32\x05\x00\x01b\x00\x01"[..],
        )));
        q.seal(&Frame::from(&batch[..]), &[0; LANES]);
        let (a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(
            q.flush(a.as_raw_fd(), &mut Vec::new()).unwrap(),
            (12, Flushed::All)
        );
        let mut got = vec![0u8; 12];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got[..5], &batch[..]);
    }

    #[test]
    fn a_gap_in_the_batch_starts_a_new_entry() {
        let mut q = OutQueue::default();
        q.push_batch(range(0, 0, 5));
        q.push_batch(range(0, 10, 5));
        assert_eq!(q.frames.len(), 2);
        assert_eq!(q.publishes(), 2);
    }

    #[test]
    fn flush_reports_a_closed_peer() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut q = OutQueue::default();
        q.push(OutFrame::whole(Frame::from(&b"x"[..])));
        assert!(q.flush(a.as_raw_fd(), &mut Vec::new()).is_err());
    }

    #[test]
    fn the_shard_count_follows_every_queue() {
        // Tests run on their own threads: the count starts at zero here.
        let base = shard_queued_bytes();
        let mut a = OutQueue::default();
        let mut b = OutQueue::default();
        a.push(OutFrame::control(&[0xd0, 0]));
        a.push_batch(range(0, 0, 10));
        b.push(publish_frame(1));
        let b_len = b.bytes();
        assert_eq!(shard_queued_bytes(), base + 12 + b_len);
        a.advance(5);
        assert_eq!(shard_queued_bytes(), base + 7 + b_len);
        a.clear();
        assert_eq!(shard_queued_bytes(), base + b_len);
        drop(b);
        assert_eq!(shard_queued_bytes(), base);
    }

    #[test]
    fn seal_finds_batch_ranges_behind_other_frames() {
        // One step: a range, a PUBACK, another range (a client publishing
        // QoS 1 twice in one read to a topic it subscribes to).
        let mut q = OutQueue::default();
        q.push_batch(range(0, 0, 3));
        q.push(OutFrame::control(&[0x40, 2, 0, 1]));
        q.push_batch(range(0, 10, 2));
        let chunk = Frame::from(&b"abc-------de"[..]);
        q.seal(&chunk, &[0; LANES]);
        assert_eq!(drain(&mut q), b"abc\x40\x02\x00\x01de");
        assert!(q.is_empty());
    }

    #[test]
    fn ranges_of_different_lanes_never_merge_and_seal_at_their_lane() {
        // Lane 0 holds "aaabbb" (two frames), lane 1 "XY"; sealed back to
        // back as "aaabbbXY": lane 1 starts at 6.
        let mut q = OutQueue::default();
        q.push_batch(range(0, 0, 3));
        q.push_batch(range(1, 0, 1));
        q.push_batch(range(0, 3, 3));
        q.push_batch(range(1, 1, 1));
        assert_eq!(
            q.frames.len(),
            4,
            "adjacent offsets of two lanes stay apart"
        );
        let mut p = OutQueue::default();
        p.push_batch(range(1, 0, 1));
        p.push_batch(range(1, 1, 1));
        assert_eq!(p.frames.len(), 1, "one lane's consecutive frames merge");
        let chunk = Frame::from(&b"aaabbbXY"[..]);
        q.seal(&chunk, &[0, 6, 8, 8]);
        p.seal(&chunk, &[0, 6, 8, 8]);
        assert_eq!(drain(&mut q), b"aaaXbbbY");
        assert_eq!(p.front_chunk(), Some(&b"XY"[..]));
    }
}
