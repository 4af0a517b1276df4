"""A FastAPI app shaped like the one in the write-up that started supervisor: it keeps
per-session state and calls a slow upstream API with its own timeout.

Run it under supervisor (see the README's "Examples"): every worker runs one uvicorn process on a
private Unix socket, and supervisor provides the worker count, the global cap on requests in
flight (503 past it), request timeouts, memory-based recycling and graceful reloads that gunicorn
and hand-written middleware used to provide.
"""

import os
import sqlite3
import time
import uuid

import httpx
from fastapi import FastAPI, HTTPException, Request

# The app's own settings keep working: supervisor passes the environment through.
UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "")
UPSTREAM_TIMEOUT = float(os.environ.get("UPSTREAM_TIMEOUT", "30"))
SESSIONS_DB = os.environ.get("SESSIONS_DB", "sessions.db")
WORKER = os.environ.get("SUPERVISOR_WORKER_ID", "?")

app = FastAPI()

# Per-session state. The original app kept it in a dict in process memory (whose unbounded
# growth was its memory leak; worker.max_rss is the backstop for leaks like that). Under several
# app processes that cannot work: each would see only the sessions it created, and lose them
# when it is recycled. So the sessions live in one SQLite file that every app process shares
# (SESSIONS_DB, by default sessions.db in the working directory).
db = sqlite3.connect(SESSIONS_DB, isolation_level=None, timeout=10)  # autocommit
db.execute("PRAGMA journal_mode=WAL")  # readers do not wait for writers in other processes
db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, created REAL)")
db.execute("CREATE TABLE IF NOT EXISTS messages (session TEXT, text TEXT)")


@app.get("/")
async def root():
    (count,) = db.execute("SELECT count(*) FROM sessions").fetchone()
    return {"status": "ok", "worker": WORKER, "pid": os.getpid(), "sessions": count}


@app.post("/sessions")
async def new_session():
    sid = uuid.uuid4().hex
    db.execute("INSERT INTO sessions VALUES (?, ?)", (sid, time.time()))
    return {"session": sid}


@app.post("/sessions/{sid}/messages")
async def add_message(sid: str, request: Request):
    if db.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone() is None:
        raise HTTPException(status_code=404, detail="no such session")
    body = await request.json()
    db.execute("INSERT INTO messages VALUES (?, ?)", (sid, body.get("text", "")))
    rows = db.execute("SELECT text FROM messages WHERE session = ? ORDER BY rowid", (sid,))
    messages = [text for (text,) in rows]
    reply = await ask_upstream(messages)
    return {"session": sid, "count": len(messages), "reply": reply}


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
