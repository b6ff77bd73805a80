"""qserve's engine in a process of its own (`EngineProcess`), as vLLM's V1 engine core and
SGLang's scheduler run theirs.

In one process the engine thread and the asyncio loop that speaks HTTP share the GIL. The
engine's host work between launches (scheduling, staging, replaying graphs) holds it for most
of a ~2 ms decode step, and the event loop's work (parsing requests, detokenizing, writing
server-sent events for 64 streams) holds it the rest: on an H100 (1B shape, 64 x 1024 / 128,
all at once, bench/results/gpu-h100-2026-12-07f.md) qserve's steps took 7.6 ms on average
against 4.5 offline, and the streams' first tokens reached their clients ~1 s late (TTFT p50
1,078 ms against 238 offline) because the event loop got the GIL too seldom to write them.

Here the engine runs in a child process (spawned: CUDA is never initialized in the parent)
and owns the GPU; the parent keeps HTTP, tokenization, detokenization and the metrics. They
talk through two one-way pipes: submissions and aborts go down (a writer thread, so the event
loop never blocks on a full pipe), and once per engine step one message comes up with every
running request's new tokens and the cache's page counts (a reader thread, which hands them
to the event loop in one wake-up, as `server.EngineLoop` does). The messages are pickled, as
multiprocessing pickles them: both ends are this program, no untrusted bytes are read.

A load that fails in the child raises the same exception in the parent (so `qserve` prints
its one-line error); a step that fails, or a child that dies, turns every live request into
an error and /health into 503, as the in-process loop does.
"""
from __future__ import annotations

import atexit
import itertools
import multiprocessing as mp
import queue
import signal
import threading
import time
from types import SimpleNamespace

from .engine import ContextLengthError
from .server import APIError, LoopBase, _Live, _set, engine_counts


class _Mirror:
    """The parent's view of a request: the tokens it has got, how it finished."""

    def __init__(self, rid: int, prompt_tokens: int):
        self.id, self.prompt_tokens = rid, prompt_tokens
        self.out, self.finish_reason, self.preemptions = [], None, 0


class RemoteEngine:
    """What the app reads of an engine, for one that runs in the child: its tokenizer, limits
    and the page / request counts of the child's last message."""

    def __init__(self, info: dict):
        self.tokenizer = info["tokenizer"]
        self.max_seq_len = info["max_seq_len"]
        self.artifact = SimpleNamespace(model=SimpleNamespace(vocab_size=info["vocab_size"]))
        self.load_times = info["load_times"]
        self.device = info["device"]
        self.scheduler = SimpleNamespace(running=0, waiting=0)  # counts
        self.cache = SimpleNamespace(num_blocks=info["num_blocks"],
                                     free_blocks=info["num_blocks"])

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        from .engine import encode_prompt
        return encode_prompt(self.tokenizer, prompt, chat)

    def _update(self, stats: tuple) -> None:
        running, waiting, free, total = stats
        self.scheduler.running, self.scheduler.waiting = running, waiting
        self.cache.free_blocks, self.cache.num_blocks = free, total


def _child(factory, down, up) -> None:
    """The engine process: load, then admit / abort between steps, step while anything is
    live, and send each step's new tokens up in one message. Ctrl-C in the terminal reaches
    the whole process group: the child leaves it to the parent, which stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = factory()
    except BaseException as e:  # noqa: BLE001  (the parent re-raises it)
        try:
            up.send(("failed", e))
        except Exception:  # noqa: BLE001  (an exception that does not pickle)
            up.send(("failed", RuntimeError(f"{type(e).__name__}: {e}")))
        return
    up.send(("ready", {
        "tokenizer": engine.tokenizer, "max_seq_len": engine.max_seq_len,
        "vocab_size": engine.artifact.model.vocab_size, "num_blocks": engine.cache.num_blocks,
        "load_times": dict(getattr(engine, "load_times", {})),
        "device": str(getattr(engine, "device", "cpu"))}))
    live: dict[int, tuple] = {}  # rid -> (request, tokens sent)
    try:
        while True:
            block, changed = not live, False
            while block or down.poll():
                msg, block, changed = down.recv(), False, True
                if msg[0] == "stop":
                    return
                if msg[0] == "abort":
                    req = live.pop(msg[1], (None,))[0]
                    if req is not None and req.finish_reason is None:
                        engine.abort(req)
                    continue
                _, rid, ids, params = msg
                try:
                    live[rid] = (engine.submit([ids], params)[0], 0)
                    up.send(("accepted", rid))
                except (ContextLengthError, ValueError) as e:
                    up.send(("refused", rid, isinstance(e, ContextLengthError), str(e)))
            if not live:
                if changed:
                    up.send(("stats", engine_counts(engine)))
                continue
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            news = []
            for rid, (req, sent) in list(live.items()):
                if len(req.out) > sent or req.finish_reason is not None:
                    news.append((rid, req.out[sent:], req.finish_reason, req.preemptions))
                if req.finish_reason is not None:
                    del live[rid]
                else:
                    live[rid] = (req, len(req.out))
            up.send(("step", dt, news, engine_counts(engine)))
    except (EOFError, OSError):  # the parent went away
        return
    except BaseException as e:  # noqa: BLE001  (tell the parent, then stop)
        up.send(("error", f"{type(e).__name__}: {e}"))


class EngineProcess(LoopBase):
    """`server.EngineLoop`'s interface over an engine in a child process (module docstring).
    `factory`: a picklable callable that builds the engine there (e.g.
    `functools.partial(Engine.load, path, device="cuda")`); blocks until it is loaded and
    raises what the load raised."""

    def __init__(self, factory, max_queued: int = 1024, *, start_timeout: float = 3600):
        super().__init__(max_queued)
        ctx = mp.get_context("spawn")
        down_r, self._down = ctx.Pipe(duplex=False)
        self._up, up_w = ctx.Pipe(duplex=False)
        # not a daemon: a daemonic process may not start processes of its own, and loading
        # may (compile workers); it ends when the pipe to it closes, and at exit (atexit)
        self.process = ctx.Process(target=_child, args=(factory, down_r, up_w),
                                   name="qcompile-engine")
        self.process.start()
        down_r.close()
        up_w.close()
        try:
            if not self._up.poll(start_timeout):
                raise TimeoutError(f"the engine process did not load in {start_timeout:.0f} s")
            kind, payload = self._up.recv()
        except EOFError:
            self.process.join()
            raise RuntimeError(f"the engine process died while loading (exit code "
                               f"{self.process.exitcode})") from None
        except BaseException:  # a timeout or Ctrl-C while it loads: it must not outlive us
            self.process.kill()
            self.process.join()
            raise
        if kind == "failed":
            self.process.join()
            raise payload
        atexit.register(self.close)
        self.engine = RemoteEngine(payload)
        self._ids = itertools.count()
        self._pending: dict[int, tuple] = {}  # rid -> (mirror, loop, out, done)
        self._outbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._write, name="qcompile-engine-writer", daemon=True).start()
        threading.Thread(target=self._read, name="qcompile-engine-reader", daemon=True).start()

    # ---- from the event loop (LoopBase.submit / abort call these) -------------------------

    def _waiting(self) -> int:
        return self.engine.scheduler.waiting + len(self._pending)

    def _queue_submit(self, ids, params, loop, out, done) -> None:
        rid = next(self._ids)
        self._pending[rid] = (_Mirror(rid, len(ids)), loop, out, done)
        self._outbox.put(("submit", rid, ids, params))

    def abort(self, req) -> None:
        self._outbox.put(("abort", req.id))
        with self.lock:
            live = self.live.pop(req.id, None)
        if live is not None and req.finish_reason is None:
            self._finished(req)

    def queued(self) -> int:
        return len(self._pending)

    def counts(self) -> tuple[int, int, int, int]:
        e = self.engine
        return e.scheduler.running, e.scheduler.waiting, e.cache.free_blocks, e.cache.num_blocks

    def close(self) -> None:
        """Stop the child (its pages and the GPU are freed with it); idempotent."""
        if self.process.is_alive():
            self._outbox.put(("stop",))
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    # ---- the pipe threads ------------------------------------------------------------------

    def _write(self) -> None:
        try:
            while True:
                msg = self._outbox.get()
                self._down.send(msg)
                if msg[0] == "stop":
                    return
        except (OSError, ValueError):  # the child is gone: the reader reports it
            return

    def _read(self) -> None:
        try:
            while True:
                msg = self._up.recv()
                if msg[0] == "step":
                    _, dt, news, stats = msg
                    with self.lock:
                        for rid, tokens, reason, preemptions in news:
                            live = self.live.get(rid)
                            if live is not None:
                                live.req.out += tokens
                                live.req.preemptions = preemptions
                                live.req.finish_reason = reason
                    self.engine._update(stats)
                    self._publish(dt)
                elif msg[0] == "stats":
                    self.engine._update(msg[1])
                elif msg[0] == "accepted":
                    mirror, loop, out, done = self._pending.pop(msg[1])
                    with self.lock:
                        self.metrics.requests += 1
                        self.metrics.prompt_tokens += mirror.prompt_tokens
                        self.live[mirror.id] = _Live(mirror, loop, out)
                    loop.call_soon_threadsafe(_set, done, mirror, None)
                elif msg[0] == "refused":
                    _, rid, context, text = msg
                    _, loop, _, done = self._pending.pop(rid)
                    loop.call_soon_threadsafe(_set, done, None, APIError(
                        400, text, "prompt", code="context_length_exceeded" if context else None))
                elif msg[0] == "error":
                    self._fail(RuntimeError(msg[1]))
                    return
        except (EOFError, OSError):
            self.process.join(timeout=5)
            self._fail(RuntimeError(f"the engine process exited (code {self.process.exitcode})"))

    def _fail(self, error: BaseException) -> None:
        self.error = error
        with self.lock:
            lives = list(self.live.values())
        for live in lives:
            live.post(("error", f"the engine stopped: {error}"))
        for _, loop, _, done in list(self._pending.values()):
            loop.call_soon_threadsafe(_set, done, None, APIError(
                503, f"the engine stopped: {error}", type_="server_error"))
