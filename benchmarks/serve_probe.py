"""Reproduce issue-17 items against a code tree (PYTHONPATH decides which): prints one line per item.

    PYTHONPATH=/path/to/tree python benchmarks/serve_probe.py   (results: benchmarks/README.md)
"""
import asyncio
import json

import numpy as np
from fastapi.testclient import TestClient

from avatarforcing.api import Avatar
from avatarforcing.serve.app import create_app
from avatarforcing.serve.client import start_message
from avatarforcing.serve.spec import Limits

av = Avatar.load("mini")
def speech(s):
    t = np.arange(int(16000 * s)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)

# 1. slow consumer: does the stream finish (slot freed) when sends block?
app = create_app(av, Limits(max_sessions=1, send_timeout_s=0.5))
async def one():
    scope = {"type": "websocket", "path": "/ws", "headers": [(b"host", b"t")], "query_string": b"",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "ws", "subprotocols": [],
             "asgi": {"version": "3.0"}}
    q = asyncio.Queue()
    for m in [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": start_message(identity="demo")},
              {"type": "websocket.receive", "bytes": speech(2).tobytes()}]:
        q.put_nowait(m)
    n = [0]
    async def send(msg):
        n[0] += 1
        if msg["type"] == "websocket.send" and n[0] > 5:
            await asyncio.Event().wait()
    try:
        await asyncio.wait_for(app(scope, q.get, send), 6)
        return "slot freed"
    except TimeoutError:
        return "HUNG: slot held"
print("1 slow consumer:", asyncio.run(one()))

with TestClient(create_app(av, Limits(max_sessions=1))) as c:
    # 4. a connection without start
    with c.websocket_connect("/ws") as idle:
        with c.websocket_connect("/ws") as ws:
            ws.send_text(start_message(identity="demo"))
            print("4 no-start holds slot:", json.loads(ws.receive_text())["type"] != "ready")
with TestClient(create_app(av)) as c:
    # 6/7 client mistakes
    for name, first in [("identity []", json.dumps({"type": "start", "identity": []})),
                        ("seed 2^64", json.dumps({"type": "start", "identity": "demo", "seed": 2**64})),
                        ("deep json", "[" * 100000 + "]" * 100000),
                        ("900KB identity", json.dumps({"type": "start", "identity": "x" * 900000}))]:
        with c.websocket_connect("/ws") as ws:
            ws.send_text(first)
            try:
                m = json.loads(ws.receive_text())
                print(f"6/7 {name}: code={m.get('code')} message_len={len(m.get('message', ''))}")
            except Exception as e:
                print(f"6/7 {name}: {type(e).__name__}")
    # 9
    print("9 /docs:", c.get("/docs").status_code, "/openapi.json:", c.get("/openapi.json").status_code,
          "HEAD /:", c.head("/").status_code)
    # 10
    with c.websocket_connect("/ws") as ws:
        ws.send_text(start_message(identity="demo"))
        ws.receive_text()
        pcm = speech(0.5)
        for i in range(0, len(pcm), 100):
            ws.send_bytes(pcm[i:i + 100].tobytes())
        ws.send_text(json.dumps({"type": "end"}))
        while True:
            m = ws.receive()
            if m.get("text") and json.loads(m["text"])["type"] == "done":
                break
    text = c.get("/metrics").text
    cnt = [l for l in text.splitlines() if l.startswith("avatarforcing_step_latency_seconds_count")][0]
    types = [l.split()[2] for l in text.splitlines() if l.startswith("# TYPE")]
    helps = {l.split()[2] for l in text.splitlines() if l.startswith("# HELP")}
    print("10", cnt, "metrics without HELP:", [t for t in types if t not in helps])
