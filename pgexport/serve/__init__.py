"""`pgexport serve`: an OpenAI-compatible HTTP server on the continuous-batching engine
(Starlette + uvicorn, prometheus_client; the `serve` extra). See docs/serve.md.

    >>> from pgexport.serve import ServeConfig, run_server  # doctest: +SKIP
    >>> run_server(ServeConfig(model="exports/pg-224", max_batch=8))  # doctest: +SKIP
"""

from pgexport.serve.app import build_app
from pgexport.serve.config import ServeConfig
from pgexport.serve.server import run_server

__all__ = ["ServeConfig", "build_app", "run_server"]
