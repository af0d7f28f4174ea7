"""`pgexport serve --engine ray`: the same app as a Ray Serve deployment of N replicas.

Each replica is a Ray actor that builds the app (`build_app`) and so loads the model and runs
its own engine; Ray Serve's proxy takes the HTTP requests on `--host:--port` and spreads them
over the replicas (to the one with the fewest requests in flight of two picked at random). A
replica answers exactly as the single-process server does: its queue bound, limits, 503s and
API key are its own. On a cluster (`--address`), pgexport and the export folder must be at the
same paths on every node, and Ray Serve runs a proxy on every node (docs/serve.md).

    >>> run_ray_server(ServeConfig(model="exports/pg-224"), replicas=2, address=None)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import replace

from pgexport.errors import PgExportError, one_line
from pgexport.serve.app import build_app
from pgexport.serve.config import ServeConfig

# Room for a replica's own answers (503 when full, /health, /metrics) beyond the requests it
# takes, so that Ray Serve hands it every request and the replica decides, not Ray's queue.
SPARE_REQUESTS = 8


def run_ray_server(config: ServeConfig, replicas: int, address: str | None) -> None:
    """Deploy `replicas` replicas of the app on Ray Serve and serve until SIGTERM / Ctrl-C."""
    try:
        import ray
        from ray import serve
    except ModuleNotFoundError:
        raise PgExportError("--engine ray needs Ray Serve; install it with: pip install 'pgexport[ray]'") from None
    cores = os.cpu_count() or 1
    threads = config.threads or max(1, cores // replicas)  # replicas share the node's cores
    # A replica is loaded before Ray routes to it, so it loads in its startup hook.
    replica_config = replace(config, threads=threads, load_in_background=False)

    def build_replica_app():  # runs in each replica
        return build_app(replica_config)

    class PaliGemmaReplica:
        """A Ray Serve replica: the app and its engine."""

    started = not ray.is_initialized()
    if started:
        try:
            # A local Ray gets every core, or more if the replicas ask for more (they then share).
            ray.init(address=address, num_cpus=None if address else max(cores, replicas * threads),
                     include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise PgExportError(f"cannot connect to the Ray cluster at {address}: {one_line(e)}; check --address "
                                "(ray status on the head node shows it)") from None
    try:
        try:
            serve.start(http_options={"host": config.host, "port": config.port})
        except Exception as e:  # Ray's HTTP proxy actor did not come up (Ray's own start-up limit)
            raise PgExportError(f"Ray Serve's HTTP proxy did not start: {one_line(e, 200)}; check that port "
                                f"{config.port} is free and `ray status`, then try again") from None
        deployment = serve.deployment(
            serve.ingress(build_replica_app)(PaliGemmaReplica), name="pgexport", num_replicas=replicas,
            ray_actor_options={"num_cpus": threads, "num_gpus": 1 if config.provider == "cuda" else 0},
            max_ongoing_requests=config.max_batch + config.max_queue + SPARE_REQUESTS,
            graceful_shutdown_timeout_s=config.shutdown_timeout)
        try:
            serve.run(deployment.bind(), name="pgexport", route_prefix="/")
        except Exception as e:  # a replica that cannot load the model fails the deployment
            raise PgExportError(f"the Ray Serve deployment failed: {one_line(e, 300)}") from None
        print(f"pgexport serve: {config.served_name} ready on http://{config.host}:{config.port}/v1 "
              f"({replicas} Ray Serve replicas, {threads} threads each)", file=sys.stderr, flush=True)
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print("pgexport serve: stopping (replicas finish their requests first)", file=sys.stderr, flush=True)
        serve.shutdown()
    finally:
        if started:
            ray.shutdown()
