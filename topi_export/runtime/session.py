"""A run session: a family adapter, its method settings, a step engine (PyTorch or a built engine directory), and
the choices every front end shares (inputs, selector, warm-up, the loop). Used by run, bench, check, the diffusers
drop-ins and the Triton loop model."""
from __future__ import annotations

from dataclasses import dataclass

from topi_export.errors import TopiError
from topi_export.method import DEFAULT_POLICY, Selector, parse_buckets, validate_ratio
from topi_export.plan import Manifest, MethodSettings, ModelIdentity

DEFAULT_RATIO = 0.5


@dataclass
class Session:
    engine: object  # backends.base.StepEngine
    family: object  # models.base.Family (with weights for the torch backend)
    settings: MethodSettings
    identity: ModelIdentity
    manifest: Manifest | None = None
    scheduler_config: dict | None = None

    @property
    def source(self) -> str:
        return self.identity.source

    # --- inputs ---------------------------------------------------------------------------------
    def load_inputs(self, path=None, seed: int = 0):
        from topi_export.runtime import inputs as I

        if path:
            data = I.load_inputs(path, self.family)
        else:
            layout = self.manifest.layout if self.manifest is not None else None
            data = I.default_inputs(self.source, self.family, seed, layout)
        return self.check_inputs(data)

    def check_inputs(self, data):
        """Validate a request against the model and the engines; returns it with the layout it runs at (a family
        with a text mask pads a shorter prompt to a built text length)."""
        self.family.check_inputs(data)
        if self.manifest is not None:
            layout = self.served_layout(data.layout)
            if layout != data.layout:
                data = data.with_layout(layout)
            if self.family.batch(data) > self.manifest.batch:
                raise TopiError(f"the request runs {self.family.batch(data)} guidance branches but {self.manifest.root} "
                                f"was built for batch {self.manifest.batch}: rebuild with true CFG (--cfg)")
        return data

    def served_layout(self, layout):
        try:
            self.manifest.layout_index(layout)
            return layout
        except TopiError:
            if self.family.pads_text:
                fits = [b for b in self.manifest.layouts if b.target_grid == layout.target_grid
                        and b.ref_grids == layout.ref_grids and b.text_tokens >= layout.text_tokens]
                if fits:
                    return min(fits, key=lambda b: b.text_tokens)
            raise

    # --- selection ------------------------------------------------------------------------------
    def compiled_buckets(self):
        return tuple(self.manifest.buckets) if self.manifest is not None else None

    def selector(self, data, *, ratio=None, tau=None, ratio_buckets=None, policy=None, seed=0) -> Selector:
        compiled = self.compiled_buckets()
        nc = data.layout.num_ctx
        buckets = parse_buckets(ratio_buckets, nc) if ratio_buckets else compiled or ()
        if compiled is not None and ratio_buckets and set(buckets) - set(compiled):
            raise TopiError(f"buckets {sorted(set(buckets) - set(compiled))} are not compiled in "
                            f"{self.manifest.root} (it has {list(compiled)}): rebuild with --ratio-buckets")
        if policy is None:
            policy = self.manifest.policy if self.manifest is not None else DEFAULT_POLICY
        if tau is not None and ratio is not None:
            raise TopiError("give either --ratio or --tau, not both")
        if tau is None and ratio is None and self.manifest is not None and self.manifest.tau is not None:
            tau = self.manifest.tau  # the build's --tau is the default of its engines
        if tau is None:
            if ratio is None:
                ratio = DEFAULT_RATIO if compiled is None or DEFAULT_RATIO in compiled else max(compiled)
            validate_ratio(ratio)
            if compiled is not None and ratio != 0 and ratio not in compiled:
                raise TopiError(f"ratio {ratio} is not a compiled bucket of {self.manifest.root} "
                                f"(buckets: {', '.join(map(str, compiled))}): pick one or rebuild with --ratio-buckets")
        return Selector(nc, ratio=ratio or 0.0, tau=tau, buckets=buckets, policy=policy, grids=data.layout.ref_grids,
                        seed=seed)

    # --- running --------------------------------------------------------------------------------
    def warmup(self, data, selector: Selector | None = None, dense: bool = False) -> None:
        from topi_export.runtime.loop import warmup

        keeps = []
        if selector is not None:
            keeps = [k for _, k in selector.bucket_keeps()] if selector.tau is not None else [selector.choose(None)[1]]
        warmup(self.engine, self.family, data, keeps)
        if dense and self.engine.has_dense:
            import torch

            b = self.family.batch(data)
            with torch.inference_mode():
                self.engine.dense(data.initial_noise(0).expand(b, -1, -1).contiguous(), torch.full((b,), 0.5))

    def denoise(self, data, *, steps: int, seed: int = 0, selector=None, mode: str = "topi", update_interval=None,
                progress: bool = False, desc: str | None = None):
        from topi_export.runtime.loop import denoise

        return denoise(self.engine, self.family, data, steps=steps, seed=seed, selector=selector, mode=mode,
                       update_interval=update_interval or self.settings.update_interval,
                       scheduler_config=self.scheduler_config, progress=progress, desc=desc)

    def baseline_mode(self) -> str:
        """'dense' when the plain model can run (always for torch), else the in-engine unpruned step."""
        return "dense" if self.engine.has_dense else "full"

    # --- reporting ------------------------------------------------------------------------------
    def describe(self, data, selector: Selector, steps: int) -> dict:
        return {"model": self.source, "family": self.family.name, "backend": self.engine.name,
                "engine_dir": str(self.manifest.root) if self.manifest is not None else None,
                "inputs": data.source, "steps": steps, "guidance": self.family.guidance,
                "true_cfg": self.family.batch(data) > 1,
                "layout": data.layout.to_json(),
                "selection": {"ratio": selector.ratio, "tau": selector.tau, "buckets": list(selector.buckets),
                              "policy": selector.policy},
                "method": self.settings.to_json()}


def open_session(*, model=None, engine_dir=None, backend=None, calibration=None, update_interval=None,
                 prune_start=None, device="cpu", dtype="fp32") -> Session:
    from topi_export.backends import BACKENDS, get_backend
    from topi_export.models import adapter_for, load_model, scheduler_config_for
    from topi_export.runtime.settings import method_settings

    if backend is not None and backend not in BACKENDS:
        raise TopiError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if engine_dir is not None:
        from topi_export.runtime.manifest import read_manifest

        m = read_manifest(engine_dir)
        if calibration is not None or prune_start is not None:
            raise TopiError("--calibration / --prune-start are fixed when the engines are built: rebuild with them")
        settings = m.settings.with_overrides(update_interval).check(m.model.num_layers)
        backend = backend or m.backend
        if backend == "torch":
            loaded = load_model(model or m.model.source)
            _check_same_model(m, loaded.identity())
            engine = get_backend("torch").open_engine(family=loaded.family, settings=settings, device=device,
                                                      dtype=dtype)
            return Session(engine, loaded.family, settings, m.model, m, m.scheduler or None)
        if model is not None:
            _check_same_model(m, load_model(model).identity())
        if backend != m.backend:
            raise TopiError(f"{m.root} holds {m.backend} engines, not {backend}: run with --backend {m.backend} "
                            f"(or torch), or build {backend} engines")
        engine = get_backend(backend).open_engine(m)
        return Session(engine, adapter_for(m.model), settings, m.model, m, m.scheduler or None)
    if backend not in (None, "torch"):
        raise TopiError(f"--backend {backend} runs built engines: pass --engine-dir (build one with "
                        f"`topi-export build --backend {backend}`)")
    loaded = load_model(model)
    identity = loaded.identity()
    settings = method_settings(identity, loaded.family.default_settings(), calibration, update_interval, prune_start)
    engine = get_backend("torch").open_engine(family=loaded.family, settings=settings, device=device, dtype=dtype)
    return Session(engine, loaded.family, settings, identity, None, scheduler_config_for(model) if model else None)


def _check_same_model(m: Manifest, identity: ModelIdentity) -> None:
    for key in ("config_hash", "weights_hash"):
        want, have = getattr(m.model, key), getattr(identity, key)
        if want != have:
            raise TopiError(f"{m.root} was built for another model ({key} {want} != {have} of {identity.source}): "
                            f"rebuild the engines for this model")

