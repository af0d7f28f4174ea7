"""What this machine's CPU can do (torch-free; read by training and by the benchmarks)."""

from __future__ import annotations

from pathlib import Path

# The instruction sets that change which kernels PyTorch and ONNX Runtime pick.
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    """The interesting CPU flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in INTERESTING_FLAGS if f in have)
    except OSError:
        pass
    return []
