#!/usr/bin/python3
"""Makes the broker hold N TCP listeners on 127.20.X.Y:PORT with bind_many
(batches of 1000), as root over /run/sockbroker/control.sock, closing the
descriptors it sends back: the broker and systemd's fd store keep theirs.
Prints "held N". Used by tests/systemd_boot.rs (the fd store at 10,000)."""

import json
import socket
import sys

CONTROL = "/run/sockbroker/control.sock"
BATCH = 1000


def call(sock, method, params, ident):
    sock.sendall(json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": ident}).encode() + b"\n")
    buf = b""
    while True:
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 253)
        for fd in fds:
            socket.close(fd)
        if not data:
            raise SystemExit(f"{method}: the broker closed the connection")
        buf += data
        if buf.endswith(b"\n"):
            try:
                return json.loads(buf)
            except ValueError:
                continue


def main():
    n, port = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(CONTROL)
    held = 0
    for start in range(0, n, BATCH):
        items = [
            {"spec": f"tcp://127.20.{i // 250}.{i % 250 + 1}:{port}"} for i in range(start, min(n, start + BATCH))
        ]
        reply = call(sock, "bind_many", items, start)
        if "error" in reply:
            raise SystemExit(f"bind_many: {reply['error']}")
        failed = [r for r in reply["result"] if "ok" not in r]
        if failed:
            raise SystemExit(f"bind_many: {len(failed)} failed, first: {failed[0]}")
        held += len(items)
    print(f"held {held}")


main()
