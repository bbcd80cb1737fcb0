#!/usr/bin/python3
"""A minimal LISTEN_FDS HTTP daemon: serves on the socket at fd 3, says
READY=1 to $NOTIFY_SOCKET, and on SIGTERM finishes the request in hand and
exits. An example for `sockbroker run` (README: "Install").
"""
import os, signal, socket, threading
from http.server import BaseHTTPRequestHandler, HTTPServer

class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from pid {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(HTTPServer):
    def server_bind(self):  # the socket is bound already: it is the broker's
        pass

assert int(os.environ.get("LISTEN_FDS", "0")) >= 1, "no LISTEN_FDS: run me with sockbroker run or exec"
sock = socket.socket(fileno=3)
server = Server(sock.getsockname(), Hello, bind_and_activate=False)
server.socket = sock
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
if os.environ.get("NOTIFY_SOCKET"):
    path = os.environ["NOTIFY_SOCKET"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
        n.connect("\0" + path[1:] if path.startswith("@") else path)
        n.send(b"READY=1")
server.serve_forever()
