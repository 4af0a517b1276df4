"""A FastAPI app shaped like the one in the write-up that started supervisor: it keeps
per-session state in memory and calls a slow upstream API with its own timeout.

Run it under supervisor (see README.md here): every worker runs one uvicorn process on a private
Unix socket, and supervisor provides the worker count, the global cap on requests in flight
(503 past it), request timeouts, memory-based recycling and graceful reloads that gunicorn and
hand-written middleware used to provide.
"""

import os
import time
import uuid

import httpx
from fastapi import FastAPI, HTTPException, Request

# The app's own settings keep working: supervisor passes the environment through.
UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "")
UPSTREAM_TIMEOUT = float(os.environ.get("UPSTREAM_TIMEOUT", "30"))
WORKER = os.environ.get("SUPERVISOR_WORKER_ID", "?")

app = FastAPI()

# Per-session state, as the original app had (its unbounded growth was the memory leak; here
# supervisor's worker.max_rss is the backstop that recycles a worker before the host suffers).
sessions: dict[str, dict] = {}


@app.get("/")
async def root():
    return {"status": "ok", "worker": WORKER, "pid": os.getpid(), "sessions": len(sessions)}


@app.post("/sessions")
async def new_session():
    sid = uuid.uuid4().hex
    sessions[sid] = {"created": time.time(), "messages": []}
    return {"session": sid}


@app.post("/sessions/{sid}/messages")
async def add_message(sid: str, request: Request):
    session = sessions.get(sid)
    if session is None:
        raise HTTPException(status_code=404, detail="no such session")
    body = await request.json()
    session["messages"].append(body.get("text", ""))
    reply = await ask_upstream(session["messages"])
    return {"session": sid, "count": len(session["messages"]), "reply": reply}


async def ask_upstream(messages: list[str]) -> str:
    """The slow external call, bounded by the app's own timeout (UPSTREAM_TIMEOUT)."""
    if not UPSTREAM_URL:
        return f"echo: {messages[-1]}"
    async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT) as client:
        try:
            r = await client.post(UPSTREAM_URL, json={"messages": messages})
            r.raise_for_status()
            return r.text
        except httpx.TimeoutException:
            raise HTTPException(status_code=504, detail="upstream timed out")
        except httpx.HTTPError as e:
            raise HTTPException(status_code=502, detail=f"upstream failed: {e}")


@app.get("/healthz")
async def healthz():
    return {"ok": True}
