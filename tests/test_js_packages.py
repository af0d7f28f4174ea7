"""js_packages: the JavaScript tests' npm packages are installed on first use from the folder's lock
file, once, and the tests skip only where node / npm are missing or the registry is unreachable.

The folder here is a tiny one (one package of examples/node's, no dependencies of its own) with
an empty npm cache, so the install really fetches from the registry.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pytest

from js_packages import MARKER, error_lines, install_npm_packages, network_error

PACKAGE = {"name": "pgexport-npm-install-test", "private": True, "dependencies": {"@huggingface/tokenizers": "0.2.0"}}
LOCK = {
    "name": "pgexport-npm-install-test",
    "lockfileVersion": 3,
    "requires": True,
    "packages": {
        "": {"name": "pgexport-npm-install-test", "dependencies": {"@huggingface/tokenizers": "0.2.0"}},
        "node_modules/@huggingface/tokenizers": {
            "version": "0.2.0",
            "integrity": "sha512-LidMHe1FpcSYH4vcSjXooda34pC0M8m1gmDOv7SQi6Iv+ib1zX7J3sHBCC9/3FPCkn2k1b55FneVqMRxrr99pg==",
            "license": "Apache-2.0",
        },
    },
}
needs_npm = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                               reason="node / npm are not installed")


@pytest.fixture
def folder(tmp_path):
    """A JavaScript folder as committed: package.json and package-lock.json, no node_modules."""
    folder = tmp_path / "js"
    folder.mkdir()
    (folder / "package.json").write_text(json.dumps(PACKAGE, indent=2) + "\n")
    (folder / "package-lock.json").write_text(json.dumps(LOCK, indent=2) + "\n")
    return folder


def no_npm(*args, **kwargs):
    raise AssertionError(f"npm ran: {args}")


@needs_npm
def test_installs_the_locked_packages_once(folder, tmp_path, monkeypatch):
    cache = tmp_path / "npm-cache"
    assert install_npm_packages(folder, cache)
    installed = json.loads((folder / "node_modules" / "@huggingface" / "tokenizers" / "package.json").read_text())
    assert installed["version"] == "0.2.0"
    marker = folder / "node_modules" / MARKER
    assert marker.read_bytes() == (folder / "package-lock.json").read_bytes()

    # Installed: the next call (another test, another xdist worker) leaves node_modules alone.
    written = marker.stat().st_mtime_ns
    with monkeypatch.context() as m:
        m.setattr(subprocess, "run", no_npm)
        assert not install_npm_packages(folder, cache)
    assert marker.stat().st_mtime_ns == written

    # node_modules from another lock file (or an interrupted install) is installed again.
    marker.write_text("{}\n")
    assert install_npm_packages(folder, cache)
    assert marker.read_bytes() == (folder / "package-lock.json").read_bytes()


@needs_npm
def test_skips_where_the_registry_is_unreachable(folder, tmp_path, monkeypatch):
    with socket.socket() as closed:  # bound, not listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{closed.getsockname()[1]}/")
        monkeypatch.setenv("npm_config_fetch_retries", "0")
        with pytest.raises(pytest.skip.Exception, match=r"registry is unreachable \(ECONNREFUSED\)"):
            install_npm_packages(folder, tmp_path / "empty-cache")
    assert not (folder / "node_modules" / MARKER).exists()


@needs_npm
def test_fails_on_any_other_npm_error(folder, tmp_path):
    (folder / "package-lock.json").write_text('{"name": "pgexport-npm-install-test",')  # cut short
    with pytest.raises(pytest.fail.Exception, match=r"npm ci in .* failed \(exit 1\): npm error code EUSAGE") as failed:
        install_npm_packages(folder, tmp_path / "npm-cache")
    assert "\n" not in str(failed.value) and "package-lock.json" in str(failed.value)
    assert "Usage" not in str(failed.value)  # npm's help text after the error is left out
    assert not (folder / "node_modules" / MARKER).exists()


def test_skips_without_node_or_npm(folder, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    monkeypatch.setattr(subprocess, "run", no_npm)
    with pytest.raises(pytest.skip.Exception, match="node is not installed"):
        install_npm_packages(folder, folder / "npm-cache")


@pytest.mark.parametrize("stderr,code", [
    ("npm error code ENOTFOUND\nnpm error syscall getaddrinfo\nnpm error network request to "
     "https://registry.npmjs.org/onnxruntime-node failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org\n", "ENOTFOUND"),
    ("npm error code ECONNREFUSED\nnpm error FetchError: request to http://127.0.0.1:9/x failed\n", "ECONNREFUSED"),
    ("npm error code ETIMEDOUT\nnpm error network request to https://registry.npmjs.org/long failed\n", "ETIMEDOUT"),
    ("npm error code EAI_AGAIN\n", "EAI_AGAIN"),
    ("npm ERR! code ECONNRESET\nnpm ERR! network aborted\n", "ECONNRESET"),  # npm before 10
    # Not the network: the test fails.
    ("npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/no-such-package\n", None),
    ("npm error code EUSAGE\nnpm error `npm ci` can only install packages when your package.json and "
     "package-lock.json are in sync\n", None),
    ("npm error code EINTEGRITY\nnpm error sha512-... integrity checksum failed (ETIMEDOUT in a file name)\n", None),
    ("npm error code ENOSPC\nnpm error syscall write\n", None),
    ("", None),
])
def test_network_errors_are_told_from_other_failures(stderr, code):
    assert network_error(stderr) == code


def test_the_failure_message_shows_npms_error():
    stderr = ("npm warn deprecated glob@7.2.3: Glob versions prior to v9 are no longer supported\n"
              "npm error code ETARGET\nnpm error notarget No matching version found for long@9.9.9.\n"
              "npm error\nnpm error A complete log of this run can be found in: /tmp/x.log\n")
    assert error_lines(stderr) == ["npm error code ETARGET", "npm error notarget No matching version found for long@9.9.9.",
                                   "npm error A complete log of this run can be found in: /tmp/x.log"]
    assert error_lines("killed\n\n") == ["killed"]  # no error report: the last lines
