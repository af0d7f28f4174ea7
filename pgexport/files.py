"""Write files and folders so that a reader never sees a half-written one.

Every command that writes a folder (checkpoints, exports, quantized folders, training
checkpoints) builds it in a hidden staging folder beside the target and renames it into place at
the end; an existing target is replaced only then. Single files (a manifest, a report) are
written to a temporary name in the same folder and renamed over the target.

    >>> tmp = staging_folder(out)                  # doctest: +SKIP
    >>> ...write files into tmp...                 # doctest: +SKIP
    >>> move_into_place(tmp, out)                  # doctest: +SKIP
    >>> write_text_atomic(out / "notes.txt", "done\\n")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_folder(out: str | os.PathLike) -> Path:
    """A new hidden folder `.NAME.tmp-*` beside `out` (same file system, so the final rename is
    atomic), with an ordinary folder's permissions (mkdtemp makes it 0700)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def move_into_place(folder: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished `folder` to `out`; an existing `out` is moved aside first and removed
    only after the rename, so `out` is never missing or partial."""
    folder, out = Path(folder), Path(out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(folder, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(folder, out)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder, then rename."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cache_dir(kind: str) -> Path:
    """pgexport's cache folder for `kind` ("exports", "bench", "traces"): `$PGEXPORT_CACHE/kind`,
    by default `~/.cache/pgexport/kind` (not created here).

    >>> cache_dir("traces")  # doctest: +SKIP
    PosixPath('/home/me/.cache/pgexport/traces')
    """
    return Path(os.environ.get("PGEXPORT_CACHE", Path.home() / ".cache" / "pgexport")) / kind
