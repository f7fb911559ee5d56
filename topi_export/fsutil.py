"""Filesystem safety: artifacts appear whole or not at all, never over something the tool did not make, and
paths read from an engine directory (manifest entries, ONNX external data) stay inside it.

Output directories (engine directories, Triton repositories) are written with ``staged_dir``:

    check_output_dir(out, replace=force, is_ours=..., protect={model_dir: "the model folder"})  # before slow work
    with staged_dir(out, replace=force, is_ours=..., protect=..., echo=echo) as tmp:
        ...write everything into tmp...

Staging: ``tmp`` is ``PARENT/.NAME.tmp-<pid>-<random>/new``. The staging directory also holds ``owner.json``
(pid, process start time, boot id, host), so a later run can tell a leftover of a killed process (removed by
``clean_stale_staging``) from the staging directory of a build that is still running (kept).

Placement is atomic and exclusive: when ``NAME`` does not exist it is created by a rename that fails if anything
appeared there meanwhile (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere, or where the filesystem refuses the
flag, ``mkdir(NAME)`` claims the name and the rename then replaces only that empty placeholder, failing if someone
wrote into it). A plain ``rename`` would silently replace an empty directory, and a check before the work would race
with anything created during it. With ``replace=True`` an existing ``NAME`` is replaced only when ``is_ours`` says
this tool made it: it is moved into the staging directory (and checked again there), the new tree is moved in
exclusively, then the old one is deleted. Nothing is deleted that was not verified as ours.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from topi_export.errors import TopiError

OWNER_FILE = "owner.json"
# fixed names inside a staging directory (never the final name: it could be "old"). "old" is a previous final
# parked during a replacement, restored if the run dies; once the new tree is placed it becomes "replaced", which
# nothing restores (a concurrent --force build may have moved our new tree aside; restoring "old" would undo both)
_NEW, _OLD, _REPLACED = "new", "old", "replaced"
_NAME_MAX = 200  # staging names add ~25 characters to the final name; file names stop at 255 bytes


def file_identity(st: os.stat_result) -> str:
    """What changes when a file's bytes may have changed: a rewrite moves mtime and ctime, a copy is a new inode."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp files are private; artifacts are read by other users (Triton)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


# --- what may be written where ---------------------------------------------------------------------------------
def _resolve(path) -> Path:
    return Path(os.path.abspath(os.fspath(path))).resolve()


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


def made_by_topi_export(path) -> bool:
    """Default ``is_ours``: a real directory (not a symlink) that is empty, holds a ``manifest.json`` whose
    ``format`` is ``topi-engines/...`` (an engine directory), or whose ``README.md`` first line names
    ``topi-export`` (a Triton repository from ``topi-export triton``)."""
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        if _empty(path):
            return True
        manifest, readme = path / "manifest.json", path / "README.md"
        if _is_regular(manifest) and manifest.stat().st_size < (64 << 20):
            data = json.loads(manifest.read_text())
            if isinstance(data, dict) and str(data.get("format", "")).startswith("topi-engines/"):
                return True
        return _readme_names_us(readme)
    except (OSError, ValueError):
        return False


def is_triton_repository(path) -> bool:
    """What ``topi-export triton --force`` may replace: a real directory that is empty or is a repository that
    command wrote (``README.md``'s first line names topi-export, and no ``manifest.json`` at the top). Unlike
    ``made_by_topi_export`` never an engine directory: those are expensive builds, not a repository to rewrite."""
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        if _empty(path):
            return True
        return not os.path.lexists(path / "manifest.json") and _readme_names_us(path / "README.md")
    except OSError:
        return False


def _readme_names_us(readme: Path) -> bool:
    """A regular README.md whose first line names topi-export (what `topi-export triton` writes)."""
    if not _is_regular(readme):
        return False
    with open(readme, encoding="utf-8", errors="replace") as f:
        return "topi-export" in f.readline(4096)


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


def is_empty_dir(path) -> bool:
    """A real, empty directory (replacing it loses nothing)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and _empty(path)
    except OSError:
        return False


def _empty(directory) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


def _is_regular(path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _ours(path, is_ours) -> bool:
    try:
        return not os.path.islink(path) and bool((is_ours or made_by_topi_export)(Path(path)))
    except Exception:  # a predicate that fails cannot vouch for anything
        return False


def check_output_dir(final, *, replace=False, is_ours=None, protect=()) -> Path:
    """Refuse, before any slow work, an output directory that must not be written. Returns ``final`` absolute.

    Rules (each a one-line TopiError):
    - ``final`` equals, contains, or is inside a ``protect`` path (the model folder, inputs / calibration files,
      an engine directory being read); ``protect`` is paths or {path: label}; missing entries are ignored;
    - ``final`` is, or contains, the filesystem root, the home directory or the current directory;
    - ``final`` is a symbolic link, or exists and is not a directory;
    - ``final`` exists and ``replace`` is false (the CLI's ``--force`` is off);
    - ``final`` exists, ``replace`` is true, and ``is_ours(final)`` (default ``made_by_topi_export``) is false;
    - the nearest existing ancestor of ``final`` is not a directory or not writable.
    Paths are compared after resolving symlinks, so ``a/../model`` or a link to the model folder is caught.
    """
    final = Path(os.path.abspath(os.fspath(final)))
    if "\x00" in str(final):
        raise TopiError(f"{str(final)!r} contains a NUL byte: choose another output path")
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
        if not _ours(final, is_ours):
            raise TopiError(f"{final} was not made by topi-export, so --force does not replace it: remove it "
                            f"yourself or choose another path")
    _check_creatable(final.parent, final)
    return final


def _check_creatable(directory: Path, target: Path) -> None:
    """``directory`` exists or can be created, is a directory, and new entries can be made in it."""
    anc = directory
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not os.path.isdir(anc):
        raise TopiError(f"cannot create {target}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise TopiError(f"cannot create {target}: no write permission in {anc}")


def check_writable(path) -> Path:
    """Before the work starts: ``path`` (a report JSON, latents, a PNG) can be written as a file: it is not a
    directory, and its parent exists or can be created and is writable. Returns ``path`` absolute."""
    s = os.fspath(path)
    if not s or "\x00" in s:
        raise TopiError(f"output path {s!r} is empty or contains a NUL byte: name a file")
    path = Path(os.path.abspath(s))
    if os.path.isdir(path) or s.endswith(os.sep):
        raise TopiError(f"{path} is a directory: name a file to write, e.g. {path / 'out'}")
    _check_creatable(path.parent, path)
    return path


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


# --- staging directories and their owners ----------------------------------------------------------------------
def _proc_start(pid: int):
    """Start time of ``pid`` in clock ticks since boot (Linux), or None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _boot_id():
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "start": _proc_start(pid), "boot": _boot_id(), "host": socket.gethostname()}


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _owner_alive(owner: dict) -> bool:
    """Whether the process that made a staging directory may still run. Unknown means alive (keep it)."""
    if owner.get("host") not in (None, socket.gethostname()):
        return True  # another machine on a shared filesystem: its pids mean nothing here
    boot = _boot_id()
    if owner.get("boot") and boot and owner["boot"] != boot:
        return False  # rebooted since
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _pid_exists(pid):
        return False
    start, now = owner.get("start"), _proc_start(pid)
    return start is None or now is None or start == now  # a different start time: the pid was reused


def _staging_re(name: str):
    return re.compile(rf"\.{re.escape(name[:_NAME_MAX])}\.tmp-(\d+)-[a-z0-9_]{{8}}")


def _read_owner(wrapper: Path, pid_from_name: int) -> dict:
    try:
        owner = json.loads((wrapper / OWNER_FILE).read_text())
        if isinstance(owner, dict) and owner.get("pid") == pid_from_name:
            return owner
    except (OSError, ValueError):
        pass
    return {"pid": pid_from_name}  # killed before the owner file was written: the name still holds the pid


def clean_stale_staging(parent, name) -> list[Path]:
    """Remove staging directories ``PARENT/.NAME.tmp-<pid>-<random>`` whose owner process is gone (the pid no
    longer exists, the pid was reused: recorded start time differs, or the machine rebooted); keep those of live
    processes, of other users and of other hosts. A leftover holding the previous ``NAME`` (killed halfway through
    a replacement, ``NAME`` now missing) is moved back to ``NAME`` first. Returns the removed directories.
    Staging directories of older topi-export versions (``.NAME.tmp-<random>``, no owner) are left alone."""
    parent = Path(parent)
    pattern = _staging_re(name)
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            continue
        wrapper = Path(entry.path)
        owner = _read_owner(wrapper, int(m.group(1)))
        if owner.get("final", name) != name or _owner_alive(owner):
            continue
        _discard(wrapper, parent / name)
        if not os.path.lexists(wrapper):
            removed.append(wrapper)
    return removed


def _discard(wrapper: Path, final: Path) -> None:
    """Delete a staging directory; first move a previous ``final`` parked in it back when ``final`` is missing."""
    old = wrapper / _OLD
    if os.path.isdir(old) and not os.path.islink(old) and not os.path.lexists(final):
        try:
            rename_noreplace(old, final)
        except OSError:
            pass  # something took the name: the parked tree was ours and was being replaced anyway
    shutil.rmtree(wrapper, ignore_errors=True)


def _appeared(final: Path) -> TopiError:
    return TopiError(f"{final} appeared while this command was running (another build or program created it): it "
                     f"was left untouched and this output was discarded; choose another path, or rerun")


def _commit(new: Path, final: Path, wrapper: Path, replace: bool, is_ours, protect) -> None:
    """Move ``new`` to ``final`` exclusively; with ``replace``, first move a verified-ours ``final`` aside."""
    for _ in range(3):  # a concurrent --force build may move final away between our steps: retry a little
        try:
            rename_noreplace(new, final)
            return
        except FileExistsError:
            if not replace:
                raise _appeared(final) from None
        try:
            check_output_dir(final, replace=True, is_ours=is_ours, protect=protect)
        except TopiError:
            if not os.path.lexists(final):
                continue  # moved away while being looked at: try to place ours again
            raise
        old = wrapper / _OLD
        try:
            rename_noreplace(final, old)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise TopiError(f"cannot move {final} aside to replace it ({exc.strerror}): remove it yourself or "
                            f"choose another path") from None
        if not _ours(old, is_ours):  # swapped between the check and the move: put it back untouched
            _put_back(old, final)
            raise TopiError(f"{final} changed while it was being replaced and is no longer a topi-export output: "
                            f"left it in place; remove it yourself or choose another path")
        try:
            rename_noreplace(new, final)
        except FileExistsError:
            raise _appeared(final) from None
        os.rename(old, wrapper / _REPLACED)  # committed: the parked tree is now garbage, never to be put back
        return
    raise _appeared(final)


def _put_back(old: Path, final: Path) -> None:
    try:
        rename_noreplace(old, final)
    except OSError:
        parked = Path(tempfile.mkdtemp(prefix=f"{final.name}.not-replaced-", dir=final.parent))
        os.rename(old, parked / final.name)
        raise TopiError(f"{final} changed while it was being replaced; its previous contents were moved to "
                        f"{parked / final.name}: move them back yourself") from None


@contextmanager
def staged_dir(final, *, replace=None, is_ours=None, protect=(), echo=None):
    """Yield a fresh directory; when the block succeeds it becomes ``final`` atomically, when the block fails
    or is interrupted it is deleted and ``final`` is untouched.

    replace: False: ``final`` must not exist, neither now nor when the block ends (TopiError "appeared ...",
        this output discarded). True (``--force``): an existing ``final`` is replaced only if ``is_ours(final)``
        (default ``made_by_topi_export``). None (callers written before these keywords, which refuse an existing
        path without ``--force`` themselves): replace when ``final`` existed on entry, else as False.
    protect: paths ``final`` may not equal, contain or sit inside (see ``check_output_dir``, run on entry).
    echo: called with one line per stale staging directory removed (left by killed runs of this path).
    """
    final = Path(os.path.abspath(os.fspath(final)))
    if replace is None:
        replace = os.path.lexists(final)
    final = check_output_dir(final, replace=replace, is_ours=is_ours, protect=protect)
    final.parent.mkdir(parents=True, exist_ok=True)
    for gone in clean_stale_staging(final.parent, final.name):
        if echo:
            echo(f"removed stale staging directory {gone} (left by a killed run)")
    wrapper = Path(tempfile.mkdtemp(prefix=f".{final.name[:_NAME_MAX]}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        (wrapper / OWNER_FILE).write_text(json.dumps({**_owner(), "final": final.name}))
        new = wrapper / _NEW
        new.mkdir()
        new.chmod(0o755)  # engine dirs and repositories are read by other users (Triton)
        yield new
        _commit(new, final, wrapper, replace, is_ours, protect)
    finally:
        _discard(wrapper, final)


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
