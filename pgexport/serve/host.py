"""The model behind the server: loaded once, in a thread so that `/health` answers meanwhile, and
the admission count that bounds the queue.

Admission is decided when a request arrives, before its body is parsed or its image decoded: a
burst beyond the server's room is refused at once with 503 and Retry-After, instead of after
seconds of image decoding (vLLM checked its cap before preprocessing but counted requests after
it, so a burst got its 503s late). `in_system` counts requests from admission until the engine
has finished them (cancelled ones included), so at most max_batch + max_queue are ever inside.

    >>> host = ModelHost(ServeConfig(model="exports/pg-224"))  # doctest: +SKIP
    >>> host.start(background=True); host.state  # doctest: +SKIP
    'loading'
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Callable

from pgexport.batch.model import resolve_export
from pgexport.engine import Engine, Request
from pgexport.errors import PgExportError, one_line
from pgexport.runtime.session import OnnxPaliGemma
from pgexport.serve.config import ServeConfig
from pgexport.serve.protocol import ApiError

RETRY_AFTER = {"Retry-After": "1"}


class ModelHost:
    """See the module docstring. `on_failure(message)` is called if loading fails."""

    def __init__(self, config: ServeConfig, on_failure: Callable[[str], None] | None = None):
        self.config = config
        self.on_failure = on_failure
        self.engine: Engine | None = None
        self.error: str | None = None
        self.draining = False  # set on SIGTERM: new requests get 503 while those inside finish
        self.in_system = 0  # admitted and not finished; only the event loop's thread changes it
        self.created = int(time.time())
        self.url: str | None = None  # where the server listens, for the "ready" line
        self._trackers: set[asyncio.Task] = set()
        self._handles: set[Request] = set()  # the engine requests not finished yet

    # ------------------------------------------------------------------ loading
    def start(self, background: bool) -> None:
        """Load the model, in a daemon thread (`background`) or here."""
        if background:
            threading.Thread(target=self._load_or_report, name="pgexport-load", daemon=True).start()
        else:
            self.load()

    def load(self) -> None:
        c = self.config
        export_dir = resolve_export(c.model, progress=lambda m: print(m, file=sys.stderr, flush=True))
        model = OnnxPaliGemma(export_dir, provider=c.provider, threads=c.threads)
        self.engine = Engine(model, max_batch=c.max_batch, max_new_tokens=c.max_new_tokens, max_queue=c.max_queue)

    def _load_or_report(self) -> None:
        try:
            self.load()
        except Exception as e:  # reported as one line; the server then stops
            self.error = str(e) if isinstance(e, PgExportError) else f"cannot load the model: {one_line(e)}"
            if self.on_failure:
                self.on_failure(self.error)
            return
        where = f" on {self.url}/v1" if self.url else ""
        print(f"pgexport serve: {self.config.served_name} ready{where}", file=sys.stderr, flush=True)

    @property
    def state(self) -> str:
        if self.error:
            return "failed"
        if self.draining:
            return "draining"
        return "ready" if self.engine is not None else "loading"

    # ------------------------------------------------------------------ admission
    def admit(self) -> Engine:
        """Take a place for one request or raise 503; returns the engine."""
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests; retry on another "
                           "replica or after the restart", code="shutting_down", headers=RETRY_AFTER)
        if self.engine is None:
            raise ApiError(503, "the model is still loading; retry when GET /health answers 200",
                           code="model_loading", headers=RETRY_AFTER)
        room = self.config.max_batch + self.config.max_queue
        if self.in_system >= room:
            raise ApiError(503, f"the server is full ({self.in_system} requests: {self.config.max_batch} in the batch, "
                           f"{self.config.max_queue} queued; --max-queue); retry later", code="queue_full",
                           headers=RETRY_AFTER)
        self.in_system += 1
        return self.engine

    def release(self) -> None:
        self.in_system -= 1

    def track(self, handle: Request, on_done: Callable[[Request], None]) -> None:
        """Release the request's place (and call `on_done`) once the engine has finished it, whether
        it ended, failed or was cancelled."""
        async def wait():
            try:
                await handle.aresult()
                on_done(handle)
            finally:
                self._handles.discard(handle)
                self.release()

        self._handles.add(handle)

        task = asyncio.get_running_loop().create_task(wait())
        self._trackers.add(task)
        task.add_done_callback(self._trackers.discard)

    def cancel_all(self) -> None:
        """Cancel every request inside (the shutdown deadline): each ends with finish_reason
        "cancelled", which its response reports as 503 (any thread may call this)."""
        for handle in list(self._handles):
            handle.cancel()

    def load_figures(self) -> tuple[int, int, int, int]:
        """(running, waiting, rows used, rows max) for the gauges."""
        engine = self.engine
        if engine is None:
            return 0, self.in_system, 0, self.config.max_batch
        running = engine.running
        return running, max(0, self.in_system - running), running, engine.max_batch

    def close(self, timeout: float | None = 0) -> None:
        """Stop the engine: the HTTP server has already waited for the requests in flight."""
        self.draining = True
        if self.engine is not None:
            self.engine.close(timeout)
