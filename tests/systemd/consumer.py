#!/usr/bin/python3
"""A daemon that gets its listening sockets from sockbroker over multibinder's
wire protocol (one JSON-RPC request, one reply with the descriptor) and
answers each connection with "ok <pid>". READY=1 goes to systemd once every
socket is held, so `systemctl start` returns when it accepts."""
import json
import os
import selectors
import signal
import socket
import sys

CONTROL = os.environ.get("MULTIBINDER_SOCK", "/run/sockbroker/control.sock")


def bind(params):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(CONTROL)
        s.sendall(json.dumps({"jsonrpc": "2.0", "method": "bind", "params": [params], "id": 1}).encode())
        msg, fds, _flags, _addr = socket.recv_fds(s, 65536, 1)
    reply = json.loads(msg)
    if reply.get("result") is not True or len(fds) != 1:
        sys.exit(f"bind {params}: {reply}")
    return socket.socket(fileno=fds[0])


listeners = [bind({"address": "127.0.0.1", "port": 8080}), bind({"name": "http"})]
sel = selectors.DefaultSelector()
for listener in listeners:
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)

notify = os.environ.get("NOTIFY_SOCKET")
if notify:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
        n.sendto(b"READY=1", "\0" + notify[1:] if notify.startswith("@") else notify)

# SIGTERM ends the loop between connections, never in the middle of one:
# what is still queued is left to the next generation.
stopping = False


def stop(_signum, _frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, stop)
reply = f"ok {os.getpid()}\n".encode()
while not stopping:
    for key, _ in sel.select(timeout=0.1):
        try:
            conn, _ = key.fileobj.accept()
        except BlockingIOError:
            continue
        with conn:
            conn.setblocking(True)
            conn.sendall(reply)
