"""A run session: a family adapter, its method settings, a step engine (PyTorch or a built engine directory), and
the choices every front end shares (inputs, selector, warm-up, the loop). Used by run, bench, check, the diffusers
drop-ins and the Triton loop model."""
from __future__ import annotations

from dataclasses import dataclass

from topi_export.errors import BadInput, RebuildNeeded, TopiError
from topi_export.method import DEFAULT_POLICY, Selector, parse_buckets, validate_ratio
from topi_export.plan import Manifest, MethodSettings, ModelIdentity

DEFAULT_RATIO = 0.5
KV_CACHE_BASELINE = "kv-cache"  # compare.py: the unpruned cached loop of a KV-trained model


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

    # --- reference K/V cache (docs/design.md, "Reference K/V cache") ------------------------------------------
    @property
    def ref_kv(self) -> str | None:
        """The session's reference K/V mode when none is asked for: "exact" for a KV-trained model, else None."""
        return "exact" if self.family.kv_model else None

    def check_ref_kv(self, mode: str | None) -> str | None:
        """The reference K/V mode of a run (None: the session's), refused where the engines cannot run it."""
        from topi_export.method.schedule import check_ref_kv

        mode = check_ref_kv(mode) or self.ref_kv
        if mode == "reuse" and self.family.kv_model:
            raise BadInput(f"--ref-kv reuse: {self.source} is a KV-trained model whose reference K/V cache is exact "
                           f"(it is used without the flag): drop --ref-kv reuse")
        if mode is not None and not all(k in self.engine.graphs for k in ("extract", "cached")):
            raise RebuildNeeded(f"--ref-kv {mode}: {self.manifest.root if self.manifest else 'this engine'} has no "
                                f"extract and cached graphs: rebuild with `topi-export build --ref-kv reuse`")
        return mode
    # -----------------------------------------------------------------------------------------------------------

    # --- inputs ---------------------------------------------------------------------------------
    def load_inputs(self, path=None, seed: int = 0):
        from topi_export.artifacts import inputs as I

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
            if self.family.branches(data) > self.manifest.batch:
                raise BadInput(f"the request runs {self.family.branches(data)} guidance branches but "
                               f"{self.manifest.root} was built for {self.manifest.batch}: rebuild with --cfg")
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
        """The selector of one request (its layout's context size and reference grids)."""
        return self.selector_for(data.layout, ratio=ratio, tau=tau, ratio_buckets=ratio_buckets, policy=policy,
                                 seed=seed)

    def check_selection(self, **selection) -> None:
        """Refuse, before any request, a ratio / tau / buckets / policy the engines cannot serve."""
        for layout in (self.manifest.layouts if self.manifest is not None else ()):
            self.selector_for(layout, **selection)

    def selector_for(self, layout, *, ratio=None, tau=None, ratio_buckets=None, policy=None, seed=0) -> Selector:
        compiled = self.compiled_buckets()
        nc = layout.num_ctx
        buckets = parse_buckets(ratio_buckets, nc) if ratio_buckets else compiled or ()
        if compiled is not None and ratio_buckets and set(buckets) - set(compiled):
            raise TopiError(f"buckets {sorted(set(buckets) - set(compiled))} are not compiled in "
                            f"{self.manifest.root} (it has {list(compiled)}): rebuild with --ratio-buckets")
        if policy is None:
            policy = self.manifest.policy if self.manifest is not None else DEFAULT_POLICY
        if tau is not None and ratio is not None:
            raise BadInput("give either --ratio or --tau, not both")
        if tau is None and ratio is None and self.manifest is not None and self.manifest.tau is not None:
            tau = self.manifest.tau  # the build's --tau is the default of its engines
        if tau is None:
            if ratio is None:
                ratio = DEFAULT_RATIO if compiled is None or DEFAULT_RATIO in compiled else max(compiled)
            validate_ratio(ratio)
            if compiled is not None and ratio != 0 and ratio not in compiled:
                raise TopiError(f"ratio {ratio} is not a compiled bucket of {self.manifest.root} "
                                f"(buckets: {', '.join(map(str, compiled))}): pick one or rebuild with --ratio-buckets")
        return Selector(nc, ratio=ratio or 0.0, tau=tau, buckets=buckets, policy=policy, grids=layout.ref_grids,
                        seed=seed)

    # --- running --------------------------------------------------------------------------------
    def warmup(self, data, selector: Selector | None = None, dense: bool = False, ref_kv: str | None = None) -> None:
        from topi_export.runtime.loop import warmup

        keeps = []
        if selector is not None:
            keeps = [k for _, k in selector.bucket_keeps()] if selector.tau is not None else [selector.choose(None)[1]]
        warmup(self.engine, self.family, data, keeps, dense=dense, ref_kv=ref_kv or self.ref_kv)

    def denoise(self, data, *, steps: int, seed: int = 0, selector=None, mode: str = "topi", update_interval=None,
                progress: bool = False, desc: str | None = None, reuse=None, ref_kv: str | None = None,
                pruning_residual: bool = False):
        """One generation; ``reuse``: a plan.reuse.ReusePlan (see ``reuse_plan``), default none. ref_kv None: the
        session's mode (a KV-trained model's exact cache); the dense mode recomputes the references every step.
        ``pruning_residual``: the anchors measure the pruning residual (runtime/steps.py)."""
        from topi_export.plan.reuse import OFF
        from topi_export.runtime.loop import denoise

        return denoise(self.engine, self.family, data, steps=steps, seed=seed, selector=selector, mode=mode,
                       update_interval=update_interval or self.settings.update_interval,
                       scheduler_config=self.scheduler_config, progress=progress, desc=desc, reuse=reuse or OFF,
                       ref_kv=ref_kv, pruning_residual=pruning_residual)

    def ref_kv_report(self, data, result) -> dict:
        """The reference K/V cache of a run (``run --json`` "ref_kv"): mode, whether it is exact, its bytes."""
        layout = data.layout
        per_token = result.cache_bytes / layout.num_ctx if layout.num_ctx else 0
        exact = result.ref_kv == "exact"
        return {"mode": result.ref_kv, "exact": exact,
                "label": "exact: the model was trained with reference K/V caching" if exact else
                         "approximate: reference K/V recorded at each anchor are reused until the next one",
                "cache_bytes": result.cache_bytes,
                "cache_bytes_per_reference": [round(per_token * n) for n in layout.ref_sizes],
                "layers": self.family.num_layers, "heads": self.family.heads, "head_dim": self.family.head_dim}

    def reuse_plan(self, data, *, steps: int, reuse=None, order: int = 0, update_interval=None):
        """Which steps of this run reuse a velocity (method/reuse.py): ``reuse`` 'off' | 'auto' | N | None (the
        default: auto when the settings hold a criterion measured on this model)."""
        from topi_export.method.reuse import plan_reuse
        from topi_export.plan.limits import check_steps
        from topi_export.runtime.loop import schedule_sigmas

        check_steps(steps)
        dt = update_interval or self.settings.update_interval
        sigmas = schedule_sigmas(self.family, steps, data.layout, self.scheduler_config)
        return plan_reuse(reuse, order, sigmas, range(0, steps, dt), self.settings.reuse,
                          measured=self.settings.provenance == "measured", source=self.settings.source)

    def baseline_mode(self) -> str:
        """'dense' when the plain model can run (always for torch), else the in-engine unpruned step."""
        return "dense" if self.engine.has_dense else "full"

    # --- reporting ------------------------------------------------------------------------------
    def report(self, data, selector: Selector, steps: int, result, comparison=None, reuse=None):
        """The typed report of one run (``run --json``), with the comparison against the baseline when given."""
        from topi_export.plan.results import RunReport
        from topi_export.runtime.loop import psnr, rel_l2

        extra = {}
        time_s = {"topi": result.time_s}
        if comparison is not None:
            base = comparison.baseline
            time_s[comparison.mode] = base.time_s
            extra = dict(repeats=comparison.repeats, baseline="dense" if comparison.mode == "dense" else
                         "in-engine-full", speedup=comparison.speedup, speedup_spread=comparison.spread,
                         psnr_db=psnr(result.latents, base.latents), rel_l2=rel_l2(result.latents, base.latents))
            if data.target_latents is not None:
                extra["psnr_db_vs_truth"] = {"topi": psnr(result.latents, data.target_latents),
                                             "baseline": psnr(base.latents, data.target_latents)}
            # --- reference K/V cache: the cached unpruned loop, a KV model's own deployment ---
            if KV_CACHE_BASELINE in comparison.others:
                time_s[KV_CACHE_BASELINE] = comparison.others[KV_CACHE_BASELINE][0].time_s
                extra.update(speedup_vs_kv_cache=comparison.speedup_over(KV_CACHE_BASELINE),
                             speedup_vs_kv_cache_spread=comparison.spread_over(KV_CACHE_BASELINE))
            elif result.ref_kv == "exact" and comparison.mode == "full":  # the in-engine baseline is that loop
                extra.update(speedup_vs_kv_cache=comparison.speedup, speedup_vs_kv_cache_spread=comparison.spread)
        if result.ref_kv is not None:
            extra["ref_kv"] = self.ref_kv_report(data, result)
        return RunReport(
            model=self.source, family=self.family.name, backend=self.engine.name,
            engine_dir=str(self.manifest.root) if self.manifest is not None else None, inputs=data.source,
            steps=steps, guidance=self.family.guidance, true_cfg=self.family.branches(data) > 1,
            layout=data.layout.to_json(),
            selection={"ratio": selector.ratio, "tau": selector.tau, "buckets": list(selector.buckets),
                       "policy": selector.policy},
            method=self.settings.to_json(), schedule=tuple(result.schedule), time_s=time_s,
            reuse=reuse.to_json() if reuse is not None else None,
            computed_steps=sum(r.kind != "reuse" for r in result.schedule),
            engine_calls=sum(r.engine_calls for r in result.schedule),
            pruning_residual=any(r.residual is not None for r in result.schedule),
            adapters=[dict(a) for a in self.identity.adapters] or None, **extra)


def open_session(*, model=None, engine_dir=None, backend=None, calibration=None, update_interval=None,
                 prune_start=None, device="cpu", dtype="fp32", runtime_options=None, loras=(),
                 kv_cache=None) -> Session:
    """A session over an engine directory (its own backend, or a backend that runs the model itself as the
    reference), or over a model (no engine directory: a backend that runs the model itself). loras: lora.Adapter
    (or "FILE[:SCALE]") fused into the model the session runs itself; built engines hold theirs already. kv_cache:
    run the model as a KV-trained model (None: when --model is such a pipeline folder; an engine directory records
    it)."""
    from topi_export.artifacts.settings import method_settings
    from topi_export.backends import get_backend, model_backend
    from topi_export.backends.base import EngineSource
    from topi_export.models import load_model, scheduler_config_for

    be = get_backend(backend) if backend is not None else None
    if loras and any(isinstance(a, str) for a in loras):
        from topi_export.lora import parse_adapters

        loras = parse_adapters([str(a) if isinstance(a, str) else a.flag() for a in loras])
    if engine_dir is not None:
        from topi_export.artifacts.manifest import adapter as manifest_adapter, read_manifest

        m = read_manifest(engine_dir)
        family = manifest_adapter(m)
        if kv_cache is not None and kv_cache != family.kv_model:
            raise BadInput(f"--{'' if kv_cache else 'no-'}kv-cache: {m.root} was built "
                           f"{'with' if family.kv_model else 'without'} the reference K/V cache of a KV-trained "
                           f"model; drop the flag or rebuild")
        if calibration is not None or prune_start is not None:
            raise BadInput("--calibration / --prune-start are fixed when the engines are built: rebuild with them")
        settings = m.settings.with_overrides(update_interval).check(m.model.num_layers)
        be = be or get_backend(m.backend)
        if not be.BACKEND.builds:  # the model itself, as the reference of these engines
            _check_reference_adapters(m, loras)
            loaded = load_model(_model_of(m, model), adapters=loras, kv_model=family.kv_model)
            _check_same_model(m, loaded.identity())
            engine = be.open_engine(EngineSource(m, loaded.family, settings, device, dtype, runtime_options or {}))
            return Session(engine, loaded.family, settings, m.model, m, m.scheduler or None)
        if loras:
            raise BadInput(f"{m.root} holds {m.backend} engines whose weights are fixed at build time: to run them "
                           f"with other LoRA adapters, write new engines with `topi-export refit --engine-dir "
                           f"{m.root} --lora FILE[:SCALE] --out DIR`")
        if be.BACKEND.name != m.backend:
            raise BadInput(f"{m.root} holds {m.backend} engines, not {be.BACKEND.name}: run with --backend "
                           f"{m.backend} (or {model_backend()}), or build {be.BACKEND.name} engines")
        if (device, dtype) != ("cpu", "fp32"):
            raise BadInput(f"--device / --dtype place the model of --backend {model_backend()}; {m.backend} engines "
                           f"run where they were built for: drop them")
        if model is not None:
            _check_same_model(m, load_model(model).identity(), adapters=False)
        engine = be.open_engine(EngineSource(m, options=runtime_options or {}))
        return Session(engine, family, settings, m.model, m, m.scheduler or None)
    be = be or get_backend(model_backend())
    if be.BACKEND.builds:
        raise BadInput(f"--backend {be.BACKEND.name} runs built engines: pass --engine-dir (build one with "
                       f"`topi-export build --backend {be.BACKEND.name}`)")
    loaded = load_model(model, adapters=loras, kv_model=kv_cache)
    identity = loaded.identity()
    settings = method_settings(identity, loaded.family.default_settings(), calibration, update_interval, prune_start)
    engine = be.open_engine(EngineSource(None, loaded.family, settings, device, dtype, runtime_options or {}))
    return Session(engine, loaded.family, settings, identity, None, scheduler_config_for(model) if model else None)


def _model_of(m: Manifest, model):
    """The model to load as the reference of an engine directory: --model when given; else the built-in the
    engines were built from. A path recorded in the manifest is never followed (an engine directory is data, and
    it may come from elsewhere): the user names the model folder."""
    from topi_export.models import builtin_names

    if model is not None:
        return model
    if m.model.source in builtin_names():
        return m.model.source
    raise BadInput(f"{m.root} was built from the model folder {m.model.source!r}: pass --model with that folder to "
                   f"run the reference (a path recorded in an engine directory is not followed)")


def _check_same_model(m: Manifest, identity: ModelIdentity, adapters: bool = True) -> None:
    for key in ("config_hash", "weights_hash"):
        want, have = getattr(m.model, key), getattr(identity, key)
        if want != have:
            raise BadInput(f"{m.root} was built for another model ({key} {want} != {have} of {identity.source}): "
                           f"rebuild the engines for this model")
    if adapters and list(m.model.adapters) != list(identity.adapters):
        _check_reference_adapters(m, [])


def _check_reference_adapters(m: Manifest, loras) -> None:
    """The PyTorch reference of LoRA-fused engines needs the same adapter files at the same scales."""
    from topi_export.lora import describe_recorded, same_adapters

    if not same_adapters(loras, m.model.adapters):
        raise BadInput(f"{m.root} holds weights fused with LoRA {describe_recorded(m.model.adapters)}; the "
                       f"reference got {describe_recorded([a.to_json() for a in loras])}: pass the same files and "
                       f"scales with --lora FILE:SCALE")
