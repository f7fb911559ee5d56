"""Where each model parameter lives in the exported graphs, so `refit` (commands/refit.py) can put other weights
(LoRA adapters fused in) into the same graphs without re-exporting.

The exporter renames and folds weights (a Linear's weight is stored transposed under a name like ``val_12``; the
shared weights file keeps one copy of equal bytes, export/graphs.py ``share_weights``), so initializers are matched
to parameters by content: an initializer holds a parameter when its bytes equal the parameter's, or its
transpose's, at the export precision. Refitting is refused, never guessed, when a changed parameter is not found as
such an initializer (folded into another constant), when it sits inline in a graph file (the graph would change),
or when one initializer or one region of the weights file would need two different new values."""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from topi_export.errors import BadInput

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REFIT_MAP = "refit_map.json"  # initializer -> parameter table kept beside engines that hold their weights
REBUILD = "build the engines with `topi-export build --lora ...` instead"


def tensor_bytes(t: torch.Tensor, precision: str) -> bytes:
    t = t.detach().to(DTYPES[precision]).contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same bytes through int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Slot:
    """One initializer of one graph file and the parameters whose bytes it holds."""

    graph: str  # the graph file (relative to the engine directory)
    name: str  # the initializer's name (also the weight's name in a TensorRT engine built from the graph)
    params: tuple  # ((parameter name, transposed), ...): every parameter with exactly these bytes
    location: str | None  # external data file (relative to the graph's folder), None: inline in the graph
    offset: int
    length: int

    def to_json(self) -> dict:
        return {"graph": self.graph, "name": self.name, "params": [[p, t] for p, t in self.params],
                "location": self.location, "offset": self.offset, "length": self.length}


def _initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g)


def _index(state: dict, precision: str) -> dict:
    """(length, sha256) -> [(parameter, transposed)] over every parameter and every 2-D parameter's transpose."""
    index = {}
    for name, t in state.items():
        forms = [(False, t)] + ([(True, t.t())] if t.dim() == 2 and t.shape[0] != 1 and t.shape[1] != 1 else [])
        for transposed, form in forms:
            data = tensor_bytes(form, precision)
            index.setdefault((len(data), _digest(data)), []).append((name, transposed))
    return index


def find_slots(root: Path, graph_files, state: dict, precision: str) -> list[Slot]:
    """Every initializer of the graphs (relative to root) that holds a parameter of `state`."""
    index = _index(state, precision)
    lengths = {length for length, _ in index}
    slots = []
    for rel in graph_files:
        path = Path(root) / rel
        model = onnx.load(str(path), load_external_data=False)
        handles = {}
        try:
            for init in _initializers(model.graph):
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    ext = {e.key: e.value for e in init.external_data}
                    location, offset, length = ext["location"], int(ext.get("offset", 0)), int(ext["length"])
                    if length not in lengths:
                        continue
                    f = handles.setdefault(location, open(path.parent / location, "rb"))
                    f.seek(offset)
                    data = f.read(length)
                else:
                    location, offset = None, 0
                    data = onnx.numpy_helper.to_array(init).tobytes()
                    length = len(data)
                    if length not in lengths:
                        continue
                params = index.get((length, _digest(data)))
                if params:
                    slots.append(Slot(str(rel), init.name, tuple(params), location, offset, length))
        finally:
            for f in handles.values():
                f.close()
    return slots


def changed_parameters(base: dict, new: dict) -> set[str]:
    if set(base) != set(new):
        raise BadInput("the refitted model has other parameters than the engines' model: rebuild the engines")
    return {n for n in base if not torch.equal(base[n], new[n])}


def read_refit_map(path) -> tuple[list[Slot], set[str]]:
    """(slots, the parameters the build's adapters changed) from an engine directory's refit map."""
    from topi_export.fsutil import read_json_file

    data = read_json_file(path, "refit map", "rebuild the engine directory", max_bytes=256 << 20)
    try:
        slots = [Slot(s["graph"], s["name"], tuple((p, bool(t)) for p, t in s["params"]), s["location"],
                      int(s["offset"]), int(s["length"])) for s in data["slots"]]
        return slots, set(data.get("adapters_changed", []))
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{path} is not a refit map this topi-export reads: rebuild the engine directory") from None


def new_values(slots, changed: set, new: dict, precision: str, graph_files) -> dict:
    """Slot -> its new bytes, for every slot that holds a parameter in `changed` (what the old or the new adapters
    touch); refuses what cannot be refitted."""
    out = {}
    found = {g: set() for g in graph_files}
    for slot in slots:
        hit = [(p, t) for p, t in slot.params if p in changed]
        if not hit:
            continue
        values = {tensor_bytes(new[p].t() if t else new[p], precision) for p, t in slot.params}
        if len(values) != 1:
            raise BadInput(f"{slot.graph}: initializer {slot.name!r} holds the bytes of {len(slot.params)} parameters "
                           f"({', '.join(p for p, _ in slot.params[:3])}) that the new adapters change differently: "
                           f"refit cannot split it; {REBUILD}")
        if slot.location is None:
            raise BadInput(f"{slot.graph}: parameter {hit[0][0]} is stored inside the graph file (initializer "
                           f"{slot.name!r}), which refit keeps as it is; {REBUILD}")
        out[slot] = values.pop()
        for p, _ in hit:
            found[slot.graph].add(p)
    for graph, params in found.items():
        missing = sorted(changed - params)
        if missing:
            raise BadInput(f"{graph}: {len(missing)} parameter(s) the adapters change ({', '.join(missing[:3])}) are "
                           f"not stored as themselves (the exporter folded them into other constants): refit cannot "
                           f"replace them; {REBUILD}")
    return out


def write_weights(src_root: Path, dst_root: Path, values: dict) -> list[str]:
    """Copy the external data files the slots name from src_root to dst_root with the slots' regions rewritten;
    one region written with two different values is refused. Returns the files written (relative)."""
    regions = {}
    for slot, data in values.items():
        rel = (Path(slot.graph).parent / slot.location).as_posix()
        key = (rel, slot.offset, slot.length)
        if regions.get(key, data) != data:
            raise BadInput(f"{rel}: the region at offset {slot.offset} is shared by initializers that need different "
                           f"values now (equal bytes were stored once at export): {REBUILD}")
        regions[key] = data
    written = []
    for rel in sorted({r for r, _, _ in regions}):
        src, dst = Path(src_root) / rel, Path(dst_root) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        with open(dst, "r+b") as f:
            for (r, offset, length), data in sorted(regions.items()):
                if r == rel:
                    f.seek(offset)
                    f.write(data)
        written.append(rel)
    return written


def write_refit_map(path, slots, adapters_changed=()) -> None:
    """The slot table of the exported graphs (initializer -> parameter, where its bytes are) and the parameters the
    fused adapters changed, kept in the engine directory: refit rewrites exactly those slots, for ONNX weights
    files and for TensorRT weight names alike, without the old adapters' files."""
    import json

    Path(path).write_text(json.dumps({"format": "topi-refit-map/1", "adapters_changed": sorted(adapters_changed),
                                      "slots": [s.to_json() for s in slots]}, indent=1))
