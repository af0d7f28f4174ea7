"""Measuring code shared by `pgexport bench` and the scripts in `benchmarks/` (no torch needed).

The machines these run on are small and shared, so every comparison is made *side by side in
one process*: the candidates are interleaved within each repeat (their order rotating from one
repeat to the next), warm-up runs are excluded, and results are reported as medians with a
spread (p10/p90 and min/max) and as ratios of medians.

    >>> from pgexport.bench.measure import interleaved, progress
    >>> runs = interleaved({"a": lambda: sum(range(1000)), "b": lambda: sum(range(2000))}, repeats=5)
    >>> runs["a"].stats.median < runs["b"].stats.median  # doctest: +SKIP
    True

Memory: `reset_peak_rss()` clears the kernel's high-water mark (`VmHWM`, via
`/proc/self/clear_refs`), so `peak_rss_bytes()` after a call gives that call's own peak; the
runner records `peak - rss_before` per call (the transient memory the call needed on top of
what was already resident). Where the reset is not allowed the value is the process peak.
It undercounts memory that the allocator reuses from earlier, already resident, freed blocks:
compare candidates in fresh processes (or first calls) when the transient size itself matters.

Results: `write_results(out, data, markdown)` writes `out.json` and `out.md`; `markdown_table`
builds the tables and `machine_info()` the block that every result file carries.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import onnxruntime

from pgexport.machine import cpu_flags

_T0 = time.perf_counter()


# --------------------------------------------------------------------------- progress
def progress(msg: str) -> None:
    """One line on stderr, prefixed with the seconds since the script started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- OpenMP
def set_omp_wait_policy(argv: Sequence[str], default: str = "passive") -> str:
    """Apply `--omp-wait-policy passive|active|default` from `argv` to `OMP_WAIT_POLICY`.

    Must run before torch is imported (the OpenMP runtime reads the variable when it loads), so
    scripts call it at the top, under `if __name__ == "__main__"`. Without the flag an
    `OMP_WAIT_POLICY` already in the environment is kept, else `default` applies. On a shared
    machine the ACTIVE (spinning) policy of libgomp lets idle OpenMP workers take cores from the
    main thread, and the penalty lands on arbitrary small ops. PASSIVE removes that artefact.
    Returns the policy in effect ("default" = the runtime's own).
    """
    policy = None
    for i, a in enumerate(argv):
        if a == "--omp-wait-policy" and i + 1 < len(argv):
            policy = argv[i + 1]
        elif a.startswith("--omp-wait-policy="):
            policy = a.split("=", 1)[1]
    if policy is None:
        if "OMP_WAIT_POLICY" in os.environ:
            return os.environ["OMP_WAIT_POLICY"].lower()
        policy = default
    if policy not in ("passive", "active", "default"):
        raise SystemExit(f"--omp-wait-policy must be passive, active or default, not {policy!r}")
    if "torch" in sys.modules:
        print("warning: torch already imported; OMP_WAIT_POLICY may not take effect", file=sys.stderr)
    if policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return policy


# --------------------------------------------------------------------------- statistics
def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Stats:
    """Summary of repeated timings, in seconds (or whatever unit the samples are in)."""

    n: int
    median: float
    p10: float
    p90: float
    min: float
    max: float
    mean: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: Iterable[float]) -> "Stats":
        s = [float(x) for x in samples]
        if not s:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, [])
        return cls(len(s), percentile(s, 50), percentile(s, 10), percentile(s, 90), min(s), max(s), sum(s) / len(s), s)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples")
        return d

    def spread(self) -> float:
        """(p90 - p10) / median: relative noise of the measurement."""
        return (self.p90 - self.p10) / self.median if self.median else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# --------------------------------------------------------------------------- memory
def _proc_kb(path: str, key: str) -> int | None:
    """A `KEY:   N kB` line of a /proc file (None where it cannot be read)."""
    try:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path(path).read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _status_kb(field_name: str) -> int | None:
    return _proc_kb("/proc/self/status", field_name)


def current_rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else 0


def peak_rss_bytes() -> int:
    """Peak resident set size: VmHWM (resettable) or getrusage's ru_maxrss (process lifetime)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, kB on Linux


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5). False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gib(nbytes: float) -> float:
    return nbytes / 2**30


# --------------------------------------------------------------------------- timing
@dataclass
class Run:
    seconds: float  # wall time of the call
    result: Any  # what the call returned (e.g. its own per-step timings)
    peak_extra_bytes: int  # peak RSS during the call minus RSS before it
    cpu_seconds: float = 0.0  # user + system CPU time of the process during the call (all threads)


@dataclass
class Measurement:
    name: str
    runs: list[Run]
    warmup: list[Run]

    @property
    def stats(self) -> Stats:
        return Stats.of(r.seconds for r in self.runs)

    @property
    def cpu_stats(self) -> Stats:
        """CPU seconds per call (all threads); cpu / wall well below the thread count means waiting."""
        return Stats.of(r.cpu_seconds for r in self.runs)

    @property
    def peak_extra_bytes(self) -> int:
        return max((r.peak_extra_bytes for r in self.runs + self.warmup), default=0)


def timed_call(fn: Callable[[], Any]) -> Run:
    """Run `fn` once: wall time (perf_counter), its result and its peak memory on top of RSS."""
    reset_peak_rss()
    before = current_rss_bytes()
    c0 = time.process_time()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return Run(seconds, result, max(0, peak_rss_bytes() - before), cpu)


def interleaved(
    candidates: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    label: str = "",
    verbose: bool = True,
    keep_results: bool = True,
) -> dict[str, Measurement]:
    """Time each candidate `repeats` times, interleaved, after `warmup` untimed calls each.

    Repeat r runs the candidates in an order rotated by r, so that neither always goes first
    (caches, turbo states and the neighbours' load then affect both alike). Each call's result is
    kept in `Run.result` unless `keep_results=False`: keeping large outputs makes every later call
    fault in fresh pages for its own, which the timing then includes.
    """
    names = list(candidates)
    out = {n: Measurement(n, [], []) for n in names}

    def call(n: str) -> Run:
        run = timed_call(candidates[n])
        if not keep_results:
            run.result = None
        return run

    for w in range(warmup):
        for n in names:
            run = call(n)
            out[n].warmup.append(run)
            if verbose:
                progress(f"{label} warm-up {w + 1}/{warmup} {n}: {run.seconds * 1e3:.1f} ms")
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            run = call(n)
            out[n].runs.append(run)
            if verbose:
                progress(f"{label} repeat {r + 1}/{repeats} {n}: {run.seconds * 1e3:.1f} ms (cpu {run.cpu_seconds / run.seconds:.2f}x wall)")
    return out


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1, label: str = "") -> Measurement:
    """One candidate alone (prefer `interleaved` for comparisons)."""
    return interleaved({label or "fn": fn}, repeats, warmup, label)[label or "fn"]


# --------------------------------------------------------------------------- machine info
def _versions(packages: Iterable[str]) -> dict[str, str | None]:
    out = {}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meminfo_kb(key: str) -> int | None:
    return _proc_kb("/proc/meminfo", key)


def _git(repo: Path) -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _gpus() -> list[str]:
    """GPU names from nvidia-smi (empty without an NVIDIA driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        return []


def _ort_providers() -> list[str]:
    return onnxruntime.get_available_providers()


def machine_info(extra_packages: Iterable[str] = ()) -> dict[str, Any]:
    """CPU, cores, threads, memory, load, library versions and the repository's commit."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gib": round(gib((meminfo_kb("MemTotal") or 0) * 1024), 2),
        "mem_available_gib": round(gib((meminfo_kb("MemAvailable") or 0) * 1024), 2),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(["torch", "transformers", "numpy", "safetensors", "onnx", "onnxruntime", "pgexport", *extra_packages]),
        "git": _git(Path(__file__).resolve().parent.parent),
        "gpus": _gpus(),
        "onnxruntime_providers": _ort_providers(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "ONEDNN_DEFAULT_FPMATH_MODE", "LD_PRELOAD") if k in os.environ},
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
        info["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
        info["torch_mkl"] = bool(torch.backends.mkl.is_available())
        info["torch_cpu_capability"] = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return info


def machine_markdown(info: dict[str, Any]) -> str:
    v = info.get("versions", {})
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines = [
        f"- CPU: {info['cpu_model']} ({info['usable_cores']} usable / {info['logical_cores']} logical cores; {', '.join(info['cpu_flags'])})",
        f"- torch threads: {info.get('torch_threads')} (interop {info.get('torch_interop_threads')}), CPU capability {info.get('torch_cpu_capability')}",
        f"- memory: {info['mem_total_gib']} GiB total, {info['mem_available_gib']} GiB available at start; load average {info.get('load_avg_1_5_15')}",
        f"- {info['platform']}, Python {info['python']}; {libs}",
        f"- git: {info['git'].get('commit')}{' (dirty)' if info['git'].get('dirty') else ''}",
    ]
    if info.get("gpus"):
        lines.append(f"- GPU: {', '.join(info['gpus'])}")
    if info.get("onnxruntime_providers"):
        lines.append(f"- ONNX Runtime providers: {', '.join(info['onnxruntime_providers'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- output
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(seconds: float, digits: int = 1) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.{digits}f}"


def fmt_stats_ms(s: Stats, digits: int = 1) -> str:
    """`median (p10-p90)` in milliseconds."""
    return f"{fmt_ms(s.median, digits)} ({fmt_ms(s.p10, digits)}-{fmt_ms(s.p90, digits)})"


def jsonable(x: Any) -> Any:
    if isinstance(x, Stats):
        return x.to_dict()
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        try:
            return x.item()
        except (ValueError, RuntimeError):
            pass
    return x


def write_results(out: str | Path, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `out.json` and `out.md` (any suffix on `out` is replaced)."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    jpath.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return jpath, mpath
