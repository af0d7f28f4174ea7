"""Write a folder where a finished one would be, without ever leaving a half-written one there.

Every command that writes a folder (checkpoints, exports, quantized folders, training
checkpoints) builds it in a hidden staging folder beside the target and renames it into place at
the end; an existing target is replaced only then.

    >>> tmp = staging_folder(out)                  # doctest: +SKIP
    >>> ...write files into tmp...                 # doctest: +SKIP
    >>> move_into_place(tmp, out)                  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def staging_folder(out: str | os.PathLike) -> Path:
    """A new hidden folder `.NAME.tmp-*` beside `out` (same file system, so the final rename is
    atomic), with an ordinary folder's permissions (mkdtemp makes it 0700)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
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
