"""The two sd-daemon calls the test daemons make, as systemd's C library
does them: sd_notify() to $NOTIFY_SOCKET (a path or @abstract) and
sd_listen_fds() (LISTEN_PID must be our pid; descriptors from 3 on).

Imported by echo.py and listen_http.py from their own folder (Python puts
a script's folder first on sys.path), in the tests and in the nspawn suite,
which mounts the whole folder.
"""
import os
import socket
import sys


def notify(message):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), path)


def listen_fds(prog, at_least=0):
    """The sockets passed by LISTEN_FDS; exits naming `prog` unless they
    are for this process and there are `at_least` of them."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit(f"{prog}: LISTEN_PID={os.environ.get('LISTEN_PID')!r} is not my pid {os.getpid()}")
    n = int(os.environ.get("LISTEN_FDS", "0"))
    if n < at_least:
        sys.exit(f"{prog}: no LISTEN_FDS")
    return [socket.socket(fileno=3 + i) for i in range(n)]
