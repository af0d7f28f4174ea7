"""npm packages of the JavaScript folders the tests run (tests/js, examples/node, examples/web),
installed on first use from each folder's committed package-lock.json.

`install_npm_packages(folder)` runs `npm ci` in `folder` unless its node_modules already holds the
lock file's packages: node_modules/.installed-lock.json, a copy of package-lock.json written after
a successful install, says so. One `npm ci` at a time per npm cache, under a file lock: the
pytest-xdist workers share it, so each folder is installed once and a worker that waited finds the
marker. The npm cache is the checkout's `.npm-cache` (git-ignored): re-installing from it works
offline.

The test skips where `node` / `npm` are missing or the npm registry cannot be reached; any other
npm failure fails it with npm's error lines.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NPM_CACHE = ROOT / ".npm-cache"
MARKER = ".installed-lock.json"  # in node_modules
CODE = r"^npm (?:error|ERR!) code (\S+)"  # the first line of npm's error report
# npm's `code` for a registry it cannot reach (DNS, refused, reset, timed out, no route).
NETWORK_ERRORS = frozenset({"ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ESOCKETTIMEDOUT",
                            "ERR_SOCKET_TIMEOUT", "ENETUNREACH", "EHOSTUNREACH"})


def installed(folder: Path) -> bool:
    """node_modules holds the packages of folder's package-lock.json (npm ci ran on this lock)."""
    marker = folder / "node_modules" / MARKER
    return marker.is_file() and marker.read_bytes() == (folder / "package-lock.json").read_bytes()


def network_error(stderr: str) -> str | None:
    """The error code in npm's output when it is one of a registry it cannot reach, else None."""
    codes = re.findall(CODE, stderr, re.MULTILINE)
    return next((code for code in codes if code in NETWORK_ERRORS), None)


def error_lines(stderr: str, n: int = 4) -> list[str]:
    """npm's error, shortly: n lines from its last `code` line on (npm follows some errors with
    its usage text), or its last n lines; blank lines left out."""
    lines = [line for line in stderr.splitlines() if line.strip() not in ("", "npm error", "npm ERR!")]
    codes = [i for i, line in enumerate(lines) if re.match(CODE, line)]
    start = codes[-1] if codes else max(len(lines) - n, 0)
    return lines[start:start + n]


def install_npm_packages(folder: Path, cache: Path = NPM_CACHE) -> bool:
    """Install folder's npm packages from its package-lock.json unless they are; True if npm ran."""
    folder = Path(folder)
    if installed(folder):
        return False
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: cannot install the npm packages of {folder}")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed(folder):  # another worker installed it while this one waited
            return False
        # --ignore-scripts: onnxruntime-node's install script downloads GPU binaries from a host
        # that may be unreachable; its CPU binaries ship in the package.
        run = subprocess.run(["npm", "ci", "--ignore-scripts", "--prefer-offline", "--no-audit", "--no-fund",
                              "--cache", str(cache)], cwd=folder, capture_output=True, text=True)
        if run.returncode != 0:
            code = network_error(run.stderr)
            if code:
                pytest.skip(f"the npm registry is unreachable ({code}): cannot install the npm packages of {folder}")
            pytest.fail(f"npm ci in {folder} failed (exit {run.returncode}): {' | '.join(error_lines(run.stderr))}",
                        pytrace=False)
        shutil.copyfile(folder / "package-lock.json", folder / "node_modules" / MARKER)
    return True
