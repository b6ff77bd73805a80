"""An OpenAI-compatible HTTP server over one `Engine` (`qserve ARTIFACT`).

FastAPI + uvicorn: the stack vLLM, SGLang and TensorRT-LLM's `trtllm-serve` use, so clients,
load generators and evaluation harnesses that speak the OpenAI API work unchanged; request
validation comes from pydantic, streaming from Starlette's `StreamingResponse` (server-sent
events).

One engine, stepped in a process of its own (`engine_process.EngineProcess`, qserve's default:
the engine and the HTTP side do not share a GIL) or on a thread of this one (`EngineLoop`):
HTTP handlers run on the asyncio loop and only queue submissions and aborts; the engine admits
them between steps, steps while any request is live (continuous batching across every
connection) and hands each request's tokens to its handler through an asyncio queue. A client
that disconnects, or a stop string that matches, aborts its request at the next step boundary,
which frees its KV pages.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the model's chat template),
both streamed (`"stream": true`) or not; `GET /v1/models`; `GET /health`; `GET /metrics`
(Prometheus text: requests, tokens, queue length, KV pages in use, preemptions, step time). Bad requests
get OpenAI-style JSON errors (`{"error": {"message", "type", "param", "code"}}`) with 400,
404 (unknown model), 413 (body too large), 429 (queue full) or 503 (engine stopped).
"""

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from .cli import add_compile_args, add_invariance_arg, compile_arg
from .detokenize import IncrementalDecoder
from .engine import ContextLengthError
from .sampler import SamplingParams

MAX_BODY_BYTES = 4 << 20  # a request body past this is refused (413)


class APIError(Exception):
    """An error a client should see: HTTP status, OpenAI error type, message, param."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (status, message, param,
                                                                      type_, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Metrics:
    """Counters for /metrics (Prometheus text exposition)."""
    requests: int = 0
    finished: dict = field(default_factory=dict)   # finish reason -> count
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    preemptions: int = 0    # of finished requests (out of KV pages: recomputed, not dropped)

    def text(self, counts: tuple[int, int, int, int], queued: int) -> str:
        """counts: requests running and waiting in the engine, KV pages free and in all."""
        running, waiting, free, total = counts
        used = total - free
        lines = [
            "# TYPE qcompile_requests_total counter",
            f"qcompile_requests_total {self.requests}",
            "# TYPE qcompile_requests_finished_total counter",
            *(f'qcompile_requests_finished_total{{reason="{r}"}} {n}'
              for r, n in sorted(self.finished.items())),
            "# TYPE qcompile_prompt_tokens_total counter",
            f"qcompile_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE qcompile_generation_tokens_total counter",
            f"qcompile_generation_tokens_total {self.generated_tokens}",
            "# TYPE qcompile_requests_running gauge",
            f"qcompile_requests_running {running}",
            "# TYPE qcompile_requests_waiting gauge",
            f"qcompile_requests_waiting {waiting + queued}",
            "# TYPE qcompile_kv_pages_used gauge",
            f"qcompile_kv_pages_used {used}",
            "# TYPE qcompile_kv_pages_total gauge",
            f"qcompile_kv_pages_total {total}",
            "# TYPE qcompile_preemptions_total counter",
            f"qcompile_preemptions_total {self.preemptions}",
            "# TYPE qcompile_step_seconds summary",
            f"qcompile_step_seconds_count {self.steps}",
            f"qcompile_step_seconds_sum {self.step_seconds:.6f}",
        ]
        return "\n".join(lines) + "\n"


class _Live:
    """A request in flight: where its tokens go."""

    def __init__(self, req, loop: asyncio.AbstractEventLoop, out: asyncio.Queue):
        self.req, self.loop, self.out, self.sent = req, loop, out, 0

    def post(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _deliver(items: list) -> None:
    """On the event loop: each (queue, item) of one engine step."""
    for out, item in items:
        out.put_nowait(item)


def engine_counts(engine) -> tuple[int, int, int, int]:
    """Requests running and waiting in `engine`, its KV pages free and in all (Metrics.text)."""
    s, c = engine.scheduler, engine.cache
    return len(s.running), len(s.waiting), c.free_blocks, c.num_blocks


class LoopBase:
    """What the app needs of the engine's loop, in this process (`EngineLoop`) or another
    (`engine_process.EngineProcess`): submissions and aborts in, each request's tokens out to
    its asyncio queue once a step, the metrics. `max_queued` bounds the requests waiting for
    admission (429 past it)."""

    def __init__(self, max_queued: int):
        self.max_queued = max_queued
        self.live: dict[int, _Live] = {}
        self.metrics = Metrics()
        self.lock = threading.Lock()  # metrics and live, read by /metrics and the handlers
        self.error: BaseException | None = None

    async def submit(self, ids: list[int], params: SamplingParams):
        """(request, its token queue); raises APIError for what the engine refuses."""
        if self.error is not None:
            raise APIError(503, f"the engine stopped: {self.error}", type_="server_error")
        if self._waiting() >= self.max_queued:
            raise APIError(429, f"too many requests queued ({self.max_queued}): retry later",
                           type_="rate_limit_exceeded")
        loop = asyncio.get_running_loop()
        done, out = loop.create_future(), asyncio.Queue()
        self._queue_submit(ids, params, loop, out, done)
        return await done, out

    def _publish(self, dt: float) -> None:
        """After an engine step: each live request's new tokens (and its end) to its queue,
        one wake-up of each event loop a step, not one per request (call_soon_threadsafe
        writes to the loop's self-pipe and takes its lock, 64 times a step at batch 64)."""
        batches: dict = {}
        generated = 0
        with self.lock:
            ended = []
            for rid, live in list(self.live.items()):
                req = live.req
                new = req.out[live.sent:]
                live.sent = len(req.out)
                generated += len(new)
                if new or req.finish_reason is not None:
                    batches.setdefault(live.loop, []).append((live.out, ("tokens", new,
                                                                         req.finish_reason)))
                if req.finish_reason is not None:
                    ended.append(req)
                    del self.live[rid]
        for req in ended:
            self._finished(req)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_deliver, items)
        with self.lock:
            self.metrics.steps += 1
            self.metrics.step_seconds += dt
            self.metrics.generated_tokens += generated

    def _finished(self, req) -> None:
        with self.lock:
            reason = req.finish_reason or "abort"
            self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1
            self.metrics.preemptions += req.preemptions


class EngineLoop(LoopBase):
    """The engine in this process, on a thread of its own (see the module docstring)."""

    def __init__(self, engine, max_queued: int = 1024):
        super().__init__(max_queued)
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="qcompile-engine", daemon=True)
        self.thread.start()

    # ---- from the event loop ---------------------------------------------------------------

    def _waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self.inbox.qsize()

    def _queue_submit(self, ids, params, loop, out, done) -> None:
        self.inbox.put(("submit", ids, params, loop, out, done))

    def abort(self, req) -> None:
        self.inbox.put(("abort", req))

    def queued(self) -> int:
        return self.inbox.qsize()

    def counts(self) -> tuple[int, int, int, int]:
        return engine_counts(self.engine)

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._drain(block=not self.live)
                if self.live:
                    self._step()
        except BaseException as e:  # noqa: BLE001  (tell every waiting client, then stop)
            self.error = e
            with self.lock:
                lives = list(self.live.values())
            for live in lives:
                live.post(("error", f"the engine stopped: {type(e).__name__}: {e}"))

    def _drain(self, block: bool) -> None:
        item = self.inbox.get() if block else None
        while True:
            if item is not None:
                self._handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item) -> None:
        if item[0] == "abort":
            req = item[1]
            if req.finish_reason is None:
                self.engine.abort(req)
                self._finished(req)
            with self.lock:
                self.live.pop(req.id, None)
            return
        _, ids, params, loop, out, done = item
        try:
            req = self.engine.submit([ids], params)[0]
        except (ContextLengthError, ValueError) as e:
            loop.call_soon_threadsafe(_set, done, None, APIError(
                400, str(e), "prompt", code="context_length_exceeded"
                if isinstance(e, ContextLengthError) else None))
            return
        with self.lock:
            self.metrics.requests += 1
            self.metrics.prompt_tokens += len(ids)
        with self.lock:
            self.live[req.id] = _Live(req, loop, out)
        loop.call_soon_threadsafe(_set, done, req, None)

    def _step(self) -> None:
        t0 = time.perf_counter()
        self.engine.step()
        self._publish(time.perf_counter() - t0)


def _set(fut: asyncio.Future, value, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


_FINISH = {"eos": "stop", "length": "length", "stop": "stop", "abort": "stop"}


class _Generation:
    """One request's text as it streams: detokenized incrementally (whole characters), cut
    at the first stop string (which is not returned, as in the OpenAI API)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder, self.stop = IncrementalDecoder(tokenizer), stop
        self.text, self.held, self.stopped = "", "", False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, tokens: list[int], last: bool) -> str:
        """The new text to send. The last len(longest stop) - 1 characters wait until no
        stop string can start in them; a match ends the text before it."""
        pending = self.held + "".join(self.decoder.push(t) for t in tokens)
        if last:
            pending += self.decoder.flush()
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, pending, last = True, pending[:min(hits)], True
        cut = len(pending) if last else max(0, len(pending) - self.hold)
        out, self.held = pending[:cut], pending[cut:]
        self.text += out
        return out


class _BodyLimit:
    """413 for a request whose Content-Length is over `limit` bytes. Plain ASGI: FastAPI's
    `@app.middleware("http")` (Starlette's BaseHTTPMiddleware) relays every streamed chunk
    through anyio memory streams and task groups, which with is_disconnected() polling was
    most of the event loop's time at 64 streams (bench/serve_overhead.py)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length", b"")
            if size.isdigit() and int(size) > self.limit:
                from fastapi.responses import JSONResponse
                body = APIError(413, f"request body over {self.limit} bytes").body()
                await JSONResponse(body, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine, model_name: str, *, max_queued: int = 1024, stream_interval: int = 1):
    """The FastAPI application serving `engine` as `model_name`: an `Engine` (stepped on a
    thread of this process) or a loop already around one (`engine_process.EngineProcess`: its
    own process). stream_interval: a stream sends its first token at once, then a chunk per
    that many tokens (and its last), as vLLM's --stream-interval: fewer server-sent events
    for the event loop and the client to handle (on an H100, 64 streams of a 1.7 ms decode
    step arrived in bursts, late: bench/results/gpu-h100-2026-12-07h.md)."""
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be >= 1, not {stream_interval}")
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    app = FastAPI(title="qcompile", docs_url=None, redoc_url=None)
    loop_ = engine if isinstance(engine, LoopBase) else EngineLoop(engine, max_queued)
    engine = loop_.engine
    app.state.engine_loop = loop_
    created = int(time.time())

    class _Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        n: int = Field(1, ge=1, le=1)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        ignore_eos: bool = False  # vLLM's extension: exactly max_tokens tokens (benchmarks)
        # vLLM's extension: the prompt's and the completion's token ids in each choice (RL
        # trainers, tests that check every token against the model's logits)
        return_token_ids: bool = False

    class CompletionBody(_Sampling):
        prompt: str | list[int]

    class Message(BaseModel):
        role: str
        content: str

    class ChatBody(_Sampling):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else \
            first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        return JSONResponse(APIError(400, msg, where or None).body(), status_code=400)

    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)

    @app.get("/health")
    async def health():
        if loop_.error is not None:
            raise APIError(503, f"the engine stopped: {loop_.error}", type_="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        with loop_.lock:
            text = loop_.metrics.text(loop_.counts(), loop_.queued())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "qcompile"}]}

    def _params(body: _Sampling, ids: list[int], max_tokens: int | None) -> SamplingParams:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                           f"{model_name!r} (GET /v1/models)", "model", code="model_not_found")
        room = engine.max_seq_len - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model serves at most "
                           f"{engine.max_seq_len} tokens per sequence (prompt + completion): "
                           "shorten it", "prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(16, room) if isinstance(body, CompletionBody) else room
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + the prompt's {len(ids)} tokens "
                           f"exceed the model's {engine.max_seq_len}: ask for at most {room}",
                           "max_tokens", code="context_length_exceeded")
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, seed=body.seed, stop_on_eos=not body.ignore_eos)

    def _stops(body: _Sampling) -> list[str]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop: at most 4 non-empty strings", "stop")
        return stop

    async def _run(request: Request, body: _Sampling, ids: list[int],
                   max_tokens: int | None, chat: bool):
        params, stop = _params(body, ids, max_tokens), _stops(body)
        req, out = await loop_.submit(ids, params)
        gen = _Generation(engine.tokenizer, stop)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if chat else "text_completion"
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": len(req.out),  # noqa
                         "total_tokens": len(ids) + len(req.out)}

        async def events():
            """(text, finish_reason or None, token ids) as tokens arrive; aborts on a stop
            string."""
            while True:
                item = await out.get()
                while item[0] == "tokens" and item[2] is None and not out.empty():
                    # a client that fell behind gets the steps it missed in one event
                    nxt = out.get_nowait()
                    item = nxt if nxt[0] == "error" else ("tokens", item[1] + nxt[1], nxt[2])
                if item[0] == "error":
                    raise APIError(503, item[1], type_="server_error")
                _, tokens, reason = item
                text = gen.push(tokens, reason is not None)
                if gen.stopped and reason is None:
                    loop_.abort(req)
                    reason = "stop"
                yield text, (_FINISH.get(reason, "stop") if reason else None), tokens
                if reason is not None:
                    return

        if not body.stream:
            try:
                finish, token_ids = None, []
                async for _, finish, tokens in events():
                    token_ids += tokens
            finally:
                if req.finish_reason is None:
                    loop_.abort(req)
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": gen.text}} if chat
                          else {"text": gen.text})
            if body.return_token_ids:
                choice.update(prompt_token_ids=ids, token_ids=token_ids)
            return JSONResponse({"id": rid, "object": obj, "created": int(time.time()),
                                 "model": model_name, "choices": [choice], "usage": usage()})

        async def sse():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            first = True  # the prompt's ids go in the first chunk that carries tokens

            def chunk(delta_text: str | None, finish, role: bool = False,
                      tokens: list[int] | None = None) -> str:
                nonlocal first
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else (
                        {"content": delta_text} if delta_text else {})
                    choice = {"index": 0, "delta": delta, "finish_reason": finish,
                              "logprobs": None}
                else:
                    choice = {"index": 0, "text": delta_text or "", "finish_reason": finish,
                              "logprobs": None}
                if body.return_token_ids and not role:
                    choice["token_ids"] = tokens or []
                    if first:
                        choice["prompt_token_ids"], first = ids, False
                return "data: " + json.dumps({"id": rid, "object": chunk_obj,
                                              "created": int(time.time()),
                                              "model": model_name, "choices": [choice]}) + "\n\n"
            try:
                if chat:
                    yield chunk(None, None, role=True)
                # a client that hangs up is seen by Starlette (its disconnect listener, or
                # the next send failing), which closes this generator: `finally` aborts
                sent, text, tokens = False, "", []  # sent: a chunk with content went out
                async for more, finish, new in events():
                    text, tokens = text + more, tokens + new
                    if sent and not finish and len(tokens) < stream_interval:
                        continue
                    if text or finish or (body.return_token_ids and tokens):
                        yield chunk(text, finish, tokens=tokens)
                        sent = True
                    text, tokens = "", []
                yield "data: " + json.dumps({"id": rid, "object": chunk_obj,
                                             "created": int(time.time()), "model": model_name,
                                             "choices": [], "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield "data: " + json.dumps(e.body()) + "\n\n"
            finally:  # a client that hung up (the generator is closed): free its pages now
                if req.finish_reason is None:
                    loop_.abort(req)
        return StreamingResponse(sse(), media_type="text/event-stream")

    def _prompt_ids(body: CompletionBody) -> list[int]:
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise APIError(400, "prompt: must not be empty", "prompt")
            return engine.encode(body.prompt)
        vocab = engine.artifact.model.vocab_size
        if not body.prompt or not all(0 <= t < vocab for t in body.prompt):
            raise APIError(400, f"prompt: token ids must be a non-empty list of integers "
                           f"from 0 to {vocab - 1}", "prompt")
        return list(body.prompt)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        return await _run(request, body, _prompt_ids(body), body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        msgs = [m.model_dump() for m in body.messages]
        try:
            ids = list(engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                            tokenize=True, return_dict=False))
        except Exception as e:  # noqa: BLE001  (the template's own error, e.g. a bad role)
            raise APIError(400, f"messages: the model's chat template refused them ({e})",
                           "messages") from None
        return await _run(request, body, ids, body.max_completion_tokens or body.max_tokens,
                          chat=True)

    return app


def main(argv=None) -> int:
    """`qserve ARTIFACT [--host H] [--port P]`: serve an artifact over the OpenAI API."""
    import argparse

    from qcompile.compiler.cli_errors import run_cli
    p = argparse.ArgumentParser(prog="qserve", description=(
        "Serve a qcompile artifact over HTTP with the OpenAI API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics): one engine, continuous "
        "batching across connections."))
    p.add_argument("artifact", help="directory written by qcompile")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the artifact's folder name)")
    p.add_argument("--max-seqs", type=int, default=64, help="sequences decoded at a time")
    p.add_argument("--max-queued", type=int, default=1024,
                   help="requests waiting for admission before new ones get 429")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed chunk after the first (default 1; more: fewer "
                        "events for the server and clients at high token rates, as vLLM's)")
    p.add_argument("--engine-thread", action="store_true",
                   help="step the engine on a thread of the HTTP server's process instead of "
                        "in a process of its own (the default: there the two do not share "
                        "the GIL; see runtime/engine_process.py)")
    add_compile_args(p, "on cuda, no TorchInductor on the program's glue (default: compiled)")
    add_invariance_arg(p)
    args = p.parse_args(argv)
    if args.stream_interval < 1:
        p.error(f"--stream-interval must be at least 1, not {args.stream_interval}")

    def serve() -> int:
        import functools
        from pathlib import Path

        import torch
        import uvicorn

        from .device import parse_device
        from .engine import Engine
        from .engine_process import EngineProcess
        device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        kv = int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None
        load = functools.partial(Engine.load, args.artifact, device=device,
                                 max_seqs=args.max_seqs, kv_cache_bytes=kv,
                                 compile=compile_arg(args),
                                 batch_invariant=args.batch_invariant)
        engine = load() if args.engine_thread else EngineProcess(load, args.max_queued)
        name = args.model_name or Path(args.artifact).resolve().name
        app = create_app(engine, name, max_queued=args.max_queued,
                         stream_interval=args.stream_interval)
        times = engine.load_times if args.engine_thread else engine.engine.load_times
        print(f"qserve: {name} on http://{args.host}:{args.port}/v1 ({device}, loaded in "
              f"{sum(times.values()):.1f} s{'' if args.engine_thread else ', engine process'})",
              flush=True)
        try:
            # no lifespan: the app has no startup / shutdown hooks, and on Ctrl-C uvicorn
            # logged its cancelled lifespan task as an error traceback
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                        lifespan="off")
        finally:
            if not args.engine_thread:
                engine.close()
        return 0
    return run_cli("qserve", serve)
