"""Filesystem safety: artifacts appear whole or not at all, never over something this user's topi-export did not
make, outputs never replace special files, small JSON files are read bounded, and paths read from an engine
directory (manifest entries, ONNX external data) stay inside it. docs/design.md, "Filesystem safety";
docs/reliability.md lists the cases and their tests.

Output directories (engine directories, Triton repositories, ONNX caches) are written with ``staged_dir``:

    check_output_dir(out, replace=force, is_ours=owned_by(ENGINE_DIR), protect={model_dir: "the model folder"})
    with staged_dir(out, replace=force, is_ours=owned_by(ENGINE_DIR), protect=..., echo=echo) as tmp:
        ...write everything into tmp...

Ownership: when the block succeeds, ``staged_dir`` writes ``MARKER_FILE`` last into the tree: the kind of output
and every entry below it with its size, authenticated by an HMAC under a per-user key (``owner_key``: created on
first use, mode 0600). ``--force`` replaces a directory only when it is empty, or its marker verifies under this
user's key, names the kind asked for, and lists everything the directory holds. A git clone, a notes folder, a
copy of another user's output or a hand-written marker never passes; a tool-made tree the user added a file to
is refused with the names of the extra entries.

Staging: ``tmp`` is ``PARENT/.NAME.staging-<random>/new``. The staging directory holds ``lock``, a ``filelock``
lock its run holds for its whole life, and ``final`` (NAME). A staging directory whose lock can be taken belongs
to a dead run and is removed (``clean_stale_staging``); the kernel drops a killed process's lock, so no pid, start
time or boot id is needed.

Placement is atomic and exclusive: when ``NAME`` does not exist it is created by a rename that fails if anything
appeared there meanwhile (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere, or where the filesystem refuses the
flag, ``mkdir(NAME)`` claims the name and the rename then replaces only that empty placeholder, failing if someone
wrote into it). A plain ``rename`` would silently replace an empty directory, and a check before the work would race
with anything created during it. With ``replace=True`` an existing ``NAME`` is replaced only when ``is_ours`` says
this tool made it and it is still the tree this command saw when it started (another run's result placed meanwhile
is kept and this command fails saying so): it is moved into the staging directory (and checked again there), the
new tree is moved in exclusively, then the old one is deleted. Nothing is deleted that was not verified as ours.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from topi_export.errors import TopiError

MARKER_FILE = ".topi-export-owner.json"
MARKER_FORMAT = "topi-export-owner/1"
ENGINE_DIR, TRITON_REPOSITORY, ONNX_CACHE = "engine-directory", "triton-repository", "onnx-cache"
KINDS = {ENGINE_DIR: "an engine directory", TRITON_REPOSITORY: "a Triton model repository",
         ONNX_CACHE: "an ONNX cache (--onnx-dir)"}
KEY_ENV = "TOPI_EXPORT_KEY_FILE"  # where the per-user key lives (tests point it at a temporary file)
LOCK_FILE, FINAL_FILE = "lock", "final"
# fixed names inside a staging directory (never the final name: it could be "old"). "old" is a previous final
# parked during a replacement, restored if the run dies; once the new tree is placed it becomes "replaced", which
# nothing restores (a concurrent --force build may have moved our new tree aside; restoring "old" would undo both)
_NEW, _OLD, _REPLACED = "new", "old", "replaced"
NAME_MAX, PATH_MAX = 255, 4096  # bytes, Linux; os.pathconf gives the real name limit where it can
_STAGING_NAME_BYTES = 200  # ".NAME.staging-XXXXXXXX" adds 18 bytes; names are cut in bytes, not characters
MAX_JSON_BYTES = 16 << 20  # manifests, profiles and configs are kilobytes
MAX_MARKER_BYTES = 8 << 20
MAX_MARKER_ENTRIES = 100_000
_SPACE_ERRORS = {errno.ENOSPC: "no space left on the device", getattr(errno, "EDQUOT", -1): "disk quota exceeded",
                 errno.EFBIG: "a file is too large for the file system", errno.EROFS: "read-only file system"}


# --- reading small files -----------------------------------------------------------------------------------------
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


# --- output paths ------------------------------------------------------------------------------------------------
def _resolve(path) -> Path:
    return Path(os.path.abspath(os.fspath(path))).resolve()


def _name_max(path: Path) -> int:
    anc = path
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    try:
        n = os.pathconf(anc, "PC_NAME_MAX")  # e.g. 143 on eCryptfs
        return n if 14 <= n <= NAME_MAX else NAME_MAX
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def check_name_lengths(path, what: str = "output path") -> None:
    """Refuse, before any work, a path the file system cannot hold: a name longer than the file system allows
    (counted in bytes: 85 CJK characters are 255 bytes) or a whole path over PATH_MAX."""
    s = os.path.abspath(os.fspath(path))
    try:
        total = len(os.fsencode(s))
    except UnicodeEncodeError:
        raise TopiError(f"{what} {s!r} cannot be encoded as a file name: choose another name") from None
    if total >= PATH_MAX:
        raise TopiError(f"{what} is {total} bytes long, more than the {PATH_MAX - 1} a path may have: choose a "
                        f"shorter path")
    limit = _name_max(Path(s))
    for part in Path(s).parts[1:]:
        n = len(os.fsencode(part))
        if n > limit:
            shown = part if len(part) <= 40 else part[:40] + "..."
            raise TopiError(f"{what} {shown!r}: a name of {n} bytes, more than the {limit} bytes a file name may "
                            f"have here: choose a shorter name")


def _check_creatable(directory: Path, target: Path) -> None:
    """``directory`` exists or can be created, is a directory, and new entries can really be made in it: a probe
    directory is created and removed in the nearest existing ancestor, so /proc, /sys and read-only mounts are
    refused up front even for root."""
    anc = directory
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not os.path.isdir(anc):
        raise TopiError(f"cannot create {target}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise TopiError(f"cannot create {target}: no write permission in {anc}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".topi-export-probe-", dir=anc))
    except OSError as exc:
        reason = _SPACE_ERRORS.get(exc.errno) or exc.strerror or type(exc).__name__
        raise TopiError(f"cannot create {target}: {anc} does not accept new files ({reason}): choose another "
                        f"path") from None


def check_writable(path) -> Path:
    """Before the work starts: ``path`` (a report JSON, latents, a PNG) can be written as a regular file: its name
    fits the file system, it is not a directory, an existing ``path`` is a regular file (a device such as a copy of
    /dev/null's node, a FIFO, a socket or a symbolic link is refused, not replaced and never followed), and its
    parent exists or can be created and accepts new files. Returns ``path`` absolute."""
    s = os.fspath(path)
    if not s or "\x00" in s:
        raise TopiError(f"output path {s!r} is empty or contains a NUL byte: name a file")
    path = Path(os.path.abspath(s))
    check_name_lengths(path)
    try:
        mode = os.lstat(path).st_mode
    except (OSError, ValueError):
        mode = None
    if s.endswith(os.sep) or (mode is not None and stat.S_ISDIR(mode)):
        raise TopiError(f"{path} is a directory: name a file to write, e.g. {path / 'out'}")
    if mode is not None and not stat.S_ISREG(mode):
        raise _special_output(path, mode)
    _check_creatable(path.parent, path)
    return path


def _special_output(path: Path, mode: int) -> TopiError:
    return TopiError(f"{path} is {_what_is(mode)}: outputs are written as regular files and never replace or "
                     f"follow anything else; name a new file")


def check_distinct_outputs(outputs) -> None:
    """Refuse two outputs of one command on the same file (``--json X --out X``: one would silently lose).
    ``outputs``: paths, {path: label} or (path, label) pairs; None and "" are skipped. Compared by resolved path
    and, for existing files, by inode (hard links, other spellings)."""
    pairs = list(outputs.items()) if isinstance(outputs, Mapping) else [
        o if isinstance(o, tuple) else (o, None) for o in outputs]
    seen = []
    for p, label in pairs:
        if p is None or os.fspath(p) == "":
            continue
        shown = f"{label} {os.fspath(p)}" if label else os.fspath(p)
        real = _resolve(p)
        try:
            st = os.stat(real)
            ident = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        for real2, ident2, shown2 in seen:
            if real == real2 or (ident is not None and ident == ident2):
                raise TopiError(f"outputs {shown2} and {shown} are the same file: give each output its own path")
        seen.append((real, ident, shown))


def _cut(name: str, nbytes: int) -> str:
    """``name`` cut to at most ``nbytes`` bytes on a character boundary."""
    out, used = [], 0
    for ch in name:
        n = len(os.fsencode(ch))
        if used + n > nbytes:
            break
        out.append(ch)
        used += n
    return "".join(out)


def _write_error(path, exc: OSError) -> TopiError:
    reason = _SPACE_ERRORS.get(exc.errno) or exc.strerror or type(exc).__name__
    fix = "free some space or choose another path" if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) \
        else "choose another path"
    return TopiError(f"cannot write {path} ({reason}): nothing was written there; {fix}")


def file_identity(st: os.stat_result) -> str:
    """What changes when a file's bytes may have changed: a rewrite moves mtime and ctime, a copy is a new inode."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- exclusive rename ------------------------------------------------------------------------------------------
def _load_renameat2():
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()  # None: use the mkdir-claim fallback (tests set it to None to exercise that path)
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
# errors meaning "this kernel / filesystem / sandbox cannot do RENAME_NOREPLACE": use the fallback
_NO_FLAG = {errno.EINVAL, errno.ENOSYS, errno.EPERM, getattr(errno, "ENOTSUP", errno.EINVAL),
            getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


def rename_noreplace(src, dst) -> None:
    """Rename directory ``src`` to ``dst``; raise FileExistsError when ``dst`` exists (an empty directory too)
    or appears during the call. Never replaces anything."""
    src, dst = os.fspath(src), os.fspath(dst)
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NO_FLAG:
            raise OSError(err, os.strerror(err), src, None, dst)  # EEXIST/ENOTEMPTY -> FileExistsError subclass
    if os.name == "nt":  # Windows' rename never replaces an existing target
        os.rename(src, dst)
        return
    os.mkdir(dst)  # claims the name: FileExistsError when anything is there
    try:
        os.rename(src, dst)  # replaces only our empty placeholder; fails if someone wrote into it
    except OSError as exc:
        try:
            os.rmdir(dst)  # succeeds only while the placeholder is still empty
        except OSError:
            pass
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "appeared during the rename", dst) from exc
        raise


# --- ownership: the per-user key and the marker ------------------------------------------------------------------
def owner_key_path() -> Path:
    """``$TOPI_EXPORT_KEY_FILE``, else ``$XDG_CONFIG_HOME/topi-export/owner.key``, else
    ``~/.config/topi-export/owner.key``."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(os.path.abspath(env))
    xdg = os.environ.get("XDG_CONFIG_HOME")
    try:
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    except (RuntimeError, KeyError, OSError):
        raise TopiError(f"cannot find a home directory for topi-export's key: set {KEY_ENV} to a file path "
                        f"(it is created with mode 0600)") from None
    return base / "topi-export" / "owner.key"


def owner_key(*, create: bool = True) -> bytes | None:
    """This user's secret key for ownership markers (32 random bytes, hex, in ``owner_key_path()``), created on
    first use with mode 0600; None when it does not exist and ``create`` is false. A key that is a link, not a
    regular file, owned by another user or readable by others is refused: anyone who can read it can forge
    markers that ``--force`` trusts."""
    path = owner_key_path()
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            return None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".owner.key.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # never replaces: a concurrent first run's key wins, and both then read it
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system: a plain rename, if still nobody made one
                if not os.path.lexists(path):
                    os.rename(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return _read_key(path)
    except OSError as exc:
        raise TopiError(f"cannot create topi-export's key file {path} ({exc.strerror or exc}): set {KEY_ENV} to a "
                        f"writable file path") from None


def _read_key(path: Path) -> bytes:
    bad = f"topi-export's key file {path}"
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(errno.ENOENT, "no key yet", os.fspath(path)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TopiError(f"{bad} is a symbolic link: remove it (a new key is made; outputs marked with the old "
                            f"one are then no longer replaced by --force)") from None
        raise TopiError(f"cannot read {bad} ({exc.strerror}): fix its permissions or set {KEY_ENV}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TopiError(f"{bad} is {_what_is(st.st_mode)}: remove it (a new key is made on the next run)")
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise TopiError(f"{bad} belongs to another user: set {KEY_ENV} to a key file of your own")
        if os.name != "nt" and st.st_mode & 0o077:
            raise TopiError(f"{bad} can be read by other users, who could forge ownership markers: "
                            f"chmod 600 {path}")
        raw = f.read(1025)
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) < 32 or len(raw) > 1024:
        raise TopiError(f"{bad} is not a topi-export key: remove it (a new key is made; outputs marked with the old "
                        f"one are then no longer replaced by --force)")
    return key


class _TooMany(Exception):
    pass


def _entries(directory: Path) -> dict:
    """Everything below ``directory`` without following links: {relative POSIX path: size of a regular file,
    or "dir", "link", "other"}; the top-level marker itself is left out."""
    out, stack = {}, [("", os.fspath(directory))]
    while stack:
        rel, d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if not rel and e.name == MARKER_FILE:
                    continue
                r = rel + e.name
                mode = e.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    out[r] = "dir"
                    stack.append((r + "/", e.path))
                elif stat.S_ISREG(mode):
                    out[r] = e.stat(follow_symlinks=False).st_size
                else:
                    out[r] = "link" if stat.S_ISLNK(mode) else "other"
                if len(out) > MAX_MARKER_ENTRIES:
                    raise _TooMany
    return out


def _mac(key: bytes, payload: dict) -> str:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(key, b"topi-export ownership marker\0" + body, hashlib.sha256).hexdigest()


def write_marker(directory, kind: str) -> dict:
    """Stamp ``directory`` (a finished staging tree) as this user's ``kind`` output: ``MARKER_FILE`` lists every
    entry below it with its size and carries an HMAC under ``owner_key()``. Written last, exclusively (never over
    an existing file). Returns the marker."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    directory = Path(directory)
    try:
        entries = _entries(directory)
    except _TooMany:
        raise TopiError(f"{directory} holds more than {MAX_MARKER_ENTRIES} entries: topi-export bug") from None
    payload = {"format": MARKER_FORMAT, "kind": kind, "id": secrets.token_hex(16), "entries": entries}
    doc = {**payload, "hmac": _mac(owner_key(), payload)}
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    with os.fdopen(os.open(directory / MARKER_FILE, flags, 0o644), "wb") as f:
        f.write((json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode())
    return doc


@dataclass(frozen=True)
class NotOurs:
    """Why ``--force`` may not replace a directory: ``clause`` completes "PATH ...", ``fix`` says what to do."""

    clause: str
    fix: str = "remove it yourself or choose another path"
    extra: tuple = ()  # entries the marker does not list

    def __str__(self) -> str:
        return self.clause


def _read_marker(directory: Path):
    """The marker's JSON object, or a NotOurs saying why there is none usable."""
    path = directory / MARKER_FILE
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return NotOurs(f"was not made by topi-export (it has no ownership marker {MARKER_FILE})")
    if not stat.S_ISREG(mode):
        return NotOurs(f"was not made by topi-export (its {MARKER_FILE} is {_what_is(mode)})")
    try:
        doc = json.loads(read_small_file(path, "marker", "", max_bytes=MAX_MARKER_BYTES).decode("utf-8"))
    except (TopiError, ValueError, RecursionError):
        doc = None
    ok = (isinstance(doc, dict) and doc.get("format") == MARKER_FORMAT and doc.get("kind") in KINDS
          and isinstance(doc.get("id"), str) and isinstance(doc.get("hmac"), str)
          and isinstance(doc.get("entries"), dict))
    return doc if ok else NotOurs(f"was not made by topi-export (its {MARKER_FILE} is not a topi-export marker)")


def marker_problem(directory, kind: str | None = None) -> NotOurs | None:
    """None when ``directory`` is this user's topi-export output of ``kind`` (None: any kind) that ``--force``
    may replace: a real directory that is empty, or whose marker verifies under ``owner_key()``, names ``kind``
    and lists every entry the directory holds, each with the type and size it had (a listed entry that is gone
    is fine: deleting less loses nothing). Otherwise why not. Nothing is followed, nothing large is read; a
    key that cannot be used safely raises TopiError."""
    directory = Path(directory)
    try:
        mode = os.lstat(directory).st_mode
        if stat.S_ISLNK(mode):
            return NotOurs("is a symbolic link")
        if not stat.S_ISDIR(mode):
            return NotOurs("is not a directory")
        if _empty(directory):
            return None
    except OSError as exc:
        return NotOurs(f"cannot be looked at ({exc.strerror})")
    doc = _read_marker(directory)
    if isinstance(doc, NotOurs):
        return doc
    key = owner_key(create=False)
    payload = {k: doc[k] for k in ("format", "kind", "id", "entries")}
    if key is None or not hmac.compare_digest(_mac(key, payload), doc["hmac"]):
        return NotOurs(f"was not made by your topi-export (its {MARKER_FILE} does not verify with your key "
                       f"{owner_key_path()}: copied from another user or machine, or edited)")
    if kind is not None and doc["kind"] != kind:
        return NotOurs(f"was not made by topi-export as {KINDS[kind]} (it is {KINDS[doc['kind']]})")
    try:
        actual = _entries(directory)
    except _TooMany:
        return NotOurs(f"holds more than {MAX_MARKER_ENTRIES} entries, more than topi-export writes")
    except OSError as exc:
        return NotOurs(f"cannot be listed ({exc.strerror})")
    listed = doc["entries"]
    extra_set = {r for r in actual if r not in listed}
    extra = sorted(r for r in extra_set if not any(p in extra_set for p in _parents(r)))  # a new folder, not its files
    if extra:
        return NotOurs(f"holds entries topi-export did not write ({_names(extra)})",
                       "move them out of it (or remove the directory yourself), or choose another path", tuple(extra))
    changed = sorted(r for r, v in actual.items() if listed[r] != v)
    if changed:
        return NotOurs(f"was changed after topi-export wrote it ({_names(changed)})")
    return None


def _parents(rel: str):
    while "/" in rel:
        rel = rel.rsplit("/", 1)[0]
        yield rel


def _names(names, shown: int = 5) -> str:
    parts = [n if n.isprintable() and len(n) <= 80 else repr(n[:80]) for n in names[:shown]]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(parts) + more


def _marked_owner(path: Path) -> Path | None:
    """The directory ``path`` would land in that topi-export owns: the nearest ancestor holding a marker, when that
    marker verifies and the directory holds nothing unlisted; else None."""
    d = Path(os.path.realpath(path.parent))
    for _ in range(256):
        if os.path.lexists(d / MARKER_FILE):
            try:
                return d if marker_problem(d) is None else None
            except Exception:  # an unusable key: nothing is adopted
                return None
        if d.parent == d:
            return None
        d = d.parent
    return None


def _adopt(root: Path, written: Path) -> None:
    """Add ``written``, a file topi-export just wrote inside ``root``, to ``root``'s marker (same id, new HMAC).
    Only that entry is added, never a rescan, so a file the user adds meanwhile stays unlisted. Best effort: if
    it fails, a later --force refuses and names the file, which is safe."""
    tmp = None
    try:
        doc, key = _read_marker(root), owner_key(create=False)
        if isinstance(doc, NotOurs) or key is None:
            return
        payload = {k: doc[k] for k in ("format", "kind", "id", "entries")}
        if not hmac.compare_digest(_mac(key, payload), doc["hmac"]):
            return
        parts = (Path(os.path.realpath(written.parent)) / written.name).relative_to(root).parts
        entries = dict(payload["entries"])
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), "dir")
        entries["/".join(parts)] = os.lstat(written).st_size
        payload["entries"] = entries
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f"{MARKER_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps({**payload, "hmac": _mac(key, payload)}, indent=1, sort_keys=True) + "\n").encode())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, root / MARKER_FILE)
    except Exception:  # noqa: BLE001 - see the docstring
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


class Owned:
    """``is_ours`` for outputs of one ``kind`` (None: any kind): true for an empty real directory or this user's
    marked output of that kind holding nothing unlisted (``marker_problem``). ``staged_dir`` given one of these
    (with a kind) stamps the tree it places with that kind's marker, so the predicate that lets ``--force``
    replace a directory and the stamp a build leaves always agree."""

    def __init__(self, kind: str | None):
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        self.kind = kind

    def why_not(self, path) -> NotOurs | None:
        return marker_problem(path, self.kind)

    def __call__(self, path) -> bool:
        try:
            return self.why_not(path) is None
        except Exception:  # a key that cannot be used cannot vouch for anything
            return False

    def __repr__(self) -> str:
        return f"owned_by({self.kind!r})"


def owned_by(kind: str | None) -> Owned:
    return Owned(kind)


made_by_topi_export = Owned(None)  # default is_ours: any kind of this user's marked output, or an empty directory
is_triton_repository = Owned(TRITON_REPOSITORY)  # what `topi-export triton --force` may replace
is_engine_directory = Owned(ENGINE_DIR)  # what `build --force` may replace (runtime/manifest.py is_engine_dir)
is_onnx_cache = Owned(ONNX_CACHE)  # what a build may rewrite as its --onnx-dir (builder.py _is_cache_dir)


def is_empty_dir(path) -> bool:
    """A real, empty directory (replacing it loses nothing)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and _empty(path)
    except OSError:
        return False


def _empty(directory) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


def _why_not_ours(path, is_ours) -> NotOurs | None:
    pred = is_ours or made_by_topi_export
    if os.path.islink(path):
        return NotOurs("is a symbolic link")
    why = getattr(pred, "why_not", None)
    if why is not None:
        return why(path)  # TopiError (an unusable key) propagates: it is its own error, not "not ours"
    try:
        ok = bool(pred(Path(path)))
    except Exception:  # a predicate that fails cannot vouch for anything
        ok = False
    return None if ok else NotOurs("was not made by topi-export")


def _ours(path, is_ours) -> bool:
    try:
        return _why_not_ours(path, is_ours) is None
    except Exception:
        return False


# --- what may be written where ---------------------------------------------------------------------------------
def _labelled(protect) -> list[tuple[Path, str]]:
    """``protect`` as [(resolved path, label)]; entries that are None or do not exist (e.g. a hub model id)
    cannot be harmed and are skipped."""
    items = protect.items() if isinstance(protect, Mapping) else ((p, None) for p in (protect or ()))
    out = []
    for p, label in items:
        if p is None or os.fspath(p) == "" or not os.path.lexists(p):
            continue
        out.append((_resolve(p), label or "an input of this command"))
    return out


def _danger_zones() -> list[tuple[Path, str]]:
    zones = [(Path(os.path.abspath(os.sep)), "the filesystem root")]
    try:
        zones.append((_resolve(Path.home()), "your home directory"))
    except (RuntimeError, KeyError, OSError):
        pass
    try:
        zones.append((_resolve(os.getcwd()), "the current directory"))
    except OSError:
        pass
    return zones


def check_disjoint(outputs) -> None:
    """Refuse, before any work, output directories of one command that are the same or nested (e.g. ``build
    --engine-dir X --onnx-dir X/cache``): each would be placed over, or inside, the other's staging. ``outputs``
    is {path: label} or (path, label) pairs (two equal paths need pairs); paths are compared resolved, whether they
    exist or not; None entries are skipped."""
    pairs = outputs.items() if isinstance(outputs, Mapping) else outputs
    items = [(Path(os.path.abspath(os.fspath(p))).resolve(), os.fspath(p), label)
             for p, label in pairs if p is not None and os.fspath(p) != ""]
    for i, (a, shown_a, label_a) in enumerate(items):
        for b, shown_b, label_b in items[i + 1:]:
            if a == b:
                raise TopiError(f"{label_a} and {label_b} are the same directory ({shown_a}): give them different "
                                f"paths")
            if a.is_relative_to(b) or b.is_relative_to(a):
                inner, outer = ((shown_a, label_a), (shown_b, label_b)) if a.is_relative_to(b) else (
                    (shown_b, label_b), (shown_a, label_a))
                raise TopiError(f"{inner[1]} {inner[0]} is inside {outer[1]} {outer[0]}: give directories that do "
                                f"not contain each other")


# identity of each output directory when this thread checked it (check_output_dir), so staged_dir can tell
# the tree it was asked to replace from one another run placed while this command loaded its model
_first_seen = threading.local()


def check_output_dir(final, *, replace=False, is_ours=None, protect=()) -> Path:
    """Refuse, before any slow work, an output directory that must not be written. Returns ``final`` absolute.

    Rules (each a one-line TopiError):
    - ``final`` equals, contains, or is inside a ``protect`` path (the model folder, inputs / calibration files,
      an engine directory being read); ``protect`` is paths or {path: label}; missing entries are ignored;
    - ``final`` is, or contains, the filesystem root, the home directory or the current directory;
    - a name in ``final`` is longer than the file system allows;
    - ``final`` is a symbolic link, or exists and is not a directory;
    - ``final`` exists and ``replace`` is false (the CLI's ``--force`` is off);
    - ``final`` exists, ``replace`` is true, and ``is_ours`` (default ``made_by_topi_export``; ``owned_by(kind)``
      names the reason: no marker, another user's, another kind, entries it does not list) refuses it;
    - the nearest existing ancestor of ``final`` is not a directory or does not accept new entries.
    Paths are compared after resolving symlinks, so ``a/../model`` or a link to the model folder is caught. With an
    ``owned_by(kind)`` predicate the per-user key is made here, before the work, if it does not exist yet.
    """
    final = _check_output_dir(final, replace=replace, is_ours=is_ours, protect=protect)
    if not hasattr(_first_seen, "ids"):
        _first_seen.ids = {}
    stack = _first_seen.ids.setdefault(str(final), [])
    stack.append(_identity(final))  # a stack: a run nested in another's work (tests) takes its own, last in
    del stack[:-16]
    return final


def _check_output_dir(final, *, replace=False, is_ours=None, protect=()) -> Path:
    final = Path(os.path.abspath(os.fspath(final)))
    if "\x00" in str(final):
        raise TopiError(f"{str(final)!r} contains a NUL byte: choose another output path")
    check_name_lengths(final, "output directory")
    real = final.resolve()
    for p, label in _labelled(protect):
        if real == p:
            raise TopiError(f"{final} is {label}: choose another output directory")
        if p.is_relative_to(real):
            raise TopiError(f"{final} contains {label} ({p}): choose an output directory outside it")
        if real.is_relative_to(p):
            raise TopiError(f"{final} is inside {label} ({p}): choose an output directory outside it")
    for p, label in _danger_zones():
        if p.is_relative_to(real):
            what = "is" if p == real else "contains"
            raise TopiError(f"{final} {what} {label}: choose a new directory for the output")
    if getattr(is_ours, "kind", None):
        owner_key()  # made now, before the work, so a home without room for it fails first
    try:
        mode = os.lstat(final).st_mode  # one look: a concurrent --force build may move it away at any moment
    except OSError:  # missing, or under a file (ENOTDIR): _check_creatable below says which
        mode = None
    if mode is not None and stat.S_ISLNK(mode):
        raise TopiError(f"{final} is a symbolic link: name a new directory, or the real one it points to")
    if mode is not None:
        if not stat.S_ISDIR(mode):
            raise TopiError(f"{final} exists and is not a directory: choose another path")
        if not replace:
            raise TopiError(f"{final} already exists: pass --force to replace it, or choose another path")
        problem = _why_not_ours(final, is_ours)
        if problem is not None:
            who = "this build does not rewrite it as its cache" if getattr(is_ours, "kind", None) == ONNX_CACHE \
                else "--force does not replace it"
            raise TopiError(f"{final} {problem.clause}, so {who}: {problem.fix}")
    _check_creatable(final.parent, final)
    return final


def refuse_overwrite(path, protected, *, what="the output") -> None:
    """Refuse when writing file ``path`` would overwrite a protected file (inputs file, model files) or land
    inside a protected directory (an engine directory, the model folder). ``protected`` is paths or
    {path: label}; compared by resolved path and by inode (hard links, other spellings)."""
    target = _resolve(path)
    try:
        st = os.stat(target)
        ident = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    for p, label in _labelled(protected):
        try:
            pst = os.stat(p)
        except OSError:
            continue
        if target == p or ident == (pst.st_dev, pst.st_ino):
            raise TopiError(f"{what} {path} would overwrite {label} ({p}): choose another output path")
        if stat.S_ISDIR(pst.st_mode) and target.is_relative_to(p):
            raise TopiError(f"{what} {path} is inside {label} ({p}): choose an output path outside it")


# --- staging directories and their locks -------------------------------------------------------------------------
def _staging_prefix(name: str) -> str:
    return f".{_cut(name, _STAGING_NAME_BYTES)}.staging-"


def _identity(path):
    """Which tree is at ``path``: (device, inode, marker id), or None when nothing is there."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    mid = None
    if stat.S_ISDIR(st.st_mode):
        doc = _read_marker(Path(path))
        mid = None if isinstance(doc, NotOurs) else doc["id"]
    return (st.st_dev, st.st_ino, mid)


def _recorded_final(wrapper: Path):
    try:
        return os.fsdecode(read_small_file(wrapper / FINAL_FILE, "staging record", "", max_bytes=4096))
    except TopiError:
        return None


def _lock(path: Path):
    from filelock import FileLock

    return FileLock(os.fspath(path), thread_local=False)


def _new_staging(final: Path):
    """A fresh staging directory next to ``final`` whose lock this run holds: (directory, lock)."""
    from filelock import Timeout

    for _ in range(10):
        wrapper = Path(tempfile.mkdtemp(prefix=_staging_prefix(final.name), dir=final.parent))
        # until it is locked, another run's clean_stale_staging may take it for a dead run's and remove it
        try:
            ino = os.lstat(wrapper).st_ino
            lock = _lock(wrapper / LOCK_FILE)
            lock.acquire(timeout=0)
        except (Timeout, FileNotFoundError):
            continue
        try:
            if os.lstat(wrapper).st_ino == ino:  # not removed by a cleaner and re-created by the lock
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                with os.fdopen(os.open(wrapper / FINAL_FILE, flags, 0o600), "wb") as f:
                    f.write(os.fsencode(final.name))
                return wrapper, lock
        except FileNotFoundError:
            pass
        except BaseException:
            lock.release()
            shutil.rmtree(wrapper, ignore_errors=True)
            raise
        lock.release()
        shutil.rmtree(wrapper, ignore_errors=True)
    raise TopiError(f"cannot create a staging directory next to {final} (it kept disappearing): rerun")


def clean_stale_staging(parent, name) -> list[Path]:
    """Remove staging directories ``PARENT/.NAME.staging-<random>`` of dead runs: their lock (held by a run for
    its whole life, dropped by the kernel when it dies) can be taken. Those of live runs, of other users and of
    other outputs whose name starts the same way are kept. A leftover holding the previous ``NAME`` (killed
    halfway through a replacement, ``NAME`` now missing) is moved back to ``NAME`` first. Returns the removed
    directories. Staging directories of older topi-export versions (``.NAME.tmp-...``) are left alone."""
    from filelock import Timeout

    parent = Path(parent)
    pattern = re.compile(re.escape(_staging_prefix(name)) + r"[a-z0-9_]{8}")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            continue
        wrapper = Path(entry.path)
        lock = _lock(wrapper / LOCK_FILE)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # its run is alive
        except OSError:
            continue  # cannot even look: leave it
        try:
            recorded = _recorded_final(wrapper)
            if recorded not in (None, name):
                continue  # another output whose (cut) name starts the same way
            _discard(wrapper, parent / name, restore=recorded == name)
            if not os.path.lexists(wrapper):
                removed.append(wrapper)
        finally:
            lock.release()
    return removed


def _discard(wrapper: Path, final: Path, restore: bool = True) -> None:
    """Delete a staging directory; first move a previous ``final`` parked in it back when ``final`` is missing."""
    old = wrapper / _OLD
    if restore and os.path.isdir(old) and not os.path.islink(old) and not os.path.lexists(final):
        try:
            rename_noreplace(old, final)
        except OSError:
            pass  # something took the name: the parked tree was ours and was being replaced anyway
    shutil.rmtree(wrapper, ignore_errors=True)


_ANY = object()  # _commit: replace whatever verifies, even a tree placed during this run (the ONNX cache)


def _appeared(final: Path) -> TopiError:
    return TopiError(f"{final} appeared while this command was running (another build or program created it): it "
                     f"was left untouched and this output was discarded; choose another path, or rerun")


def _replaced_meanwhile(final: Path, seen=_ANY) -> TopiError:
    if seen is None:  # nothing was there when this command started
        return _appeared(final)
    return TopiError(f"{final} was replaced by another run while this command was running: that result was kept "
                     f"and this output was discarded; rerun with --force to replace it")


def _commit(new: Path, final: Path, wrapper: Path, replace: bool, is_ours, protect, seen=_ANY) -> None:
    """Move ``new`` to ``final`` exclusively; with ``replace``, first move a verified-ours ``final`` aside, and
    only the tree this command saw when it started (``seen``, an ``_identity``)."""
    for _ in range(3):  # a concurrent --force build may move final away between our steps: retry a little
        try:
            rename_noreplace(new, final)
            return
        except FileExistsError:
            if not replace:
                raise _appeared(final) from None
        now = _identity(final)
        if now is None:
            continue  # moved away while being looked at: try to place ours again
        if seen is not _ANY and now != seen:
            raise _replaced_meanwhile(final, seen)
        try:
            _check_output_dir(final, replace=True, is_ours=is_ours, protect=protect)
        except TopiError:
            if not os.path.lexists(final):
                continue
            raise
        old = wrapper / _OLD
        try:
            rename_noreplace(final, old)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise TopiError(f"cannot move {final} aside to replace it ({exc.strerror}): remove it yourself or "
                            f"choose another path") from None
        if seen is not _ANY and _identity(old) != seen:  # another run placed its result between look and move
            _put_back(old, final)
            raise _replaced_meanwhile(final, seen)
        if not _ours(old, is_ours):  # swapped between the check and the move: put it back untouched
            _put_back(old, final)
            raise TopiError(f"{final} changed while it was being replaced and is no longer a topi-export output: "
                            f"left it in place; remove it yourself or choose another path")
        try:
            rename_noreplace(new, final)
        except FileExistsError:  # another run placed its result while ours was being moved in
            raise _replaced_meanwhile(final, seen) from None
        os.rename(old, wrapper / _REPLACED)  # committed: the parked tree is now garbage, never to be put back
        return
    raise _replaced_meanwhile(final, seen)


def _put_back(old: Path, final: Path) -> None:
    try:
        rename_noreplace(old, final)
    except OSError:
        parked = Path(tempfile.mkdtemp(prefix=f"{_cut(final.name, 200)}.not-replaced-", dir=final.parent))
        os.rename(old, parked / final.name)
        raise TopiError(f"{final} changed while it was being replaced; its previous contents were moved to "
                        f"{parked / final.name}: move them back yourself") from None


@contextmanager
def staged_dir(final, *, replace=None, is_ours=None, protect=(), echo=None, marker=None, concurrent="refuse"):
    """Yield a fresh directory; when the block succeeds it becomes ``final`` atomically, when the block fails
    or is interrupted it is deleted and ``final`` is untouched.

    replace: False: ``final`` must not exist, neither now nor when the block ends (TopiError "appeared ...",
        this output discarded). True (``--force``): an existing ``final`` is replaced only if ``is_ours(final)``
        (default ``made_by_topi_export``). None (callers written before these keywords, which refuse an existing
        path without ``--force`` themselves): replace when ``final`` existed on entry, else as False.
    is_ours: ``owned_by(kind)`` also stamps the placed tree with ``kind``'s marker (written last).
    marker: the kind to stamp when ``is_ours`` is another predicate (None: no marker).
    concurrent: "refuse": with ``replace``, a ``final`` that another run placed after this thread's
        ``check_output_dir`` (or this call) is kept and this output discarded, so two overlapping ``--force``
        builds never both report success; "replace": replace it all the same (an ONNX cache: any whole one serves).
    protect: paths ``final`` may not equal, contain or sit inside (see ``check_output_dir``, run on entry).
    echo: called with one line per stale staging directory removed (left by killed runs of this path).
    Running out of space (or quota, or hitting a read-only file system) inside the block is one TopiError line.
    """
    final = Path(os.path.abspath(os.fspath(final)))
    if replace is None:
        replace = os.path.lexists(final)
    stack = getattr(_first_seen, "ids", {}).get(str(final))
    seen = stack.pop() if stack else _ANY
    final = _check_output_dir(final, replace=replace, is_ours=is_ours, protect=protect)
    now = _identity(final)
    if seen is _ANY:
        seen = now
    elif replace and concurrent == "refuse" and now is not None and now != seen:
        raise _replaced_meanwhile(final, seen)
    kind = marker if marker is not None else getattr(is_ours, "kind", None)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for gone in clean_stale_staging(final.parent, final.name):
            if echo:
                echo(f"removed stale staging directory {gone} (left by a killed run)")
        wrapper, lock = _new_staging(final)
    except OSError as exc:
        raise _write_error(final, exc) from None
    try:
        new = wrapper / _NEW
        new.mkdir()
        new.chmod(0o755)  # engine dirs and repositories are read by other users (Triton)
        yield new
        if kind:
            write_marker(new, kind)
        _commit(new, final, wrapper, replace, is_ours, protect, seen if concurrent == "refuse" else _ANY)
    except OSError as exc:
        if exc.errno not in _SPACE_ERRORS:
            raise
        where = f" while writing {exc.filename}" if exc.filename else ""
        raise TopiError(f"cannot write {final} ({_SPACE_ERRORS[exc.errno]}{where}): the partial output was removed "
                        f"and {final} is as it was; free some space or choose another path") from None
    finally:
        try:
            _discard(wrapper, final)
        finally:
            lock.release()


# --- paths read from an engine directory -----------------------------------------------------------------------
def confined_path(root, rel, *, what="file") -> Path:
    """Resolve ``rel`` (a manifest entry, an ONNX external-data location) to a path inside ``root``.

    Refused, with a TopiError that never depends on anything outside ``root``: non-strings, empty paths, NUL
    bytes, absolute paths, any ``..`` component, a symbolic link at any component (engine directories are
    written by topi-export and never contain links; refusing them all means no outside target is ever looked
    at), and an existing entry that is not a regular file or directory. A missing file is not refused here (the
    caller reports it). Returns ``resolved root / rel``.
    """
    root_real = _resolve(root)
    shown = repr(rel if not isinstance(rel, str) else rel[:200])

    def refuse(reason):
        return TopiError(f"{what} {shown} (in {root}) {reason}: only relative paths to files inside the "
                         f"directory are allowed; rebuild it")

    if isinstance(rel, os.PathLike):
        rel = os.fspath(rel)
    if not isinstance(rel, str):
        raise refuse("is not a path")
    if "\x00" in rel:
        raise refuse("contains a NUL byte")
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or re.match(r"[A-Za-z]:", rel):
        raise refuse("is an absolute path")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise refuse("leaves the directory (..)")
    if not parts:
        raise refuse("names no file")
    current = root_real
    for i, part in enumerate(parts):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            break  # missing (the caller says so) or unreadable: nothing outside was looked at
        if stat.S_ISLNK(mode):
            raise refuse(f"goes through a symbolic link ({'/'.join(parts[:i + 1])})")
        if i == len(parts) - 1 and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise refuse("is not a regular file")
        if not stat.S_ISDIR(mode):
            break
    return root_real.joinpath(*parts)


def check_onnx_external_data(model_path, root, *, model=None) -> set[str]:
    """Check every external-data location of the ONNX file ``model_path`` (inside ``root``) without loading the
    data: initializers, sparse initializers and attribute tensors, in subgraphs, functions and training info.
    Locations are relative to the model's folder and must stay inside ``root`` (``confined_path`` rules).
    ``model``: the file's ModelProto when the caller has loaded it already (without external data).
    Returns the data files as paths relative to ``root`` ('onnx/anchor.onnx.data')."""
    import onnx

    root_real = _resolve(root)
    model_real = _resolve(model_path)
    if not model_real.is_relative_to(root_real):
        raise TopiError(f"ONNX graph {model_path} is outside {root}: rebuild the engine directory")
    base = model_real.parent.relative_to(root_real)
    if model is None:
        try:
            model = onnx.load(str(model_real), load_external_data=False)
        except Exception as exc:
            raise TopiError(f"cannot read ONNX graph {model_path} ({type(exc).__name__}): rebuild the engine "
                            f"directory") from None
    found = set()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in tensor.external_data}
        loc = where.get("location", "")
        what = f"tensor {tensor.name[:100]!r} of {model_real.name}: external-data location"
        confined_path(model_real.parent, loc, what=what)  # the syntax: no absolute path, no ..
        rel = (base / loc).as_posix()
        confined_path(root_real, rel, what=what)  # no symlink on the way from root
        found.add(os.path.normpath(rel))
    return found


def _all_tensors(model):
    def graph(g):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        yield from nodes(g.node)

    def nodes(node_list):
        for node in node_list:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor.values
                    yield a.sparse_tensor.indices
                for s in a.sparse_tensors:
                    yield s.values
                    yield s.indices
                if a.HasField("g"):
                    yield from graph(a.g)
                for g in a.graphs:
                    yield from graph(g)

    yield from graph(model.graph)
    for f in model.functions:
        yield from nodes(f.node)
    for t in model.training_info:
        yield from graph(t.initialization)
        yield from graph(t.algorithm)
