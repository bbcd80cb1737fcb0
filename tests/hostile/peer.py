#!/usr/bin/env python3
"""A hostile local peer of the broker, for tests/broker/hostile.rs and
benches/hostile.rs. Run as an unprivileged user (setpriv --reuid=...).

    peer.py CONTROL MODE CONNS [ARG]

MODE:
  idle       CONNS connections that never send a byte
  slowloris  CONNS connections, each sends "{" then one space per second
  unread     CONNS connections, each sends one bind_many of ARG items
             {"name": "web"} and never reads
  list       CONNS connections, each pipelines ARG "list" requests and
             never reads
  refused    one connection at a time, looping on a refused bind_many of
             ARG items (a log flood), reconnecting when closed
  measure    not hostile: CONNS binds of the socket named "web", each on a
             new connection (as multibinder's client does); prints the
             latencies in microseconds, sorted, one line, and exits

Prints "ready N" (N connections the broker kept open, as far as the peer
can tell) once set up, then keeps everything open until killed.
"""
import json
import os
import socket
import sys
import time

control, mode, conns = sys.argv[1], sys.argv[2], int(sys.argv[3])
arg = int(sys.argv[4]) if len(sys.argv) > 4 else 0


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(control)
    return s


def request(method, params, rid=1):
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": rid}).encode()


if mode == "measure":
    import array
    out = []
    req = request("bind", [{"name": "web"}])
    for i in range(conns):
        t0 = time.perf_counter()
        s = connect()
        s.sendall(req)
        data, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        t1 = time.perf_counter()
        if b'"result":true' not in data:
            sys.exit("bind failed: %r" % data)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                    os.close(fd)
        s.close()
        out.append(int((t1 - t0) * 1e6))
    print(" ".join(str(x) for x in sorted(out)), flush=True)
    sys.exit(0)

socks = []
for _ in range(conns):
    try:
        s = connect()
    except OSError:
        break
    socks.append(s)
    try:
        if mode == "slowloris":
            s.setblocking(False)
            s.send(b"{")
        elif mode == "unread":
            s.setblocking(False)
            s.send(request("bind_many", [{"name": "web"}] * arg))
        elif mode == "list":
            s.setblocking(False)
            payload = b"".join(request("list", None, i) for i in range(arg))
            try:
                s.send(payload)
            except BlockingIOError:
                pass
    except OSError:
        pass

if mode == "refused":
    print("ready 1", flush=True)
    payload = request("bind_many", [{"spec": "tcp://127.0.0.1:1"}] * arg)
    s = socks[0] if socks else connect()
    while True:
        try:
            s.sendall(payload)
            s.recv(1 << 20)
        except OSError:
            s.close()
            try:
                s = connect()
            except OSError:
                time.sleep(0.01)

print("ready %d" % len(socks), flush=True)
while True:
    if mode == "slowloris":
        for s in socks:
            try:
                s.send(b" ")
            except OSError:
                pass
    time.sleep(1)
