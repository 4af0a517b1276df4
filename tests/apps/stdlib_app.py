"""A small HTTP app for supervisor's tests, standard library only (no pip).

Listens on a Unix socket (--uds PATH) or a loopback port (--port N), HTTP/1.1 with keep-alive,
one thread per connection. Routes:

  GET  /                 "app WORKER PID"
  GET  /headers          the request headers as JSON
  POST /echo             streams the body back (Content-Length in, Content-Length out)
  POST /consume          reads the whole body (Content-Length or chunked), then answers
  GET  /download?mb=N    N MiB of bytes, streamed
  GET  /sleep?ms=N       waits, then answers
  GET  /stats            {"max_concurrent_sleeps": N, "sleeps": M, "connections": C}: most
                         /sleep requests in progress at once, how many the app started, and
                         how many connections it accepted
  GET  /truncated        promises 100 bytes, sends 10, closes the connection
  GET  /both-lengths     Content-Length: 50 and Transfer-Encoding: chunked, body "ok" (chunked)
  GET  /exit             the process exits at once (status 3), no answer
  GET  /leak?mb=N        keeps N MiB more, touched, for the rest of its life
  GET  /ws               WebSocket: echoes every text or binary message
  GET  /boom             500, then 20 ms later closes the connection without having said so (no
                         Connection: close), as uvicorn does after an exception once the response
                         has gone out
  POST /count            reads the body, answers how many POST /count requests it has seen
                         (?close=1: closes the connection instead of answering)
  GET  /count            that number, without counting
  GET  /cwd              its working directory
  GET  /say              prints one JSON log line to stdout ({"level": "warning", "msg": "from
                         the app", "n": 7}) and one plain line, then answers "said"
  GET  /drip?n=N&ms=M    N one-byte chunks (chunked), one every M ms
  GET  /block?file=PATH&ms=N
                         holds the whole process (as sync code in an async route does): every
                         other request to it waits until PATH exists (at most N ms, default
                         10000); prints a line when it begins; answers "released PID" or
                         "timed out PID"

Options: --ignore-term (SIGTERM is ignored), --fail-start (prints a line and exits 3),
--ready-delay-ms N (waits before listening), --die-after-ms N (exits N ms after listening,
every time it is started: a crash loop), --single-thread (one connection at a time, as a
sync server with one thread: others wait in the listen backlog; backlog of 8).
"""

import argparse
import base64
import hashlib
import json
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

LEAKED = []
BUSY = {"now": 0, "max": 0, "total": 0}
BUSY_LOCK = threading.Lock()
POSTS = {"count": 0}
CONNECTIONS = {"count": 0}
WORKER = os.environ.get("SUPERVISOR_WORKER_ID", "?")
# Held by /block: every request waits for it first, so a /block holds up the whole process.
GATE = threading.Lock()
CHUNK = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        with BUSY_LOCK:
            CONNECTIONS["count"] += 1
        super().setup()

    def address_string(self):
        return "unix"

    def log_message(self, fmt, *args):
        pass

    def query(self, name, default=0):
        q = parse_qs(urlsplit(self.path).query)
        return int(q.get(name, [default])[0])

    def reply(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/block":
            self.block()
            return
        with GATE:
            pass
        if path == "/":
            self.reply(200, f"app {WORKER} {os.getpid()}".encode())
        elif path == "/headers":
            self.reply(200, json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(),
                       "application/json")
        elif path == "/download":
            total = self.query("mb") * 1024 * 1024
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(total))
            self.end_headers()
            block = b"x" * CHUNK
            sent = 0
            while sent < total:
                n = min(CHUNK, total - sent)
                self.wfile.write(block[:n])
                sent += n
        elif path == "/sleep":
            with BUSY_LOCK:
                BUSY["now"] += 1
                BUSY["total"] += 1
                BUSY["max"] = max(BUSY["max"], BUSY["now"])
            time.sleep(self.query("ms") / 1000)
            with BUSY_LOCK:
                BUSY["now"] -= 1
            self.reply(200, b"slept")
        elif path == "/truncated":
            # Promises 100 bytes, sends 10, and closes the connection.
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
        elif path == "/both-lengths":
            self.send_response(200)
            self.send_header("Content-Length", "50")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"2\r\nok\r\n0\r\n\r\n")
        elif path == "/stats":
            self.reply(200, json.dumps({"max_concurrent_sleeps": BUSY["max"],
                                        "sleeps": BUSY["total"],
                                        "connections": CONNECTIONS["count"]}).encode(),
                       "application/json")
        elif path == "/exit":
            print("exiting on request", flush=True)
            os._exit(3)
        elif path == "/leak":
            block = bytearray(self.query("mb") * 1024 * 1024)
            for i in range(0, len(block), 4096):
                block[i] = 1
            LEAKED.append(block)
            self.reply(200, f"holding {sum(len(b) for b in LEAKED) // (1024 * 1024)} MiB".encode())
        elif path == "/ws":
            self.websocket()
        elif path == "/boom":
            self.reply(500, b"boom")
            self.wfile.flush()
            # Closes a moment later, as uvicorn does once it has logged the exception: a
            # request sent on the connection meanwhile is never read.
            time.sleep(0.02)
            self.close_connection = True
        elif path == "/cwd":
            self.reply(200, os.getcwd().encode())
        elif path == "/say":
            print(json.dumps({"level": "warning", "msg": "from the app", "n": 7}), flush=True)
            print("said it", flush=True)
            self.reply(200, b"said")
        elif path == "/count":
            self.reply(200, str(POSTS["count"]).encode())
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(self.query("n")):
                    self.wfile.write(b"1\r\nx\r\n")
                    self.wfile.flush()
                    time.sleep(self.query("ms") / 1000)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                self.close_connection = True
        else:
            self.reply(404, b"not found")

    def do_POST(self):
        with GATE:
            pass
        if urlsplit(self.path).path == "/consume":
            self.consume()
            return
        if urlsplit(self.path).path == "/count":
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with BUSY_LOCK:
                POSTS["count"] += 1
            if self.query("close"):
                self.close_connection = True
                return
            self.reply(200, str(POSTS["count"]).encode())
            return
        if urlsplit(self.path).path != "/echo":
            self.reply(404, b"not found")
            return
        length = int(self.headers.get("Content-Length", "0"))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        left = length
        while left:
            data = self.rfile.read(min(CHUNK, left))
            if not data:
                return
            self.wfile.write(data)
            left -= len(data)

    def block(self):
        path = parse_qs(urlsplit(self.path).query).get("file", [""])[0]
        deadline = time.monotonic() + self.query("ms", 10000) / 1000
        with GATE:
            print(f"block: pid {os.getpid()} holds the process until {path} exists", flush=True)
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            released = os.path.exists(path)
        self.reply(200, f"{'released' if released else 'timed out'} {os.getpid()}".encode())

    def consume(self):
        # Reads the whole body (Content-Length or chunked), then says how much it got.
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += len(self.rfile.read(size))
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(CHUNK, left))
                if not data:
                    break
                total += len(data)
                left -= len(data)
        self.reply(200, f"read {total} bytes".encode())

    def websocket(self):
        self.close_connection = True  # after the WebSocket, the connection is done
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            frame = bytes([0x80 | opcode])
            if len(data) < 126:
                frame += bytes([len(data)])
            else:
                frame += bytes([126]) + struct.pack("!H", len(data))
            self.wfile.write(frame + data)
            self.wfile.flush()


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class SingleUnixServer(socketserver.UnixStreamServer):
    request_queue_size = 8


class SingleTcpServer(socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--uds")
    ap.add_argument("--port", type=int)
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--fail-start", action="store_true")
    ap.add_argument("--ready-delay-ms", type=int, default=0)
    ap.add_argument("--die-after-ms", type=int, default=0)
    ap.add_argument("--single-thread", action="store_true")
    args = ap.parse_args()
    if args.fail_start:
        print("stdlib_app: cannot start: configuration missing (on purpose)", file=sys.stderr,
              flush=True)
        sys.exit(3)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    time.sleep(args.ready_delay_ms / 1000)
    if args.uds:
        server = (SingleUnixServer if args.single_thread else UnixServer)(args.uds, Handler)
        where = f"unix:{args.uds}"
    else:
        # --port 0: the kernel picks a free port, and the line below says which.
        server = (SingleTcpServer if args.single_thread else TcpServer)(("127.0.0.1", args.port),
                                                                        Handler)
        where = f"127.0.0.1:{server.server_address[1]}"
    print(f"stdlib_app worker {WORKER} pid {os.getpid()} listening on {where}", flush=True)
    if args.die_after_ms:
        def die():
            time.sleep(args.die_after_ms / 1000)
            print("dying on purpose (--die-after-ms)", flush=True)
            os._exit(4)
        threading.Thread(target=die, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
