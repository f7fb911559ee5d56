"""``build``: export the portable graphs, build one backend's engines, write the manifest, all in a
temporary directory that is renamed into place only when everything succeeded."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.fsutil import staged_dir
from topi_export.method import parse_buckets
from topi_export.runtime.manifest import FORMAT, bucket_table, file_entries, write_manifest

ENGINE_ROOT = Path("engines")


def tool_versions(extra: dict | None = None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("topi-export", "torch", "diffusers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    out.update(extra or {})
    return out


class Stages:
    """Prints '[i/n] what (elapsed)' lines: progress for each build stage."""

    def __init__(self, total: int, echo):
        self.total, self.echo, self.i, self.t0 = total, echo, 0, time.perf_counter()

    def __call__(self, what: str):
        self.i += 1
        self.echo(f"[{self.i}/{self.total}] {what} ({time.perf_counter() - self.t0:.1f} s)")


def _onnx_meta(identity, layout, settings) -> dict:
    return {"model": {k: identity[k] for k in ("config_hash", "weights_hash")}, "layout": layout.describe(),
            "pivotal_layers": settings["pivotal_layers"], "prune_start": settings["prune_start"]}


def _reuse_onnx(onnx_dir: Path, meta: dict) -> bool:
    try:
        return json.loads((onnx_dir / "onnx_meta.json").read_text()) == meta and all(
            (onnx_dir / f"{g}.onnx").is_file() for g in ("anchor", "pruned"))
    except (OSError, json.JSONDecodeError):
        return False


def default_engine_dir(source: str, layout, backend: str) -> Path:
    name = Path(source).name if os.sep in source or Path(source).exists() else source
    return ENGINE_ROOT / f"{name}-{layout.describe()}-{backend}"


def build_engines(*, model=None, calibration=None, layout=None, inputs=None, ratio_buckets="0.3,0.5",
                  backend="onnxruntime", engine_dir=None, onnx_dir=None, policy=None, tau=None, force=False,
                  backend_options=None, echo=print) -> Path:
    from topi_export.backends import BACKENDS
    from topi_export.method import DEFAULT_POLICY, POLICIES
    from topi_export.models import load_model
    from topi_export.runtime.inputs import default_inputs, load_inputs
    from topi_export.runtime.settings import method_settings

    if backend not in BACKENDS or backend == "torch":
        raise TopiError(f"unknown build backend {backend!r}: choose onnxruntime, tensorrt or tensorrt-rtx")
    policy = policy or DEFAULT_POLICY
    if policy not in POLICIES:
        raise TopiError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    buckets = parse_buckets(ratio_buckets)
    trt = backend in ("tensorrt", "tensorrt-rtx")
    stages = Stages(5, echo)
    stages(f"load model {model or '(default)'}")
    loaded = load_model(model)
    identity = loaded.identity()
    settings = method_settings(identity, calibration)
    if tau is not None:
        settings["tau"] = float(tau)
    if layout is None:
        layout = (load_inputs(inputs, loaded.adapter) if inputs else default_inputs(identity["source"], loaded.adapter)).layout
    engine_dir = Path(engine_dir) if engine_dir else default_engine_dir(identity["source"], layout, backend)
    if engine_dir.exists() and not force:
        raise TopiError(f"{engine_dir} already exists: pass --force to replace it, or choose another --engine-dir")
    if trt:  # fail before the slow export when the backend is missing
        from topi_export.backends.tensorrt import import_trt

        import_trt(backend)
    with staged_dir(engine_dir) as tmp:
        graphs_dir = tmp / "onnx"
        meta = _onnx_meta(identity, layout, settings)
        if onnx_dir and _reuse_onnx(Path(onnx_dir), meta):
            stages(f"reuse ONNX graphs from {onnx_dir}")
            shutil.copytree(onnx_dir, graphs_dir, ignore=shutil.ignore_patterns("onnx_meta.json"))
        else:
            stages(f"export anchor + pruned ONNX graphs ({layout.describe()})")
            from topi_export.export import export_graphs

            graph_info = export_graphs(loaded.adapter, layout, settings, graphs_dir)
            (graphs_dir / "graphs.json").write_text(json.dumps(graph_info, indent=2))
            if onnx_dir:
                _save_onnx_copy(graphs_dir, Path(onnx_dir), meta)
        stages(f"build {backend} engines, buckets {list(buckets)}")
        table = bucket_table(buckets, layout.num_ctx)
        if backend == "onnxruntime":
            from topi_export.backends import onnxruntime as be

            built = be.build(graphs_dir, tmp, backend_options or {})
        else:
            from topi_export.backends import tensorrt as be

            built = be.build(graphs_dir, tmp, table, layout, backend, backend_options or {}, echo=echo)
        stages("write manifest (sha256 of every file)")
        files = [p.relative_to(tmp) for p in sorted(tmp.rglob("*")) if p.is_file()]
        data = {
            "format": FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {**identity, "in_channels": loaded.adapter.in_channels, "text_dim": loaded.adapter.text_dim,
                      "pooled_dim": loaded.adapter.pooled_dim, "guidance_embeds": loaded.adapter.guidance_embeds},
            "layout": {"text_tokens": layout.text_tokens, "target_grid": list(layout.target_grid),
                       "reference_grid": list(layout.ref_grid), "num_target": layout.num_target,
                       "num_ctx": layout.num_ctx},
            "graphs": built["graphs"],
            "buckets": table,
            "calibration": settings,
            "policy": policy,
            "backend": backend,
            "precision": built.get("precision", "fp32"),
            "target": built["target"],
            "files": file_entries(tmp, [str(f) for f in files]),
            "versions": tool_versions(built.get("versions")),
        }
        write_manifest(tmp, data)
        stages(f"move into place: {engine_dir}")
    return engine_dir


def _save_onnx_copy(src: Path, dst: Path, meta: dict) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)
    (dst / "onnx_meta.json").write_text(json.dumps(meta, indent=2))
