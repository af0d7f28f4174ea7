"""Continuous batching: many callers served by one model, one decode step for all of them.

Decode reads every weight once per step whatever the batch, so rows decoded together cost far
less than their own steps. `Engine` holds one `OnnxPaliGemma` and a KV cache of `max_batch` rows
(`KVRows`, allocated once). One loop thread repeats:

1. drop cancelled requests (their rows are freed);
2. admit waiting requests into free rows: their images are encoded and their prompts prefilled
   in one call, each prompt ending at the shared write slot (see kv_rows.py);
3. one decode step for every active row;
4. free the rows of requests that hit eos, their max_new_tokens or a stop string; the next
   waiting request takes a freed row at the next step.

Each request's tokens are those `OnnxPaliGemma.generate` gives it alone: its own positions and
prefix-LM mask (from its row's attention mask), and for sampling its own random generator
seeded as `generate` seeds it. (The default int8 export quantizes activations with one scale
per call, so there a row can depend on its neighbours; docs/engine.md.)

    >>> engine = Engine(OnnxPaliGemma("pg-int8"), max_batch=8)  # doctest: +SKIP
    >>> handle = engine.submit(Image.open("cat.jpg"), "caption en", max_new_tokens=32)  # doctest: +SKIP
    >>> handle.result().text  # doctest: +SKIP
    >>> engine.close()  # doctest: +SKIP

Folders without decoder.onnx (written before it existed) and the CUDA provider are served in
static batches instead (a group of waiting requests runs until its longest answer ends), with a
one-line note; the results are the same, the throughput lower.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np

from pgexport.engine.kv_rows import KVRows
from pgexport.engine.request import Chunk, PromptTooLong, QueueFull, Request, Result
from pgexport.engine.stops import StopText
from pgexport.errors import PgExportError, one_line
from pgexport.processing.streaming import TextStream
from pgexport.runtime.generation import Sampling, select_tokens
from pgexport.runtime.session import OnnxPaliGemma

PROMPT_TEXT_BUDGET = 64  # text tokens a prompt may have beyond its image tokens, for the default max_len


@dataclass
class EngineStats:
    """Counters since the engine started (read by the server's /metrics and the benchmarks)."""

    steps: int = 0  # decode steps
    decode_rows: int = 0  # rows summed over decode steps (/ steps = mean batch)
    prefills: int = 0  # prefill calls (each admits one or more requests)
    compactions: int = 0
    compaction_seconds: float = 0.0  # moving rows left (KVRows.compact) and right (to admit a longer prompt)
    graph_seconds: float = 0.0  # inside ONNX Runtime (vision, prefill, decode)
    loop_seconds: float = 0.0  # the loop's busy time, graph calls included
    step_log: list | None = None  # with Engine(record_steps=True): (rows, step, graph, token choice + hand-out seconds) per decode step


def left_padded(prompts: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one batch, padded on the left: (ids, mask), `[B, longest]`."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for j, prompt in enumerate(prompts):
        ids[j, longest - len(prompt):], mask[j, longest - len(prompt):] = prompt, 1
    return ids, mask


class _Live:
    """A request in a row: its detokenizer, stop-string matcher and the token to feed next."""

    def __init__(self, request: Request, tokenizer):
        self.request = request
        self.text = TextStream(tokenizer)
        self.stops = StopText(request.stop)
        self.ids: list[int] = []
        self.next_token = 0


class Engine:
    """See the module docstring.

    Arguments:
        model: an `OnnxPaliGemma` (the engine runs its sessions; one engine per model).
        max_batch: rows decoded together.
        max_len: slots per row; a request needs prompt + max_new_tokens <= max_len. Default:
            image tokens + 64 text tokens + 2 x max_new_tokens (the room beyond one request's
            length lets new requests join while old ones finish; capped at the model's context).
        max_new_tokens: the cap (and default) for a request's max_new_tokens.
        max_queue: waiting requests at most (None: unbounded); `submit` raises `QueueFull` beyond.
        record_steps: keep every decode step's rows and times in `stats.step_log` (benchmarks).
    """

    def __init__(self, model: OnnxPaliGemma, max_batch: int = 8, max_len: int | None = None,
                 max_new_tokens: int = 128, max_queue: int | None = None, record_steps: bool = False):
        if max_batch < 1:
            raise PgExportError(f"max_batch must be >= 1, got {max_batch}")
        if max_new_tokens < 1:
            raise PgExportError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        m = model.manifest
        self.model, self.manifest = model, m
        self.max_batch, self.max_new_tokens, self.max_queue = max_batch, max_new_tokens, max_queue
        context = m.max_position_embeddings
        if max_len is None:
            max_len = m.num_image_tokens + PROMPT_TEXT_BUDGET + 2 * max_new_tokens
            max_len = min(max_len, context) if context else max_len
        if context and max_len > context:
            raise PgExportError(f"max_len={max_len} is over the model's context of {context} tokens; pass a smaller max_len")
        if max_len <= m.num_image_tokens + 1:
            raise PgExportError(f"max_len={max_len} leaves no room after the {m.num_image_tokens} image tokens; "
                                "pass a larger max_len")
        self.max_len = max_len
        self.continuous = model.single_decoder and model.provider == "cpu"
        self.note = None
        if not self.continuous:
            why = ("the CUDA provider" if model.provider != "cpu" else
                   f"{model.export_dir} has no decoder.onnx of this version (re-export it for continuous batching)")
            self.note = f"continuous batching needs decoder.onnx on the CPU provider; with {why}, requests run in static batches"
            warnings.warn(self.note, stacklevel=2)
        else:
            self.rows = KVRows(2 * m.num_layers, max_batch, m.num_kv_heads, max_len, m.head_dim, model.cache_dtype)
        self.stats = EngineStats(step_log=[] if record_steps else None)
        self._live: list[_Live] = []  # row i holds self._live[i]
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="pgexport-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    @property
    def running(self) -> int:
        """Requests holding a row."""
        return len(self._live)

    @property
    def waiting(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    def has_room(self) -> bool:
        """Whether `submit` would take another request now (the queue is not full)."""
        return not self._closing and (self.max_queue is None or len(self._waiting) < self.max_queue)

    def submit(self, image, prompt: str, max_new_tokens: int | None = None, sampling: Sampling | None = None,
               stop: list[str] | str | None = None, ignore_eos: bool = False) -> Request:
        """Queue one image and prompt; returns its `Request` handle at once.

        `image`: a path or a PIL image; `stop`: strings that end the answer (not included);
        `ignore_eos`: generate exactly max_new_tokens (load tests fix the answer length this way).

        >>> handle = engine.submit("cat.jpg", "detect cat", max_new_tokens=16)  # doctest: +SKIP
        """
        batch = self.model.processor(images=[image], prompts=[prompt])
        return self.submit_ids(batch["input_ids"][0], batch["pixel_values"][0], max_new_tokens, sampling, stop,
                               ignore_eos)

    def submit_ids(self, input_ids, pixel_values, max_new_tokens: int | None = None, sampling: Sampling | None = None,
                   stop: list[str] | str | None = None, ignore_eos: bool = False) -> Request:
        """`submit` for a prompt the processor already built: `input_ids` `[L]` (with the
        `<image>` tokens, no padding) and `pixel_values` `[3, H, W]`."""
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise PgExportError(f"max_new_tokens={max_new_tokens}: this engine takes 1 to {self.max_new_tokens}")
        ids = np.asarray(input_ids, np.int64).reshape(-1)
        if len(ids) + max_new_tokens > self.max_len:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens ({self.manifest.num_image_tokens} image tokens + text); "
                                f"with max_new_tokens={max_new_tokens} that is over the engine's max_len of "
                                f"{self.max_len}; shorten the prompt or ask for fewer tokens")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        request = Request(next(self._ids), ids, np.asarray(pixel_values, np.float32), max_new_tokens,
                          sampling or Sampling(), stop, ignore_eos)
        with self._cond:
            if self._closing:
                raise PgExportError("the engine is shutting down; it takes no new requests")
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue}); try again later")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests; finish those submitted, cancelling what is left after `timeout`
        seconds (None: wait for all), and stop the loop thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                for request in [*self._waiting, *(live.request for live in self._live)]:
                    request.cancel()
                self._cond.notify_all()
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._live and not self._closing:
                    self._cond.wait()
                if self._closing and not self._waiting and not self._live:
                    return
            t0 = time.perf_counter()
            try:
                if self.continuous:
                    self._step()
                else:
                    self._static_batch()
            except Exception as e:  # a failed graph call fails its requests, never the loop
                self._fail_all(one_line(e))
            self.stats.loop_seconds += time.perf_counter() - t0

    def _take_waiting(self, count: int) -> list[Request]:
        """Up to `count` waiting requests, oldest first; cancelled ones are finished on the way."""
        taken = []
        with self._cond:
            while self._waiting and len(taken) < count:
                request = self._waiting.popleft()
                if request.cancelled.is_set():
                    request.finish(Result([], "", "cancelled", request.prompt_tokens))
                else:
                    taken.append(request)
        return taken

    def _step(self) -> None:
        rows = self.rows
        for i in reversed(range(len(self._live))):
            if self._live[i].request.cancelled.is_set():
                self._finish(i, "cancelled")
        joiners = self._take_waiting(self.max_batch - len(self._live))
        if joiners:
            self._admit(joiners)
        if not self._live:
            return
        n = len(self._live)
        s0 = time.perf_counter()
        if rows.write_slot >= rows.max_len:
            c0 = time.perf_counter()
            rows.compact()
            self.stats.compactions += 1
            self.stats.compaction_seconds += time.perf_counter() - c0
        t = rows.write_slot
        rows.mask[:n, t] = 1
        tokens = np.array([live.next_token for live in self._live], np.int64)
        g0 = time.perf_counter()
        logits = self.model.decode_in_place(tokens, rows.mask[:n], rows.views(0, n), t)
        graph = time.perf_counter() - g0
        self.stats.graph_seconds += graph
        rows.write_slot += 1
        self.stats.steps += 1
        self.stats.decode_rows += n
        e0 = time.perf_counter()
        self._emit(logits)
        if self.stats.step_log is not None:
            end = time.perf_counter()
            self.stats.step_log.append((n, end - s0, graph, end - e0))

    def _admit(self, joiners: list[Request]) -> None:
        """Prefill `joiners` into rows n.. n+k-1, their prompts ending at the write slot."""
        rows, n, k = self.rows, len(self._live), len(joiners)
        longest = max(r.prompt_tokens for r in joiners)
        if not n:
            rows.write_slot = longest
        elif rows.write_slot < longest:
            c0 = time.perf_counter()
            rows.shift(longest - rows.write_slot)  # fits: a prompt is shorter than max_len
            self.stats.compaction_seconds += time.perf_counter() - c0
        t = rows.write_slot
        ids, prompt_mask = left_padded([r.input_ids for r in joiners], self.manifest.pad_token_id)  # [k, longest]
        rows.mask[n:n + k] = 0
        rows.mask[n:n + k, t - longest:t] = prompt_mask
        for request in joiners:
            request.timing.admitted = time.perf_counter()
        g0 = time.perf_counter()
        try:
            features = self.model.encode_image(np.stack([r.pixel_values for r in joiners]))
            feed = {"input_ids": ids, "image_features": features, "attention_mask": rows.mask[n:n + k],
                    "token_type_ids": np.zeros_like(ids), "cache_position": np.arange(t - longest, t, dtype=np.int64)}
            logits = self.model.run_in_place(feed, rows.views(n, n + k))
        except Exception as e:
            for request in joiners:
                request.finish(Result([], "", "error", request.prompt_tokens, one_line(e)))
            return
        finally:
            self.stats.graph_seconds += time.perf_counter() - g0
        self.stats.prefills += 1
        self._live.extend(_Live(r, self.model.processor.tokenizer) for r in joiners)
        rows.active = len(self._live)
        self._emit(logits, start=n)

    def _emit(self, logits: np.ndarray, start: int = 0) -> None:
        """Choose each row's next token from `logits` (rows start.. of the live list), hand it
        out, and free the rows whose request ended."""
        eos = self.manifest.eos_token_id
        greedy = logits.argmax(-1)
        ended = []
        for j in range(len(logits)):
            i = start + j
            live = self._live[i]
            request = live.request
            if request.sampling.do_sample:
                token = int(select_tokens(logits[j:j + 1], request.sampling, request.rng)[0])
            else:
                token = int(greedy[j])
            request.timing.token_times.append(time.perf_counter())
            if token == eos and not request.ignore_eos:
                tail = live.stops.feed(live.text.finish())[0] + live.stops.finish()
                if tail:
                    request.push(Chunk(None, tail))
                ended.append((i, "stop"))
                continue
            live.ids.append(token)
            live.next_token = token
            piece, stopped = live.stops.feed(live.text.push(token))
            if stopped:
                request.push(Chunk(token, piece))
                ended.append((i, "stop"))
            elif len(live.ids) >= request.max_new_tokens:
                piece += live.stops.feed(live.text.finish())[0]
                stopped = live.stops.stopped
                request.push(Chunk(token, piece + ("" if stopped else live.stops.finish())))
                ended.append((i, "stop" if stopped else "length"))
            else:
                request.push(Chunk(token, piece))
        for i, reason in sorted(ended, reverse=True):
            self._finish(i, reason)

    def _finish(self, i: int, reason: str, error: str | None = None) -> None:
        """End the request in row i and free the row (the last active row moves into it)."""
        live = self._live[i]
        request = live.request
        request.finish(Result(live.ids, live.stops.text, reason, request.prompt_tokens, error))
        last = len(self._live) - 1
        self._live[i] = self._live[last]
        self._live.pop()
        if self.continuous:
            self.rows.move_row(last, i)
            self.rows.active = len(self._live)

    def _fail_all(self, error: str) -> None:
        for i in reversed(range(len(self._live))):
            self._finish(i, "error", error)

    # ------------------------------------------------------------------ static fallback
    def _static_batch(self) -> None:
        """Folders without decoder.onnx / CUDA: a group of waiting requests, prefilled together
        (left padding) and decoded until the last of them ends."""
        group = self._take_waiting(self.max_batch)
        if not group:
            return
        ids, mask = left_padded([r.input_ids for r in group], self.manifest.pad_token_id)
        for request in group:
            request.timing.admitted = time.perf_counter()
        self._live = [_Live(r, self.model.processor.tokenizer) for r in group]
        stepper = self.model.stepper()
        g0 = time.perf_counter()
        logits = stepper.prefill(ids, mask, np.stack([r.pixel_values for r in group]), max(r.max_new_tokens for r in group))
        self.stats.graph_seconds += time.perf_counter() - g0
        self.stats.prefills += 1
        order = list(self._live)  # the stepper's rows, fixed for the whole group
        while True:
            self._live = [live for live in order if live in self._live]  # back in the stepper's row order
            for i in reversed(range(len(self._live))):
                if self._live[i].request.cancelled.is_set():
                    self._finish(i, "cancelled")
            rows = [order.index(live) for live in self._live]
            self._emit(logits[rows])
            if not self._live:
                return
            tokens = np.full(len(order), self.manifest.pad_token_id, np.int64)
            for live in self._live:
                tokens[order.index(live)] = live.next_token
            g0 = time.perf_counter()
            logits = stepper.decode(tokens)
            self.stats.graph_seconds += time.perf_counter() - g0
            self.stats.steps += 1
            self.stats.decode_rows += len(self._live)
