"""A plain ASGI app for supervisor's tests under uvicorn (no framework):
`uvicorn --app-dir tests/apps asgi_app:app --uds {socket}`.

Routes:

  GET /       "ok"
  GET /whoami the client address and scheme uvicorn gives the app ("203.0.113.9 https")
  GET /boom   sends a complete 500 response, then raises: uvicorn logs the exception and closes
              the connection, with no `Connection: close` in the response (what a FastAPI route
              that raises does behind Starlette's error middleware)
"""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/whoami":
        client = scope.get("client")
        body = f"{client[0] if client else None} {scope['scheme']}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    if scope["path"] == "/boom":
        body = b"Internal Server Error"
        await send({"type": "http.response.start", "status": 500,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        raise RuntimeError("boom (on purpose)")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
