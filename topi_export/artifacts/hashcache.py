"""Start-up cost independent of model size (docs/design.md, "Manifest"): a file of an engine directory is re-hashed
only when its identity (device, inode, size, mtime, ctime) differs from the last time its sha256 was computed.
Rewriting a file changes its mtime and ctime (``touch -d`` can set mtime back, not ctime); a copy is a new inode;
so a file whose identity is unchanged still has the bytes that were hashed. The identities and digests live in a
cache outside every engine directory (``$TOPI_EXPORT_CACHE_DIR``, else ``$XDG_CACHE_HOME/topi-export``, else
``~/.cache/topi-export``); a missing, unreadable or corrupt cache only costs re-hashing. ``check --verify``
re-hashes everything."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from topi_export.fsutil import file_identity as identity

CACHE_FILE = "verified-files.json"
FORMAT = "topi-verified/1"
MAX_ENTRIES = 20000  # ~2 MB of JSON; the oldest entries go first
MAX_BYTES = 16 << 20


def cache_dir() -> Path:
    if os.environ.get("TOPI_EXPORT_CACHE_DIR"):
        return Path(os.environ["TOPI_EXPORT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "topi-export"


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """sha256 of files, computed once per file identity. ``save()`` merges into the cache file (atomically)."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / CACHE_FILE
        self.entries = self._read()
        self.added = {}

    def _read(self) -> dict:
        try:
            st = os.lstat(self.path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
                return {}
            with open(self.path, "rb") as f:
                data = json.loads(f.read(MAX_BYTES + 1).decode("utf-8"))
            if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("files"), dict):
                return {k: v for k, v in data["files"].items() if isinstance(k, str) and isinstance(v, str)}
        except (OSError, ValueError, RecursionError):
            pass
        return {}

    def sha256(self, path, st: os.stat_result | None = None, rehash: bool = False) -> tuple[str, os.stat_result]:
        """(sha256, the stat of the bytes it describes). Hashes when the identity is new, or when ``rehash``."""
        st = st or os.stat(path, follow_symlinks=False)
        key = identity(st)
        if not rehash and key in self.entries:
            return self.entries[key], st
        digest = sha256_file(path)
        after = os.stat(path, follow_symlinks=False)
        if identity(after) == key:  # unchanged while it was read: the digest describes this identity
            self.entries[key] = self.added[key] = digest
        return digest, st

    def record(self, path, digest: str) -> None:
        """Remember a digest computed elsewhere (the build hashes every file it writes)."""
        key = identity(os.stat(path, follow_symlinks=False))
        self.entries[key] = self.added[key] = digest

    def save(self) -> None:
        if not self.added:
            return
        try:
            merged = {**self._read(), **self.added}
            keep = dict(list(merged.items())[-MAX_ENTRIES:])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": FORMAT, "files": keep}))
            os.replace(tmp, self.path)
            self.added = {}
        except OSError:
            pass  # a cache that cannot be written only means hashing again next time
