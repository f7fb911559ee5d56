"""Reading small files: a regular file, size-capped, read only when it is the file looked at; every failure is
one TopiError line. Also what identifies a file's bytes (``file_identity``)."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from topi_export.errors import TopiError

MAX_JSON_BYTES = 16 << 20  # manifests, profiles and configs are kilobytes


def _what_is(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def _size_text(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


def read_small_file(path, what: str, fix: str, *, max_bytes: int = MAX_JSON_BYTES, follow_symlinks: bool = False,
                    noun: str = "file", missing: str | None = None) -> bytes:
    """The bytes of a small regular file, or a one-line TopiError ``"{what} {path} ...: {fix}"``.

    lstat first (``follow_symlinks``: stat, for files a user names, e.g. a Hugging Face snapshot's links): a
    FIFO, device, socket, directory or (unless followed) symbolic link is refused without being opened, so
    ``/dev/zero`` or a FIFO can neither eat memory nor hang; larger than ``max_bytes`` is refused from its size;
    the file opened (O_NOFOLLOW, O_NONBLOCK) must be the one looked at, and at most ``max_bytes + 1`` bytes are
    read. ``missing``: the whole message when the file does not exist."""
    path = Path(path)

    def refuse(reason):
        return TopiError(f"{what} {path} is not a regular {noun} of at most {_size_text(max_bytes)} ({reason}): {fix}")

    try:
        st = os.stat(path) if follow_symlinks else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise TopiError(missing or f"{what} {path} not found: {fix}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise TopiError(f"cannot read {what} {path} ({getattr(exc, 'strerror', None) or exc}): {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise refuse(_what_is(st.st_mode))
    if st.st_size > max_bytes:
        raise refuse(f"{st.st_size} bytes")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refuse("a symbolic link") from None
        raise TopiError(f"cannot read {what} {path} ({exc.strerror}): {fix}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            now = os.fstat(f.fileno())
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise TopiError(f"{what} {path} was replaced while it was read: rerun when nothing else writes it")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise TopiError(f"cannot read {what} {path} ({exc.strerror}): {fix}") from None
    if len(data) > max_bytes:
        raise refuse(f"more than {max_bytes} bytes")
    return data


def read_json_file(path, what: str, fix: str, *, max_bytes: int = MAX_JSON_BYTES, follow_symlinks: bool = False,
                   missing: str | None = None):
    """A small JSON file (manifest, calibration profile, model or scheduler config, ONNX cache index) read with
    ``read_small_file``'s rules, then parsed; every failure is one TopiError line naming ``what`` and ``fix``:
    not UTF-8, invalid JSON, nesting deep enough to exhaust the recursion limit, numbers longer than Python's
    int conversion limit (4300 digits)."""
    data = read_small_file(path, what, fix, max_bytes=max_bytes, follow_symlinks=follow_symlinks, noun="JSON file",
                           missing=missing)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text: byte {exc.start}"
    except RecursionError:
        reason = "nested too deeply"
    except json.JSONDecodeError as exc:
        reason = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:  # int("9" * 5000): the interpreter's integer string conversion limit
        reason = "a number with too many digits" if "digits" in str(exc) else str(exc)[:120]
    raise TopiError(f"{what} {Path(path)} is not valid JSON ({reason}): {fix}")


def file_identity(st: os.stat_result) -> str:
    """What changes when a file's bytes may have changed: a rewrite moves mtime and ctime, a copy is a new inode."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
