"""Ownership: the per-user key, the marker ``staged_dir`` writes last into a tree it places (kind, every entry
with its size, an HMAC under the key), and the ``is_ours`` predicates that decide what ``--force`` replaces."""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.fsutil.outputs import _umask
from topi_export.fsutil.reading import _what_is, read_small_file

MARKER_FILE = ".topi-export-owner.json"
MARKER_FORMAT = "topi-export-owner/1"
ENGINE_DIR, TRITON_REPOSITORY, ONNX_CACHE = "engine-directory", "triton-repository", "onnx-cache"
KINDS = {ENGINE_DIR: "an engine directory", TRITON_REPOSITORY: "a Triton model repository",
         ONNX_CACHE: "an ONNX cache (--onnx-dir)"}
KEY_ENV = "TOPI_EXPORT_KEY_FILE"  # where the per-user key lives (tests point it at a temporary file)
MAX_MARKER_BYTES = 8 << 20
MAX_MARKER_ENTRIES = 100_000


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


def _signed(doc: dict, key: bytes | None) -> dict | None:
    """The signed fields of marker ``doc`` when its HMAC verifies under ``key``, else None."""
    if key is None:
        return None
    payload = {k: doc[k] for k in ("format", "kind", "id", "entries")}
    return payload if hmac.compare_digest(_mac(key, payload), doc["hmac"]) else None


def _marker_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()


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
        f.write(_marker_bytes(doc))
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
    if _signed(doc, owner_key(create=False)) is None:
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
        payload = None if isinstance(doc, NotOurs) else _signed(doc, key)
        if payload is None:
            return
        parts = (Path(os.path.realpath(written.parent)) / written.name).relative_to(root).parts
        entries = dict(payload["entries"])
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), "dir")
        entries["/".join(parts)] = os.lstat(written).st_size
        payload["entries"] = entries
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f"{MARKER_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_marker_bytes({**payload, "hmac": _mac(key, payload)}))
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
is_engine_directory = Owned(ENGINE_DIR)  # what `build --force` may replace (artifacts/manifest.py is_engine_dir)
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
