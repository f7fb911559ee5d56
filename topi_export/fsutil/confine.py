"""Paths read from an engine directory (manifest entries, ONNX external data) stay inside it: no absolute path,
no ``..``, no symbolic link, nothing but regular files and directories."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.fsutil.outputs import _resolve


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
