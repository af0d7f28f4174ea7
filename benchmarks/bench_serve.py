"""Load test of `pgexport serve`: latency and throughput at fixed concurrency, as `vllm bench serve`
measures them, for the engine with 8 rows and with 1 (no batching).

    python benchmarks/bench_serve.py                                  # the built-in demo model
    python benchmarks/bench_serve.py --model /tmp/b3-6l/int4 --requests 16 --max-tokens 32 \\
        --out benchmarks/results/serve_3b_6l_int4
    python benchmarks/bench_serve.py --soak 600                       # RSS over 10 minutes, concurrency 8

For each `--max-batch` (default 8, then 1) the script starts `pgexport serve` itself (a
subprocess on a free port of 127.0.0.1, stopped with SIGTERM at the end), warms it up, and runs
each concurrency level (default 1, 4, 8, 16): `--requests` streamed chat completions, at most
that many in flight at once, cycling over the bundled sample images and a caption, a detection
and a question prompt. With `--ignore-eos` (the default, as vllm bench serve does for synthetic
data) every answer is exactly `--max-tokens` tokens, so the levels compare like with like.

Measured by the client (asyncio + httpx, reading the server-sent events):
* TTFT: sending the request -> the first chunk (it comes with the first token, which may print
  nothing: an empty answer, as `detect` of an absent shape gives, is a served request);
* TPOT: per request, (E2EL - TTFT) / (output tokens - 1);
* ITL: every gap between two consecutive chunks with text, pooled over the requests (a token
  that prints nothing sends no chunk, so a gap may span several tokens);
* E2EL: sending the request -> the last event;
* requests/s and output tokens/s over the level's wall time; failed requests (any non-200,
  or a stream that ends without a finish reason).
Mean, p50, p90 and p99 of each. The client runs on the same machine as the server and takes
some of its cores: on a small machine the figures include that.

`--soak SECONDS`: concurrency 8 against one server (`--max-batch 8`) for that long, sampling the
server's RSS every 10 s; reports RSS after the first minute against the end (a leak shows as
growth), with the requests served and failed.

Writes `--out`.json and .md (default benchmarks/results/serve, or serve_soak with --soak).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine_markdown, markdown_table, progress, write_report  # noqa: E402
from pgexport.bundled import DEMO_DIR, SAMPLE_IMAGE  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["caption en", "detect circle", "answer en how many shapes are there?"]
IMAGES = [SAMPLE_IMAGE, *sorted((DEMO_DIR / "samples").glob("*.png"))]
RSS_EVERY = 10.0  # seconds between RSS samples in --soak


# --------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pgexport serve` in a subprocess, its log in a temporary folder."""

    def __init__(self, model: str | None, max_batch: int, max_tokens: int, threads: int | None, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"serve-b{max_batch}.log"
        cmd = [sys.executable, "-m", "pgexport.cli", "serve", "--port", str(self.port), "--max-batch", str(max_batch),
               "--max-queue", "256", "--max-new-tokens", str(max_tokens), "--served-model-name", "bench"]
        cmd += ["--model", model] if model else []
        cmd += ["--threads", str(threads)] if threads else []
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not get ready in {timeout} s")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- the client
def request_bodies(count: int, max_tokens: int, ignore_eos: bool) -> list[dict]:
    urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in IMAGES]
    return [{"model": "bench", "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
             "ignore_eos": ignore_eos,
             "messages": [{"role": "user", "content": [
                 {"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
                 {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}}]}]}
            for i in range(count)]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Send one streamed request; the client-side clock readings of its events."""
    sent = time.perf_counter()
    text_times, usage, finish, error, first = [], None, None, None, None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]["message"]
                        break
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices", []):
                        # The first chunk (the role) comes with the first token, which may print
                        # nothing: an empty answer ("detect" of an absent shape) is an answer too.
                        first = first or time.perf_counter()
                        if choice["delta"].get("content"):
                            text_times.append(time.perf_counter())
                        finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    ok = error is None and finish is not None and first is not None
    return {"ok": ok, "error": error if not ok else None, "sent": sent, "end": end, "first": first,
            "text_times": text_times,
            "prompt_tokens": usage["prompt_tokens"] if usage else 0,
            "output_tokens": usage["completion_tokens"] if usage else 0}


async def run_level(url: str, bodies: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """Every body through at most `concurrency` requests in flight; (records, wall seconds)."""
    queue = list(reversed(bodies))
    records = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        async def worker():
            while queue:
                records.append(await one_request(client, url, queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, time.perf_counter() - start


def stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}}


def summarize(records: list[dict], seconds: float) -> dict:
    good = [r for r in records if r["ok"]]
    ttft = [r["first"] - r["sent"] for r in good]
    e2el = [r["end"] - r["sent"] for r in good]
    tpot = [(r["end"] - r["first"]) / (r["output_tokens"] - 1) for r in good if r["output_tokens"] > 1]
    itl = [b - a for r in good for a, b in zip(r["text_times"], r["text_times"][1:])]
    out_tokens = sum(r["output_tokens"] for r in good)
    return {"requests": len(records), "failed": len(records) - len(good), "seconds": seconds,
            "requests_per_s": len(good) / seconds, "output_tokens_per_s": out_tokens / seconds,
            "total_tokens_per_s": (out_tokens + sum(r["prompt_tokens"] for r in good)) / seconds,
            "mean_output_tokens": out_tokens / len(good) if good else 0,
            "ttft_s": stats(ttft), "tpot_s": stats(tpot), "itl_s": stats(itl), "e2el_s": stats(e2el),
            "errors": sorted({r["error"] for r in records if r["error"]})[:5]}


# --------------------------------------------------------------------------- modes
def bench_levels(args, log_dir: Path) -> dict:
    runs = {}
    for max_batch in args.max_batch:
        progress(f"starting pgexport serve --max-batch {max_batch}")
        server = Server(args.model, max_batch, args.max_tokens, args.threads, log_dir)
        try:
            server.wait_ready()
            warm = request_bodies(max(2, max_batch), args.max_tokens, args.ignore_eos)
            asyncio.run(run_level(server.url, warm, max(2, max_batch)))  # sessions warmed, pages touched
            for concurrency in args.concurrency:
                load = os.getloadavg()[0]
                bodies = request_bodies(args.requests, args.max_tokens, args.ignore_eos)
                records, seconds = asyncio.run(run_level(server.url, bodies, concurrency))
                s = summarize(records, seconds)
                s.update(max_batch=max_batch, concurrency=concurrency, load_avg_1min_before=load)
                runs[f"b{max_batch}-c{concurrency}"] = s
                progress(f"  max-batch {max_batch}, concurrency {concurrency}: {s['requests_per_s']:.2f} req/s, "
                         f"{s['output_tokens_per_s']:.1f} tok/s, TTFT p50 {fmt(s['ttft_s']['p50'])} ms, "
                         f"TPOT p50 {fmt(s['tpot_s']['p50'])} ms, failed {s['failed']}")
        finally:
            server.stop()
    return runs


def soak(args, log_dir: Path) -> dict:
    progress(f"soak: concurrency 8, max-batch 8, {args.soak:.0f} s")
    server = Server(args.model, 8, args.max_tokens, args.threads, log_dir)
    samples: list[tuple[float, int]] = []
    try:
        server.wait_ready()
        bodies = request_bodies(8, args.max_tokens, args.ignore_eos)
        records: list[dict] = []

        async def main():
            limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
            async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
                start = time.perf_counter()

                async def worker(i):
                    while time.perf_counter() - start < args.soak:
                        records.append(await one_request(client, server.url, bodies[i]))

                async def sampler():
                    while time.perf_counter() - start < args.soak:
                        samples.append((time.perf_counter() - start, server.rss_bytes()))
                        await asyncio.sleep(RSS_EVERY)
                    samples.append((time.perf_counter() - start, server.rss_bytes()))

                await asyncio.gather(sampler(), *(worker(i) for i in range(8)))
                return time.perf_counter() - start

        seconds = asyncio.run(main())
    finally:
        server.stop()
    after_minute = next((rss for t, rss in samples if t >= 60), samples[0][1])
    summary = summarize(records, seconds)
    summary.update(rss_samples=[{"t_s": t, "rss_mib": rss / 2**20} for t, rss in samples],
                   rss_after_first_minute_mib=after_minute / 2**20, rss_end_mib=samples[-1][1] / 2**20,
                   rss_growth_mib=(samples[-1][1] - after_minute) / 2**20)
    progress(f"  RSS {summary['rss_after_first_minute_mib']:.1f} MiB after the first minute, "
             f"{summary['rss_end_mib']:.1f} MiB at the end; {len(records)} requests, {summary['failed']} failed")
    return summary


# --------------------------------------------------------------------------- report
def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def render(result: dict, command: str) -> str:
    lines = ["# `pgexport serve` under load", "", f"`{command}`", "",
             f"Model: `{result['model']}`. Streamed chat completions, {result['max_tokens']} tokens each"
             f"{' (eos ignored, so every answer has that length)' if result['ignore_eos'] else ''}; prompts cycle over "
             f"{', '.join(repr(p) for p in PROMPTS)} and the {len(IMAGES)} bundled sample images. The client (asyncio "
             "+ httpx) runs on the same machine as the server. Latencies in ms, measured by the client: TTFT to the "
             "first chunk (it comes with the first token), TPOT = (E2EL - TTFT) / (tokens - 1) per request, ITL every gap between chunks "
             "with text, E2EL to the end of the stream. The server sends a chunk when a token adds text; tokens "
             "that print nothing (special tokens, as a model writes after an ignored eos) add none, so an ITL gap "
             "can span several tokens, and TPOT is the per-token figure.", ""]
    if "soak" in result:
        s = result["soak"]
        lines += [f"## Soak: concurrency 8, `--max-batch 8`, {result['soak_seconds']:.0f} s", "",
                  f"Server RSS {s['rss_after_first_minute_mib']:.1f} MiB after the first minute, "
                  f"{s['rss_end_mib']:.1f} MiB at the end ({s['rss_growth_mib']:+.1f} MiB); {s['requests']} requests, "
                  f"{s['failed']} failed, {s['requests_per_s']:.2f} requests/s, {s['output_tokens_per_s']:.1f} "
                  "output tokens/s.", "",
                  markdown_table(["t (s)", "RSS (MiB)"], [[f"{x['t_s']:.0f}", f"{x['rss_mib']:.1f}"]
                                                          for x in s["rss_samples"]]), ""]
    if result.get("runs"):
        rows = []
        for r in result["runs"].values():
            rows.append([r["max_batch"], r["concurrency"], f"{r['requests'] - r['failed']}/{r['requests']}",
                         f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.1f}",
                         *(f"{fmt(r[m]['mean'])} / {fmt(r[m]['p50'])} / {fmt(r[m]['p90'])} / {fmt(r[m]['p99'])}"
                           for m in ("ttft_s", "tpot_s", "itl_s", "e2el_s")),
                         f"{r['load_avg_1min_before']:.1f}"])
        lines += [f"## {result['requests']} requests per level", "",
                  markdown_table(["max-batch", "concurrency", "ok", "requests/s", "output tok/s",
                                  "TTFT mean / p50 / p90 / p99", "TPOT mean / p50 / p90 / p99",
                                  "ITL mean / p50 / p90 / p99", "E2EL mean / p50 / p90 / p99", "load avg before"],
                                 rows), ""]
    lines += [machine_markdown(result["machine"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="export folder, checkpoint or preset (default: the built-in model)")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (and the server's --max-new-tokens)")
    ap.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels")
    ap.add_argument("--max-batch", default="8,1", help="comma-separated --max-batch values, one server each")
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads (default: every core)")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate exactly --max-tokens per answer (default: yes)")
    ap.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                    help="instead of the levels: concurrency 8 for SECONDS, server RSS every 10 s")
    ap.add_argument("--out", default=None, help="results path without suffix (default: results/serve[_soak])")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.max_batch = [int(b) for b in args.max_batch.split(",")]
    out = args.out or str(RESULTS / ("serve_soak" if args.soak else "serve"))
    result = {"model": args.model or "the built-in demo model", "max_tokens": args.max_tokens,
              "ignore_eos": args.ignore_eos, "requests": args.requests, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench_serve-") as tmp:
        if args.soak:
            result["soak_seconds"] = args.soak
            result["soak"] = soak(args, Path(tmp))
        else:
            result["runs"] = bench_levels(args, Path(tmp))
    return write_report(out, result, render, "bench_serve.py", argv,
                        packages=("onnxruntime", "numpy", "starlette", "uvicorn", "httpx"))


if __name__ == "__main__":
    sys.exit(main())
