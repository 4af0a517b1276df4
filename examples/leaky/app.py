"""An app that leaks memory on purpose: every request keeps 4 MiB more, forever. Standard
library only. Under supervisor, worker.max_rss bounds it: once a worker and its app hold more
than the limit for a few samples, a fresh worker (with a fresh app) takes over and the bloated
one drains and exits, without failing a request.
"""

import argparse
import os
import socketserver
from http.server import BaseHTTPRequestHandler

kept = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def address_string(self):
        return "unix"

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        block = bytearray(4 * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1  # touch every page, so that it is really resident
        kept.append(block)
        body = f"pid {os.getpid()} now holds {4 * len(kept)} MiB\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--uds", required=True)
    Server(ap.parse_args().uds, Handler).serve_forever()
