"""`topi-export refit` (README, "LoRA"): an engine directory with other LoRA adapters fused in, without
re-exporting. The base model is loaded (its identity checked against the manifest), the new adapters are fused by
the family's LoRA loader (topi_export/lora.py), and the backend rewrites exactly the weights that the old or the
new adapters change, where the build's refit map says they sit (export/weights_map.py): ONNX Runtime (and
weight-stripped TensorRT) a new weights file beside the same graphs, TensorRT refittable engines through its
Refitter. Everything is staged and placed like a build (fsutil.staged_dir)."""
from __future__ import annotations

import datetime
import time
from dataclasses import replace
from pathlib import Path

from topi_export.errors import BadInput


def _model_spec(m, model):
    from topi_export.models import builtin_names

    if model is not None:
        return model
    if m.model.source in builtin_names():
        return m.model.source
    raise BadInput(f"{m.root} was built from the model folder {m.model.source!r}: pass --model with that folder (a "
                   f"path recorded in an engine directory is not followed)")


def _slots(m, base_state):
    """The refit map's slots with engine-relative graph paths, and the parameters the build's adapters changed.
    Without a map (a directory built before maps existed): found by content, which needs unfused engines."""
    from topi_export.export.weights_map import REFIT_MAP, find_slots, read_refit_map

    onnx_paths = {Path(g.onnx).name: g.onnx for g in m.graphs.values() if g.onnx}
    if REFIT_MAP in m.files:
        slots, old = read_refit_map(m.file(REFIT_MAP))
        return [replace(s, graph=onnx_paths.get(Path(s.graph).name, s.graph)) for s in slots], old
    if not onnx_paths:
        raise BadInput(f"{m.root} holds {m.backend} engines that embed their weights and were built without "
                       f"--refittable: rebuild with --refittable to refit them, or build the adapters in with "
                       f"`build --lora`")
    if m.model.adapters:
        raise BadInput(f"{m.root} has no refit map ({REFIT_MAP}): rebuild it with this topi-export to refit it")
    return find_slots(m.root, list(onnx_paths.values()), base_state, m.precision), set()


def refit_engines(engine_dir, loras=(), out=None, *, model=None, force: bool = False, echo=print) -> Path:
    """Write `out`: the engines of `engine_dir` with `loras` ("FILE[:SCALE]" or lora.Adapter) fused in instead of
    their own adapters. Returns the new directory."""
    from topi_export.artifacts.manifest import file_entries, is_engine_dir, read_manifest, write_manifest
    from topi_export.backends import get_backend
    from topi_export.backends.base import RefitJob
    from topi_export.builder import Stages, _link_or_copy
    from topi_export.export.weights_map import REFIT_MAP, changed_parameters, write_refit_map
    from topi_export.fsutil import check_disjoint, check_output_dir, staged_dir
    from topi_export.lora import parse_adapters, require_peft
    from topi_export.models import load_model

    if out is None:
        raise BadInput("refit needs --out DIR: the engine directory it writes (the source stays as it is)")
    m = read_manifest(engine_dir)
    refit = getattr(get_backend(m.backend), "refit", None)
    if refit is None:
        raise BadInput(f"{m.backend} engines cannot be refitted: build the adapters in with `topi-export build "
                       f"--lora FILE[:SCALE]`")
    adapters = parse_adapters([a if isinstance(a, str) else a.flag() for a in loras])
    if adapters:
        require_peft()
    spec = _model_spec(m, model)
    protect = {m.root: "the engine directory being refitted"}
    if Path(str(spec)).exists():
        protect[Path(str(spec))] = "the model folder"
    for a in adapters:
        protect[Path(a.path)] = "a LoRA file"
    check_output_dir(out, replace=force, is_ours=is_engine_dir, protect=protect)
    check_disjoint([(out, "--out"), (str(m.root), "--engine-dir")])

    stages = Stages(4, echo)
    stages(f"load the base model {spec} ({m.precision})")
    base = load_model(spec, dtype=m.precision)
    for key in ("config_hash", "weights_hash"):
        if getattr(base.identity(), key) != getattr(m.model, key):
            raise BadInput(f"{m.root} was built from another model ({key} {getattr(m.model, key)}, {spec} has "
                           f"{getattr(base.identity(), key)}): pass --model with the model the engines were built from")
    base_state = {k: v.detach().clone() for k, v in base.family.model.state_dict().items()}
    del base
    what = ", ".join(a.describe() for a in adapters) or "no adapter (the base weights)"
    stages(f"fuse {what}")
    new = load_model(spec, dtype=m.precision, adapters=adapters)
    new_state = new.family.model.state_dict()
    slots, old_changed = _slots(m, base_state)
    changed = frozenset(changed_parameters(base_state, new_state) | old_changed)
    echo(f"  {len(changed)} parameter(s) to rewrite (changed by the old or the new adapters)")
    with staged_dir(out, replace=force, is_ours=is_engine_dir, protect=protect, echo=echo) as tmp:
        stages(f"refit the {m.backend} engines")
        written = set(refit(RefitJob(m, tmp, tuple(slots), changed, new_state, echo)))
        for rel in m.files:  # everything else is the source's, byte for byte
            if rel not in written and rel != REFIT_MAP:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(m.file(rel), tmp / rel)
        if REFIT_MAP in m.files:
            from topi_export.export.weights_map import read_refit_map

            map_slots, _ = read_refit_map(m.file(REFIT_MAP))
            write_refit_map(tmp / REFIT_MAP, map_slots, new.fused_params)
        stages("write manifest (sha256 of every file)")
        files = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
        identity = replace(m.model, adapters=tuple(a.to_json() for a in adapters))
        manifest = replace(m, model=identity, files=file_entries(tmp, files), root=tmp,
                           created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        write_manifest(tmp, manifest)
    stages.finish()
    echo(f"refitted in {time.perf_counter() - stages.t0:.1f} s")
    return Path(out)
