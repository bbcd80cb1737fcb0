#!/usr/bin/env python3
"""An echo server for UDP and UNIX sockets, to test adoption of every kind.

- With --bind SPEC (udp://ADDR:PORT, unix:/PATH, unix-dgram:/PATH, tcp://ADDR:PORT),
  it binds its sockets itself, as a daemon that has never heard of the broker;
  otherwise it takes them from LISTEN_FDS (LISTEN_PID must be its own pid).
- Datagram sockets: every datagram is answered with "pid=P " + the datagram.
  Stream sockets: each connection gets one reply "pid=P " + what it sent
  (up to the first newline), then is closed.
- Sends READY=1 to $NOTIFY_SOCKET once it serves. On SIGTERM it stops
  between two requests (never after reading one and before answering it),
  so a request in the shared socket's queue is left for the next holder.
"""
import argparse
import os
import select
import signal
import socket
import sys

from sd_daemon import listen_fds, notify

stopping = False


def on_term(_sig, _frame):
    global stopping
    stopping = True


def bind(spec):
    if spec.startswith("udp://") or spec.startswith("tcp://"):
        host, port = spec[6:].rsplit(":", 1)
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        kind = socket.SOCK_DGRAM if spec.startswith("udp") else socket.SOCK_STREAM
        s = socket.socket(family, kind)
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
    elif spec.startswith("unix-dgram:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(spec[len("unix-dgram:"):])
    elif spec.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(spec[len("unix:"):])
    else:
        sys.exit(f"echo: unknown spec {spec}")
    if s.type == socket.SOCK_STREAM:
        s.listen(128)
    return s


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", action="append", default=[])
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, on_term)
    if args.bind:
        socks = [bind(spec) for spec in args.bind]
    else:
        socks = listen_fds("echo")
    prefix = f"pid={os.getpid()} ".encode()
    notify("READY=1")
    while not stopping:
        try:
            ready, _, _ = select.select(socks, [], [], 0.1)
        except InterruptedError:
            continue
        for s in ready:
            if s.type == socket.SOCK_DGRAM:
                try:
                    data, peer = s.recvfrom(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                s.sendto(prefix + data, peer)
            else:
                # Non-blocking: another holder of the socket may have taken
                # the connection select() announced.
                s.setblocking(False)
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                with conn:
                    conn.setblocking(True)
                    conn.settimeout(5)
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(prefix + data)


if __name__ == "__main__":
    main()
