"""Reading and verifying an engine directory: parse ``manifest.json`` into the typed plan.Manifest (every field
checked), confine every file it names to the directory, and check every file's sha256 (re-hashing only files
whose identity changed since they were last hashed: artifacts/hashcache.py). The runtime refuses a directory whose
manifest does not match its files or what it is asked to run; after its backend has loaded the files it checks
that none of them changed since they were verified (``check_unchanged``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from topi_export.artifacts.hashcache import HashCache, identity, sha256_file  # noqa: F401  (sha256_file: API)
from topi_export.errors import RebuildNeeded, TopiError
from topi_export.fsutil import (atomic_write_bytes, check_onnx_external_data, confined_path, is_engine_directory,
                                read_json_file)
from topi_export.plan import NAME, FileEntry, Manifest

MAX_MANIFEST_BYTES = 16 << 20


def file_entries(root: Path, rel_paths) -> dict:
    """The file table of a new engine directory; the digests also go to the verification cache, so the first run
    of a fresh build does not hash its weights again."""
    cache, out = HashCache(), {}
    for p in sorted(map(str, rel_paths)):
        digest = sha256_file(root / p)
        cache.record(root / p, digest)
        out[p] = FileEntry(digest, (root / p).stat().st_size)
    cache.save()
    return out


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_bytes(Path(root) / NAME, (json.dumps(manifest.to_json(), indent=2) + "\n").encode())


# What build --force may replace: this user's marked engine directory holding nothing unlisted, proven by the
# ownership marker (fsutil/ownership.py), never by a manifest.json anyone can write or link; staged_dir stamps it.
is_engine_dir = is_engine_directory


def read_manifest(engine_dir, verify_files: bool = True, rehash: bool = False) -> Manifest:
    """The verified manifest of an engine directory. ``rehash``: hash every file, whatever the cache says."""
    root = Path(engine_dir)
    if not root.is_dir():
        raise TopiError(f"engine directory {root} not found: build it with `topi-export build --engine-dir {root}`")
    path = confined_path(root, NAME, what="manifest")
    if not path.is_file():
        raise TopiError(f"{root} has no {NAME}: it is not a topi-export engine directory; build one with "
                        f"`topi-export build --engine-dir {root}`")
    data = read_json_file(path, "manifest", "rebuild the engine directory", max_bytes=MAX_MANIFEST_BYTES)
    m = Manifest.from_json(data, str(path), root)
    for rel in m.files:
        confined_path(root, rel, what="engine file")
    if verify_files:
        verify(m, rehash=rehash)
    return m


def verify(m: Manifest, rehash: bool = False) -> None:
    cache = HashCache()
    for rel, entry in m.files.items():
        p = confined_path(m.root, rel, what="engine file")
        try:
            st = os.stat(p, follow_symlinks=False)
        except OSError:
            st = None
        if st is None or not _regular(st):
            raise RebuildNeeded(f"engine file {rel} is missing from {m.root}: rebuild with "
                                f"`topi-export build --engine-dir {m.root} --force`")
        if st.st_size != entry.bytes or cache.sha256(p, st, rehash=rehash)[0] != entry.sha256:
            raise RebuildNeeded(f"engine file {rel} in {m.root} does not match its sha256 in {NAME} (modified after "
                                f"the build): rebuild with `topi-export build --engine-dir {m.root} --force`")
        m.verified[rel] = identity(st)
    cache.save()
    graph_of = {}  # ONNX file -> the graph entries built from it
    for kind, g in m.graphs.items():
        rel = g.onnx or (g.file if g.file.endswith(".onnx") else None)
        if rel is not None:
            graph_of.setdefault(rel, []).append(kind)
    for rel in m.files:
        if rel.endswith(".onnx"):
            model = load_graph(confined_path(m.root, rel), rel, m.root)
            data_files = check_onnx_external_data(confined_path(m.root, rel), m.root, model=model)
            unlisted = sorted(str(d) for d in data_files if str(d) not in m.files)
            if unlisted:
                raise TopiError(f"{rel} in {m.root} reads external data {unlisted} that the manifest does not list: "
                                f"rebuild the engine directory")
            for kind in graph_of.get(rel, ()):
                check_graph_io(model, m.graphs[kind], f"the {kind} graph entry of {m.root / NAME} ({rel})")


def adapter(m: Manifest):
    """The weightless family adapter of an engine directory's model, checked against what the manifest says it
    was built for (guidance branches, guidance mode)."""
    from topi_export.models import adapter_for

    family = adapter_for(m.model)
    if m.batch > family.max_branches:
        raise RebuildNeeded(f"{m.root / NAME}: 'batch' is {m.batch} but {family.name} runs at most "
                            f"{family.max_branches} guidance branch(es) per step: rebuild the engine directory")
    if m.guidance != family.guidance:
        raise RebuildNeeded(f"{m.root / NAME} records the guidance mode {m.guidance!r} but {family.name} with this "
                            f"config guides {family.guidance!r}: rebuild the engine directory")
    return family


def _regular(st) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode)


ONNX_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64", "INT32": "int32",
               "BOOL": "bool"}


def load_graph(path, rel, root):
    """An ONNX graph's structure, without its weights."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a broken directory
        raise TopiError(f"cannot read ONNX graph {rel} in {root} ({type(exc).__name__}): rebuild the engine "
                        f"directory") from None


def check_graph_io(model, entry, where: str) -> None:
    """The graph takes and returns exactly the tensors its manifest entry records (names, dtypes, ranks, fixed
    sizes). The runtime feeds what the entry says: a swapped or edited entry would run the wrong graph."""
    import onnx

    def fail(what):
        return TopiError(f"{where}: {what}: the manifest was edited after the build; rebuild the engine directory")

    initializers = {t.name for t in model.graph.initializer}
    for what, values, recorded in (("inputs", [v for v in model.graph.input if v.name not in initializers],
                                    entry.inputs), ("outputs", list(model.graph.output), entry.outputs)):
        have = {v.name: v.type.tensor_type for v in values}
        want = {t.name: t for t in recorded}
        if set(have) != set(want):
            raise fail(f"the graph's {what} are {sorted(have)}, the entry records {sorted(want)}")
        for name, t in want.items():
            tt = have[name]
            try:
                dtype = ONNX_DTYPES.get(onnx.TensorProto.DataType.Name(tt.elem_type), "unsupported")
            except ValueError:
                dtype = "unsupported"
            if dtype != t.dtype:
                raise fail(f"tensor {name!r} is {dtype} in the graph, {t.dtype} in the entry")
            if not tt.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if len(dims) != len(t.dims) or any(isinstance(w, int) and h is not None and h != w
                                               for h, w in zip(dims, t.dims)):
                shown = ["?" if d is None else d for d in dims]
                raise fail(f"tensor {name!r} has dims {shown} in the graph, {list(t.dims)} in the entry")
