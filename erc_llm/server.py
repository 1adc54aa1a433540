"""``erc-llm serve``: an HTTP service (FastAPI) for live emotion queries, with a small web page at ``/``.

    erc-llm serve --run runs/meld --host 127.0.0.1 --port 8000

    POST   /dialogues                 {"participants": ["Ross", "Rachel"]}  -> {"id": ...}
    POST   /dialogues/{id}/turns      {"speaker": "Ross", "text": "..."}    -> label + probability of every label
    GET    /dialogues/{id}            the transcript with labels
    GET    /dialogues/{id}/speakers/{speaker_id}                            -> emotions so far, biography
    GET    /dialogues                 this client's open dialogues
    DELETE /dialogues/{id}
    POST   /dialogues/import          {"filename": "talk.txt", "content": "Ann: ..."}  -> a labelled dialogue
    GET    /dialogues/{id}/export?format=jsonl|csv                            -> the labelled dialogue as a file
    GET    /labels, /limits, /health, /docs (OpenAPI)

Binds to loopback by default. Limits (text length, turns per dialogue, open dialogues with idle expiry,
request size) give 4xx JSON errors. One model is shared: the turns of concurrent dialogues are scored
together in batched forwards (``session.Batcher``; ``--max-batch 1`` serialises them), each dialogue with its
own KV cache and lock, so concurrent requests never mix dialogue states and each dialogue's turns keep their order.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio.to_thread
import h11
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from erc_llm.constants import SERVE_MAX_BATCH
from erc_llm.data.schema import DataError
from erc_llm.palette import colours
from erc_llm.session import Engine, ERCSession
from erc_llm.stages import describe
from erc_llm.uploads import parse, to_csv, to_jsonl

STATIC = Path(__file__).parent / "static"
OTHER_WORKERS = 40  # worker threads for requests other than waiting turns (anyio's default pool size)


@dataclass
class Limits:
    """What one service and each of its clients (by address) may use; `erc-llm serve` flags set every one and
    ``GET /limits`` shows them."""

    max_text_chars: int = 2000
    max_speaker_chars: int = 80
    max_turns: int = 500  # per dialogue
    max_dialogues: int = 200  # open at once, all clients together
    max_dialogues_per_client: int = 20  # open at once, per client
    turns_per_minute: int = 120  # per client
    idle_seconds: float = 600.0  # an idle dialogue closes after this long
    max_body_bytes: int = 65_536


class NewDialogue(BaseModel):
    participants: list[str] = Field(default_factory=list, max_length=50,
                                    description="speakers known up front (others may join later)")


class NewTurn(BaseModel):
    speaker: str = Field(min_length=1, description="who speaks")
    text: str = Field(min_length=1, description="what they say")
    audio: list[float] | None = Field(None, max_length=4096, description="the turn's audio feature vector, for a "
                                      "model that hears audio (GET /health names the features); omitted = text only")


class Upload(BaseModel):
    filename: str = Field("upload.txt", max_length=255, description="the file's name (its extension picks the format)")
    content: str = Field(description="the file's text: generic JSONL (first dialogue), a MELD-style CSV (Speaker, "
                         "Utterance), or one 'Speaker: text' turn per line")


@dataclass
class Open:
    """One open dialogue: its session, its lock, who opened it and when it was last used."""

    session: ERCSession
    lock: threading.Lock
    owner: str
    used: float


class Dialogues:
    """Open dialogues with idle expiry and per-client quotas; thread-safe."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.items: dict[str, Open] = {}
        self.turn_times: dict[str, deque] = {}  # client -> monotonic times of its recent turns
        self.lock = threading.Lock()

    def create(self, participants: list[str], owner: str = "") -> str:
        with self.lock:
            now = time.monotonic()
            for k in [k for k, d in self.items.items() if now - d.used > self.limits.idle_seconds]:
                self._close(k)
            if len(self.items) >= self.limits.max_dialogues:
                raise HTTPException(429, f"{len(self.items)} dialogues are open (limit {self.limits.max_dialogues}); "
                                         "delete finished ones or wait for idle ones to expire")
            mine = sum(d.owner == owner for d in self.items.values())
            if mine >= self.limits.max_dialogues_per_client:
                raise HTTPException(429, f"you have {mine} dialogues open (limit {self.limits.max_dialogues_per_client} "
                                         "per client); list them with GET /dialogues and delete finished ones")
            key = secrets.token_hex(8)
            self.items[key] = Open(ERCSession(self.engine, participants, key), threading.Lock(), owner, now)
            return key

    def get(self, key: str) -> Open:
        with self.lock:
            if key not in self.items:
                raise HTTPException(404, f"dialogue {key!r} not found (never created, deleted, or expired after "
                                         f"{self.limits.idle_seconds / 60:.0f} min idle)")
            item = self.items[key]
            item.used = time.monotonic()
            return item

    def owned_by(self, owner: str) -> list[dict]:
        with self.lock:
            now = time.monotonic()
            return [{"id": k, "turns": len(d.session.turns), "idle_seconds": round(now - d.used, 1)}
                    for k, d in self.items.items() if d.owner == owner]

    def count_turn(self, owner: str) -> None:
        """A client's turn, within its rate (``turns_per_minute``); 429 with the seconds to wait otherwise."""
        with self.lock:
            now, times = time.monotonic(), self.turn_times.setdefault(owner, deque())
            while times and now - times[0] > 60:
                times.popleft()
            if len(times) >= self.limits.turns_per_minute:
                wait = 60 - (now - times[0])
                raise HTTPException(429, f"{len(times)} turns in the last minute (limit {self.limits.turns_per_minute} "
                                         f"per client); retry in {wait:.0f} s", headers={"Retry-After": f"{wait:.0f}"})
            times.append(now)

    def delete(self, key: str) -> None:
        self.get(key)
        with self.lock:
            self._close(key)

    def _close(self, key: str) -> None:
        d = self.items.pop(key)
        with d.lock:
            d.session.reset()  # its predicted labels go into the speaker memory


def client_of(request: Request) -> str:
    """Who is asking: the peer address (behind a proxy, configure the proxy to pass the client's own)."""
    return request.client.host if request.client else "unknown"


class BodyLimit:
    """ASGI middleware: the body limit holds on the bytes actually received (a chunked body has no
    Content-Length), so an oversized request is answered 413 before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = JSONResponse({"error": f"request body over {self.limit} bytes"}, status_code=413)
        size = dict(scope.get("headers") or []).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limit):
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # a turn waiting for its batched forward holds a worker thread: with anyio's default pool (40 threads) no
        # forward could take more than 40 turns, however many dialogues are waiting
        if engine.batcher is not None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = engine.batcher.max_batch + OTHER_WORKERS
        yield

    app = FastAPI(title="erc-llm", description="Emotion recognition in conversation: label turns as they arrive.",
                  lifespan=lifespan)
    store = Dialogues(engine, limits)
    app.state.dialogues = store

    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = [{"field": ".".join(str(x) for x in e.get("loc", ())), "problem": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"error": "invalid request", "problems": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)  # ours and the framework's (e.g. undecodable bodies, 404 routes)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # never a traceback to the client
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    def health():
        """Which model answers: name, corpus, stages, calibration, audio features, label set and colours."""
        st = engine.stages
        c = st.classifier if st is not None else None
        spec = c.spec if c is not None and c.spec is not None else (engine.audio.spec if engine.audio else None)
        b = engine.batcher
        return {"status": "ok", "model": engine.name, "dataset": engine.dataset, "context": "online",
                "dtype": engine.dtype, "batching": None if b is None else {
                    "window_ms": b.window * 1000, "max_batch": b.max_batch,
                    "forwards_by_batch_size": {str(k): v for k, v in sorted(b.sizes.items())}},
                "forward_seconds": round(engine.forward_seconds, 3),
                "open_dialogues": len(store.items), "stages": describe(st.settings if st is not None else None),
                "calibrated": st is not None and st.settings.get("temperature", 1.0) != 1.0,
                "audio_features": list(spec.names) if spec is not None else None,
                "limits": asdict(limits), **labels()}

    @app.get("/limits")
    def limits_():
        """The service's limits: text and name lengths, turns per dialogue, open dialogues (all and per client),
        turns per minute per client, idle expiry, request size."""
        return asdict(limits)

    @app.get("/labels")
    def labels():
        return {"labels": list(engine.labels.labels), "colours": colours(engine.labels.labels)}

    def turn_json(session: ERCSession, t) -> dict:
        return {"index": t.index, "speaker": t.speaker, "speaker_id": session.participants.index(t.speaker),
                "text": t.text, "label": t.label, "probabilities": t.probs, "used": t.used}

    @app.post("/dialogues/import", status_code=201)
    def import_file(body: Upload, request: Request):
        """Label a whole conversation from a file: a new dialogue, its participants known up front."""
        try:
            turns = parse(body.filename, body.content, limits.max_turns)
        except DataError as e:
            raise HTTPException(422, str(e)) from None
        bad = [f"{body.filename}, turn {i + 1}: {what} over the limit of {n} characters"
               for i, (s, t) in enumerate(turns)
               for what, x, n in (("speaker", s, limits.max_speaker_chars), ("text", t, limits.max_text_chars))
               if len(x) > n]
        if bad:
            raise HTTPException(422, "\n".join(bad[:10]))
        who = client_of(request)
        key = store.create(list(dict.fromkeys(s for s, _ in turns)), who)
        d = store.get(key)
        with d.lock:
            for speaker, text in turns:
                store.count_turn(who)
                d.session.add_turn(speaker, text)
        return transcript(key)

    @app.get("/dialogues/{key}/export")
    def export_file(key: str, format: str = "jsonl"):
        if format not in ("jsonl", "csv"):
            raise HTTPException(422, f"format {format!r} not supported; available = ['jsonl', 'csv']")
        d = store.get(key)
        with d.lock:
            text = (to_jsonl(key, d.session.turns) if format == "jsonl"
                    else to_csv(key, d.session.turns, engine.labels.labels))
        return PlainTextResponse(text, media_type="application/x-ndjson" if format == "jsonl" else "text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="dialogue-{key}.{format}"'})

    @app.get("/dialogues")
    def mine(request: Request):
        """The dialogues this client has open (turns, seconds idle), to resume or delete."""
        return {"dialogues": store.owned_by(client_of(request))}

    @app.post("/dialogues", status_code=201)
    def create(request: Request, body: NewDialogue | None = None):
        names = [p.strip() for p in (body.participants if body else []) if p.strip()]
        if any(len(p) > limits.max_speaker_chars for p in names):
            raise HTTPException(422, f"participant names are limited to {limits.max_speaker_chars} characters")
        return {"id": store.create(names, client_of(request))}

    @app.post("/dialogues/{key}/turns")
    def add_turn(key: str, body: NewTurn, request: Request):
        if len(body.text) > limits.max_text_chars:
            raise HTTPException(413, f"text has {len(body.text)} characters; the limit is {limits.max_text_chars}")
        if len(body.speaker) > limits.max_speaker_chars:
            raise HTTPException(422, f"speaker names are limited to {limits.max_speaker_chars} characters")
        d = store.get(key)
        with d.lock:
            if len(d.session.turns) >= limits.max_turns:
                raise HTTPException(409, f"dialogue {key} has reached {limits.max_turns} turns; start a new one")
            store.count_turn(client_of(request))
            try:
                r = d.session.add_turn(body.speaker, body.text, body.audio)
            except ValueError as e:
                raise HTTPException(422, str(e)) from None
            return turn_json(d.session, r)

    @app.get("/dialogues/{key}")
    def transcript(key: str):
        d = store.get(key)
        with d.lock:
            # a participant's speaker id is its position in this list (every turn also carries it)
            return {"id": key, "participants": list(d.session.participants),
                    "turns": [turn_json(d.session, t) for t in d.session.turns]}

    @app.get("/dialogues/{key}/speakers/{speaker_id}")
    def speaker(key: str, speaker_id: int):
        """A participant by the id the transcript and every turn give (any name works, '/' included)."""
        d = store.get(key)
        with d.lock:
            if not 0 <= speaker_id < len(d.session.participants):
                raise HTTPException(404, f"speaker id {speaker_id} not in dialogue {key}; its participants are "
                                         f"{[{'id': i, 'name': n} for i, n in enumerate(d.session.participants)]}")
            return {"id": speaker_id, **d.session.speaker_summary(d.session.participants[speaker_id])}

    @app.delete("/dialogues/{key}", status_code=204)
    def delete(key: str):
        store.delete(key)

    return app


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info"):
    """uvicorn's settings for the service: HTTP/1.1 through :func:`json_errors_protocol`, so a request malformed
    at the HTTP level (an invalid Content-Length, a broken header) gets a JSON 400 like every other error."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=json_errors_protocol())


def json_errors_protocol():
    """uvicorn's h11 protocol whose answer to a malformed request is ``{"error": ...}`` (JSON), not plain text."""
    class JsonErrors(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": f"malformed HTTP request ({msg}); check the Content-Length and headers"})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body.encode()), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrors


def serve(run: str | None, host: str, port: int, model: str = "", threads: int = 0, dtype: str = "auto",
          zero_shot: bool = False, stages: bool = True, limits: Limits | None = None, batch_window_ms: float = 2.0,
          max_batch: int = SERVE_MAX_BATCH) -> None:
    """``max_batch`` 1 scores one turn per forward (serialised); more lets concurrent dialogues share forwards."""
    engine = Engine.load(run or None, model=model, threads=threads, dtype=dtype, zero_shot=zero_shot, stages=stages)
    if max_batch > 1:
        engine.start_batching(batch_window_ms, max_batch)
    uvicorn.Server(uvicorn_config(create_app(engine, limits), host, port)).run()
