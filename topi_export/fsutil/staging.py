"""Output directories: checked before the work (``check_output_dir``), written into a staging directory next to
the final path whose lock the run holds, and placed atomically and exclusively when the work succeeds
(``staged_dir``); staging directories of dead runs are removed (``clean_stale_staging``)."""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.fsutil.outputs import (_SPACE_ERRORS, _check_creatable, _cut, _labelled, _resolve,
                                        _write_error, check_name_lengths)
from topi_export.fsutil.ownership import (ONNX_CACHE, NotOurs, _ours, _read_marker, _why_not_ours, owner_key,
                                          write_marker)
from topi_export.fsutil.reading import read_small_file
from topi_export.fsutil.rename import rename_noreplace

LOCK_FILE, FINAL_FILE = "lock", "final"
# fixed names inside a staging directory (never the final name: it could be "old"). "old" is a previous final
# parked during a replacement, restored if the run dies; once the new tree is placed it becomes "replaced", which
# nothing restores (a concurrent --force build may have moved our new tree aside; restoring "old" would undo both)
_NEW, _OLD, _REPLACED = "new", "old", "replaced"
_STAGING_NAME_BYTES = 200  # ".NAME.staging-XXXXXXXX" adds 18 bytes; names are cut in bytes, not characters


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
