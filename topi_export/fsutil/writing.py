"""An output file written whole or not at all (``atomic_write_bytes``); inside a directory topi-export owns, the
file is added to that directory's marker."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from topi_export.fsutil.outputs import _cut, _special_output, _umask, _write_error
from topi_export.fsutil.ownership import _adopt, _marked_owner


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file next to it, renamed over it. An existing ``path`` that
    is not a regular file is refused (checked when called and again right before the rename; a link is never
    followed); write errors (no space, read-only file system, a name too long) are one-line TopiErrors and leave
    no temporary file behind. A file written inside a directory topi-export owns (``run --png
    engines/default/demo.png``, README) is recorded in that directory's marker: a later ``--force`` replaces it
    with the rest, while a file the user put there still makes the directory "not ours"."""
    path = Path(os.path.abspath(os.fspath(path)))
    _refuse_special(path)
    owner = _marked_owner(path)  # before anything new appears next to it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{_cut(path.name, 200)}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp files are private; artifacts are read by other users (Triton)
        _refuse_special(path)  # again: something may have been put there while we wrote
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise
    if owner is not None:
        _adopt(owner, path)


def _refuse_special(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise _special_output(path, mode)
