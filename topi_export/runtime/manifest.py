"""manifest.json of an engine directory (DESIGN §3): what was built, for which model, shape, buckets,
calibration, backend and target, with the sha256 of every file. The runtime refuses a directory whose
manifest does not match its files or what it is asked to run."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.method import DEFAULT_POLICY, keep_count
from topi_export.models import Layout

FORMAT = "topi-engines/1"
NAME = "manifest.json"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(root: Path, rel_paths) -> dict:
    return {str(p): {"sha256": sha256_file(root / p), "bytes": (root / p).stat().st_size} for p in sorted(rel_paths)}


def bucket_table(ratios, num_ctx: int) -> list[dict]:
    """One optimization profile per bucket, in ascending ratio order: profile i <-> bucket i."""
    return [{"ratio": r, "keep": keep_count(r, num_ctx), "profile": i} for i, r in enumerate(ratios)]


@dataclass
class Manifest:
    data: dict
    path: Path

    @property
    def layout(self) -> Layout:
        lay = self.data["layout"]
        return Layout(lay["text_tokens"], tuple(lay["target_grid"]), tuple(lay["reference_grid"]))

    @property
    def backend(self) -> str:
        return self.data["backend"]

    @property
    def policy(self) -> str:
        return self.data.get("policy", DEFAULT_POLICY)

    @property
    def settings(self) -> dict:
        return dict(self.data["calibration"])

    def bucket_ratios(self):
        return [b["ratio"] for b in self.data["buckets"]]

    def profile_for(self, keep: int) -> int:
        for b in self.data["buckets"]:
            if b["keep"] == keep:
                return b["profile"]
        raise TopiError(f"no compiled bucket keeps {keep} tokens in {self.path}: buckets are "
                        f"{[(b['ratio'], b['keep']) for b in self.data['buckets']]}")

    def file(self, rel: str) -> Path:
        return self.path / rel

    def graph_file(self, kind: str) -> Path:
        return self.file(self.data["graphs"][kind]["file"])

    def check_layout(self, layout: Layout) -> None:
        built = self.layout
        if layout != built:
            raise TopiError(f"inputs are {layout.describe()} (text tokens, target grid, reference grid) but "
                            f"{self.path} was built for {built.describe()}: rebuild with "
                            f"`topi-export build --inputs FILE` or matching --target-grid/--ref-grid/--text-tokens")

    def check_model(self, identity: dict) -> None:
        want = self.data["model"]
        for key in ("config_hash", "weights_hash"):
            if want[key] != identity[key]:
                raise TopiError(f"{self.path} was built for another model ({key} {want[key]} != {identity[key]} "
                                f"of {identity['source']}): rebuild the engines for this model")


def read_manifest(engine_dir, verify_files: bool = True) -> Manifest:
    root = Path(engine_dir)
    path = root / NAME
    if not root.is_dir():
        raise TopiError(f"engine directory {root} not found: build it with `topi-export build --engine-dir {root}`")
    if not path.is_file():
        raise TopiError(f"{root} has no {NAME}: it is not a topi-export engine directory; rebuild with "
                        f"`topi-export build --engine-dir {root}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TopiError(f"{path} is not valid JSON ({exc.__class__.__name__}): rebuild the engine directory")
    if data.get("format") != FORMAT:
        raise TopiError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}: rebuild with this "
                        f"topi-export version")
    for key in ("model", "layout", "graphs", "buckets", "calibration", "backend", "files"):
        if key not in data:
            raise TopiError(f"{path} lacks '{key}': the manifest was edited or truncated; rebuild the engines")
    m = Manifest(data, root)
    _check_buckets(m)
    if verify_files:
        verify(m)
    return m


def _check_buckets(m: Manifest) -> None:
    ratios = m.bucket_ratios()
    num_ctx = m.layout.num_ctx
    if ratios != sorted(set(ratios)):
        raise TopiError(f"buckets in {m.path / NAME} are not ascending and unique ({ratios}): the manifest was "
                        f"edited; rebuild the engines")
    expected = bucket_table(ratios, num_ctx)
    for got, want in zip(m.data["buckets"], expected):
        if got.get("keep") != want["keep"] or got.get("profile") != want["profile"]:
            raise TopiError(f"bucket {got} in {m.path / NAME} does not match its ratio (expected keep "
                            f"{want['keep']}, profile {want['profile']} for {num_ctx} context tokens): the manifest "
                            f"was edited; rebuild the engines")


def verify(m: Manifest) -> None:
    files = m.data["files"]
    for kind, graph in m.data["graphs"].items():
        if graph["file"] not in files:
            raise TopiError(f"{kind} engine {graph['file']} is not listed in {m.path / NAME}: rebuild the engines")
    for rel, entry in files.items():
        p = m.path / rel
        if not p.is_file():
            raise TopiError(f"engine file {p} is missing: rebuild with `topi-export build --engine-dir {m.path}`")
        if sha256_file(p) != entry["sha256"]:
            raise TopiError(f"engine file {p} does not match its sha256 in {NAME} (modified after the build): "
                            f"rebuild with `topi-export build --engine-dir {m.path} --force`")


def open_engine_session(engine_dir, *, backend=None, model=None, update_interval=None, device="cpu", dtype="fp32"):
    from topi_export.runtime.session import Session, model_info

    m = read_manifest(engine_dir)
    backend = backend or m.backend
    settings = m.settings
    if update_interval is not None:
        settings["update_interval"] = int(update_interval)
    info = dict(m.data["model"])
    if backend == "torch":
        from topi_export.backends.torch import TorchEngine
        from topi_export.models import load_model

        loaded = load_model(model or info["source"])
        m.check_model(loaded.identity())
        return Session(TorchEngine(loaded.adapter, settings, device, dtype), settings, model_info(loaded), manifest=m,
                       adapter=loaded.adapter)
    if model is not None:
        from topi_export.models import load_model

        m.check_model(load_model(model).identity())
    if backend != m.backend:
        raise TopiError(f"{m.path} holds {m.backend} engines, not {backend}: run with --backend {m.backend} "
                        f"(or torch), or build {backend} engines")
    if backend == "onnxruntime":
        from topi_export.backends.onnxruntime import OrtEngine

        engine = OrtEngine(m)
    else:
        from topi_export.backends.tensorrt.runtime import TensorRTEngine

        engine = TensorRTEngine(m)
    return Session(engine, settings, info, manifest=m)


def write_manifest(root: Path, data: dict) -> None:
    (root / NAME).write_text(json.dumps(data, indent=2) + "\n")
