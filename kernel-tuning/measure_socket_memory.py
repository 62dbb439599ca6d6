#!/usr/bin/env python3
"""Measure what the kernel spends on one idle TCP connection, on this host.

Opens N loopback connections to a listener in this process, accepts them all,
leaves them idle, and reports the deltas of /proc/net/sockstat (socket counts,
TCP buffer pages), of the slab caches one socket lives in (/proc/slabinfo,
needs root) and of the Slab line of /proc/meminfo. Every loopback connection is
two sockets on this host (the client end and the accepted end); numbers are
reported per socket, which is what a broker holds per subscriber.

Phase 2 writes a small message (default 100 bytes, a typical fan-out PUBLISH)
to every accepted socket and leaves it unread on the client side, to show the
TCP buffer memory (tcp_mem pages) a socket charges while it holds data.

Usage: measure_socket_memory.py [connections] [message-bytes]
It only talks to 127.0.0.1 and closes everything before it exits.
"""
import gc
import os
import resource
import socket
import sys
import time

SLABS = ("TCP", "TCPv6", "sock_inode_cache", "filp", "dentry", "eventpoll_pwq",
         "eventpoll_epi", "skbuff_head_cache", "kmalloc-cg-192", "kmalloc-cg-64",
         "kmalloc-cg-32", "kmalloc-cg-512", "kmalloc-cg-1k", "kmalloc-cg-2k",
         "kmalloc-cg-4k", "kmalloc-192", "kmalloc-64", "kmalloc-32")


def sockstat():
    out = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            proto, rest = line.split(":", 1)
            vals = rest.split()
            for k, v in zip(vals[::2], vals[1::2]):
                out[f"{proto}.{k}"] = int(v)
    return out


def slabs():
    """Bytes in use per slab cache (active objects x object size)."""
    out = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f.readlines()[2:]:
                p = line.split()
                out[p[0]] = int(p[1]) * int(p[3])
    except OSError:
        pass
    return out


def meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def settle():
    gc.collect()
    time.sleep(1.0)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    msg = b"x" * (int(sys.argv[2]) if len(sys.argv) > 2 else 100)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if 2 * n + 64 > hard:
        sys.exit(f"need {2 * n + 64} fds, hard limit is {hard}")

    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4096)
    addr = lst.getsockname()

    settle()
    s0, k0, m0 = sockstat(), slabs(), meminfo("Slab")
    clients, servers = [], []
    for _ in range(n):
        c = socket.create_connection(addr)
        clients.append(c)
        servers.append(lst.accept()[0])
    settle()
    s1, k1, m1 = sockstat(), slabs(), meminfo("Slab")

    for s in servers:
        s.send(msg)
    settle()
    s2 = sockstat()

    socks = 2 * n
    print(f"connections: {n} idle loopback connections = {socks} sockets "
          f"(kernel {os.uname().release})")
    print(f"sockstat TCP inuse: {s0['TCP.inuse']} -> {s1['TCP.inuse']} "
          f"(+{s1['TCP.inuse'] - s0['TCP.inuse']})")
    print(f"sockstat TCP mem (pages of tcp_mem) idle: {s0['TCP.mem']} -> {s1['TCP.mem']} "
          f"= {(s1['TCP.mem'] - s0['TCP.mem']) * 4096 / socks:.1f} bytes/socket")
    print(f"sockstat TCP mem with {len(msg)} B unread in each of {n} sockets: "
          f"{s1['TCP.mem']} -> {s2['TCP.mem']} pages = "
          f"{(s2['TCP.mem'] - s1['TCP.mem']) * 4096 / n:.0f} bytes per socket holding data")
    if k0:
        total = 0
        for name in SLABS:
            d = k1.get(name, 0) - k0.get(name, 0)
            if d > 0:
                total += d
                print(f"  slab {name:20s} +{d / socks:8.1f} bytes/socket")
        print(f"slab caches above, total: {total / socks:.0f} bytes/socket")
    print(f"/proc/meminfo Slab delta: {(m1 - m0) / socks:.0f} bytes/socket")

    for s in clients + servers:
        s.close()
    lst.close()


if __name__ == "__main__":
    main()
