"""The ASGI app the Python peers (granian, gunicorn+UvicornWorker) serve in bench/.

Plain ASGI, no framework, so the numbers measure the server and not a framework. It mirrors
supervisor's built-in app: `GET /` answers the same 13-byte body, `GET /work?ms=N` busy-loops for N ms
of CPU time (as the built-in app does), `GET /sleep?ms=N` waits N ms without blocking the event
loop (asyncio.sleep, as the built-in app's tokio sleep), `GET /healthz` answers 200.
`GET /block?ms=N` calls `time.sleep` for N ms inside the async handler: the common FastAPI mistake
(sync I/O in an `async def` route) that blocks the process's event loop, so every other request
to that process waits until it is done.
"""

import asyncio
import time
from urllib.parse import parse_qs

HELLO = b"Hello, World!"
HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


def _busy(ms: float) -> None:
    # The same CPU-bound loop as the built-in app: spin until this thread has used `ms` of CPU
    # time (a fixed amount of work, whatever else shares the CPU), never sleep.
    end = time.thread_time() + ms / 1000.0
    x = 0
    while time.thread_time() < end:
        x += 1


def _ms(scope, most: float) -> float:
    # `?ms=N` of the query, clamped to 0..=most (0 when absent or not a number).
    query = parse_qs(scope.get("query_string", b"").decode())
    try:
        ms = float(query.get("ms", ["0"])[0])
    except ValueError:
        ms = 0.0
    return min(max(ms, 0.0), most)


async def _send(send, status: int, body: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": HEADERS + [(b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/":
        await _send(send, 200, HELLO)
    elif path == "/work":
        _busy(_ms(scope, 10_000.0))
        await _send(send, 200, b"worked\n")
    elif path == "/block":
        time.sleep(_ms(scope, 10_000.0) / 1000.0)  # on purpose: blocks the event loop
        await _send(send, 200, b"blocked\n")
    elif path == "/healthz":
        await _send(send, 200, b"ok\n")
    elif path == "/sleep":
        await asyncio.sleep(_ms(scope, 600_000.0) / 1000.0)
        await _send(send, 200, b"slept\n")
    else:
        await _send(send, 404, b"not found\n")
