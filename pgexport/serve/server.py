"""Running the app on one machine: uvicorn, with a graceful stop.

On SIGTERM (or Ctrl-C) the server stops taking requests (the listening socket closes; a request
already on an open connection gets 503), lets those inside finish for up to `shutdown_timeout`
seconds, then cancels what is left (each gets a 503 error body, or an error event in its stream),
stops the engine and returns; `pgexport serve` then exits 0. A second Ctrl-C stops at once.

    >>> run_server(ServeConfig(model="exports/pg-224", port=8000))  # doctest: +SKIP
"""

from __future__ import annotations

import signal
import socket
import sys
import threading

import uvicorn

from pgexport.errors import PgExportError
from pgexport.serve.app import build_app
from pgexport.serve.config import ServeConfig
from pgexport.serve.host import ModelHost

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# uvicorn's own deadline comes this long after ours: by then our cancelled requests have sent
# their 503s and closed; uvicorn's cancelling of the tasks is only the backstop.
BACKSTOP_SECONDS = 10.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which also marks the host as draining the moment a stop signal arrives
    and cancels the requests still inside `shutdown_timeout` seconds later."""

    def __init__(self, config: uvicorn.Config, host: ModelHost, shutdown_timeout: float):
        super().__init__(config)
        self.host, self.shutdown_timeout = host, shutdown_timeout

    def handle_exit(self, sig, frame):
        if not self.host.draining:
            self.host.draining = True
            # A thread's timer: this runs inside a signal handler, where the event loop's state
            # may be half-updated, so nothing is scheduled on the loop from here.
            timer = threading.Timer(self.shutdown_timeout, self.host.cancel_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket, so that a taken port is a one-line error rather than uvicorn's log lines."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PgExportError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass a free --port or another "
                            "--host") from None
    return sock


def run_server(config: ServeConfig) -> None:
    """Serve until SIGTERM / Ctrl-C (see the module docstring); raises `PgExportError` if the model
    cannot be loaded."""
    failures: list[str] = []
    host = ModelHost(config)
    app = build_app(config, host)
    server = DrainingServer(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=config.shutdown_timeout + BACKSTOP_SECONDS),
                            host, config.shutdown_timeout)

    def failed(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    host.on_failure = failed
    sock = listen_socket(config.host, config.port)
    host.url = f"http://{config.host}:{sock.getsockname()[1]}"
    print(f"pgexport serve: listening on {host.url}, loading {config.served_name}", file=sys.stderr, flush=True)
    # uvicorn handles the stop signals while it runs, then restores the handlers found here and
    # raises the signal again; a graceful stop is a normal exit, so those handlers do nothing.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in STOP_SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if failures:
        raise PgExportError(failures[0])
