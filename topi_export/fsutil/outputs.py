"""Output paths, checked before the work: names the file system can hold, a regular file or nothing, a parent that
accepts new files, no two outputs on one file, no output over or inside an input, no nested output directories;
and the one-line errors writes fail with."""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.fsutil.reading import _what_is

NAME_MAX, PATH_MAX = 255, 4096  # bytes, Linux; os.pathconf gives the real name limit where it can
_SPACE_ERRORS = {errno.ENOSPC: "no space left on the device", getattr(errno, "EDQUOT", -1): "disk quota exceeded",
                 errno.EFBIG: "a file is too large for the file system", errno.EROFS: "read-only file system"}


def _resolve(path) -> Path:
    return Path(os.path.abspath(os.fspath(path))).resolve()


def _existing_ancestor(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _inode(path):
    """(device, inode) of an existing file, else None: the same file under another name or a hard link."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _name_max(path: Path) -> int:
    anc = _existing_ancestor(path)
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
    anc = _existing_ancestor(directory)
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
        ident = _inode(real)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def check_disjoint(outputs) -> None:
    """Refuse, before any work, output directories of one command that are the same or nested (e.g. ``build
    --engine-dir X --onnx-dir X/cache``): each would be placed over, or inside, the other's staging. ``outputs``
    is {path: label} or (path, label) pairs (two equal paths need pairs); paths are compared resolved, whether they
    exist or not; None entries are skipped."""
    pairs = outputs.items() if isinstance(outputs, Mapping) else outputs
    items = [(_resolve(p), os.fspath(p), label)
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


def refuse_overwrite(path, protected, *, what="the output") -> None:
    """Refuse when writing file ``path`` would overwrite a protected file (inputs file, model files) or land
    inside a protected directory (an engine directory, the model folder). ``protected`` is paths or
    {path: label}; compared by resolved path and by inode (hard links, other spellings)."""
    target = _resolve(path)
    ident = _inode(target)
    for p, label in _labelled(protected):
        try:
            pst = os.stat(p)
        except OSError:
            continue
        if target == p or ident == (pst.st_dev, pst.st_ino):
            raise TopiError(f"{what} {path} would overwrite {label} ({p}): choose another output path")
        if stat.S_ISDIR(pst.st_mode) and target.is_relative_to(p):
            raise TopiError(f"{what} {path} is inside {label} ({p}): choose an output path outside it")
