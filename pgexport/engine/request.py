"""A request's handle: its tokens and text as they come, its result, and cancel.

The engine's loop thread pushes events; any number of threads and asyncio tasks may read them.
Each reader keeps its own position, so `stream()` can be iterated by one consumer while another
waits on `result()`.

    >>> handle = engine.submit(image, "caption en", max_new_tokens=32)  # doctest: +SKIP
    >>> for chunk in handle.stream():  # doctest: +SKIP
    ...     print(chunk.text, end="")
    >>> handle.result().finish_reason  # doctest: +SKIP
    'stop'
    >>> async for chunk in handle.astream(): ...  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import numpy as np

from pgexport.errors import PgExportError
from pgexport.runtime.generation import Sampling


@dataclass
class Chunk:
    """What one step added to a request: its token and the text that token settled ("" while a
    multi-byte character or a possible stop string is held back)."""

    token_id: int
    text: str


@dataclass
class Result:
    token_ids: list[int]  # generated ids, eos excluded
    text: str  # the answer (a stop string and what followed it cut off)
    finish_reason: str  # "stop" (eos or a stop string), "length" (max_new_tokens), "cancelled", "error"
    prompt_tokens: int
    error: str | None = None  # one line, with finish_reason "error"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Timing:
    """Monotonic clock readings (time.perf_counter) of a request's life, for metrics."""

    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # it got a row (queue time = admitted - submitted)
    token_times: list[float] = field(default_factory=list)  # one per generated token
    finished: float | None = None


class Request:
    """One submitted request (see the module docstring). Created by `Engine.submit`."""

    def __init__(self, request_id: int, input_ids: np.ndarray, pixel_values: np.ndarray, max_new_tokens: int,
                 sampling: Sampling, stop: list[str], ignore_eos: bool = False):
        self.id = request_id
        self.input_ids = input_ids  # [L] int64: the prompt with its <image> tokens
        self.pixel_values = pixel_values  # [3, H, W] float32
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)  # as `generate` seeds it for this request alone
        self.stop = stop
        self.ignore_eos = ignore_eos  # eos is generated like any token: the answer is max_new_tokens long
        self.timing = Timing()
        self.cancelled = threading.Event()
        self._chunks: list[Chunk] = []
        self._result: Result | None = None
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def done(self) -> bool:
        return self._result is not None

    def cancel(self) -> None:
        """Stop generating: the row is freed at the engine's next step (a waiting request leaves
        the queue). The result's finish_reason is "cancelled" unless it had finished already."""
        self.cancelled.set()

    # ------------------------------------------------------------------ engine side
    def _wake(self) -> None:
        self._cond.notify_all()
        for loop, event in self._async_waiters:
            loop.call_soon_threadsafe(event.set)
        self._async_waiters.clear()

    def push(self, chunk: Chunk) -> None:
        with self._cond:
            self._chunks.append(chunk)
            self._wake()

    def finish(self, result: Result) -> None:
        with self._cond:
            if self._result is None:
                self.timing.finished = time.perf_counter()
                self._result = result
            self._wake()

    # ------------------------------------------------------------------ reader side
    def stream(self, timeout: float | None = None) -> Iterator[Chunk]:
        """Chunks as they come (blocking); ends when the request finishes. Breaking out of the
        loop does not cancel the request: call `cancel()` for that."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._chunks) and self._result is None:
                    if not self._cond.wait(timeout):
                        raise TimeoutError(f"request {self.id}: no token within {timeout} s")
                chunks, finished = self._chunks[i:], self._result is not None
            i += len(chunks)
            yield from chunks
            if finished and i >= len(self._chunks):
                return

    def result(self, timeout: float | None = None) -> Result:
        """The finished request's `Result` (blocks until it finishes)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            return self._result

    async def _changed(self, seen: int) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            if len(self._chunks) > seen or self._result is not None:
                return
            self._async_waiters.append((loop, event))
        await event.wait()

    async def astream(self) -> AsyncIterator[Chunk]:
        """`stream()` for asyncio: chunks as they come, without blocking the event loop."""
        i = 0
        while True:
            await self._changed(i)
            with self._cond:
                chunks, finished = self._chunks[i:], self._result is not None
            i += len(chunks)
            for chunk in chunks:
                yield chunk
            if finished and i >= len(self._chunks):
                return

    async def aresult(self) -> Result:
        """`result()` for asyncio."""
        while self._result is None:
            await self._changed(len(self._chunks))
        return self._result


class QueueFull(PgExportError):
    """The engine's waiting queue is at `max_queue`: try again later (HTTP 503)."""


class PromptTooLong(PgExportError):
    """The prompt and max_new_tokens do not fit the engine's rows (`max_len`): HTTP 400."""
