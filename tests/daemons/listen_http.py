#!/usr/bin/env python3
"""A tiny HTTP/1.0 server that takes its listening sockets by LISTEN_FDS.

The test daemon for `sockbroker exec` and `sockbroker run`:
- refuses to start unless LISTEN_PID is its own pid and LISTEN_FDS >= 1
  (exactly what sd_listen_fds() checks);
- answers every request with "pid=<pid> gen=<SOCKBROKER_GENERATION>";
- sends READY=1 to $NOTIFY_SOCKET (path or @abstract) once it accepts, and
  writes --pidfile PATH (atomically) if asked;
- on SIGTERM stops accepting, finishes the connection in hand, and exits 0:
  connections still queued in the shared kernel socket are the next
  generation's;
- --exit-on-gen N / --hang-on-gen N make generation N exit at once (status 3)
  or never become ready, --die-after-ready-on-gen N makes it exit (status 4)
  0.5 s after READY=1, to test failed reloads;
- --conn-timeout S: how long a connection may stay silent (default 10 s); a
  long one keeps a retiring generation alive, as a websocket would.

It keeps no descriptor open besides stdio, the sockets, and the connection
being served (select(), not epoll), so tests can check /proc/PID/fd.
"""
import argparse
import os
import select
import signal
import socket
import sys
import time

from sd_daemon import listen_fds, notify


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pidfile")
    parser.add_argument("--exit-on-gen", type=int, action="append", default=[])
    parser.add_argument("--hang-on-gen", type=int, action="append", default=[])
    parser.add_argument("--die-after-ready-on-gen", type=int, action="append", default=[])
    parser.add_argument("--conn-timeout", type=float, default=10.0)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--term-status", type=int, default=0, help="exit status after SIGTERM")
    args = parser.parse_args()

    gen = int(os.environ.get("SOCKBROKER_GENERATION", "0"))
    if gen in args.exit_on_gen:
        sys.exit(3)
    socks = listen_fds("listen_http", at_least=1)
    if gen in args.hang_on_gen:
        while True:
            time.sleep(60)

    stop = False

    def on_term(_sig, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    # Sockets are shared with other generations: accept() must not block,
    # since another generation may win the connection select() announced.
    for s in socks:
        s.setblocking(False)
    time.sleep(args.startup_delay)
    body = f"pid={os.getpid()} gen={gen}\n".encode()
    response = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)

    if args.pidfile:
        tmp = f"{args.pidfile}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(tmp, args.pidfile)
    notify(f"READY=1\nSTATUS=serving generation {gen}")
    if gen in args.die_after_ready_on_gen:
        time.sleep(0.5)
        sys.exit(4)

    while not stop:
        try:
            readable, _, _ = select.select(socks, [], [], 0.2)
        except InterruptedError:
            continue
        for s in readable:
            try:
                conn, _ = s.accept()
            except (BlockingIOError, InterruptedError):
                continue
            with conn:
                conn.setblocking(True)
                conn.settimeout(args.conn_timeout)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(response)
                except OSError as e:
                    print(f"listen_http: connection error: {e}", file=sys.stderr)
    sys.exit(args.term_status)


if __name__ == "__main__":
    main()
