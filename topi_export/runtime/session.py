"""A run session: model or engine directory + method settings + step engine, shared by run/bench/check."""
from __future__ import annotations

from dataclasses import dataclass

from topi_export.errors import TopiError
from topi_export.method import DEFAULT_POLICY, Selector, parse_buckets, validate_ratio

DEFAULT_RATIO = 0.5


@dataclass
class Session:
    engine: object
    settings: dict
    model_info: dict  # identity + in_channels/text_dim/pooled_dim/guidance_embeds
    manifest: object = None  # runtime.manifest.Manifest when running built engines
    adapter: object = None

    # --- inputs ---------------------------------------------------------------------------------
    def load_inputs(self, path, seed: int = 0):
        from topi_export.runtime import inputs as I

        if path:
            data = I.load_inputs(path)
        elif self.manifest is not None:
            lay = self.manifest.layout
            data = I.default_inputs(self.model_info["source"], _Dims(self.model_info), seed)
            if data.layout != lay:
                data = I.synthetic_inputs(_Dims(self.model_info), seed, lay.target_grid, lay.ref_grid, lay.text_tokens)
        else:
            data = I.default_inputs(self.model_info["source"], self.adapter, seed)
        I.check_inputs(data, _Dims(self.model_info))
        if self.manifest is not None:
            self.manifest.check_layout(data.layout)
        return data

    # --- selection ------------------------------------------------------------------------------
    def compiled_buckets(self):
        return tuple(self.manifest.bucket_ratios()) if self.manifest is not None else None

    def selector(self, data, *, ratio=None, tau=None, ratio_buckets=None, policy=None, seed=0) -> Selector:
        compiled = self.compiled_buckets()
        buckets = parse_buckets(ratio_buckets) if ratio_buckets else compiled or ()
        if compiled is not None and ratio_buckets and set(buckets) - set(compiled):
            raise TopiError(f"buckets {sorted(set(buckets) - set(compiled))} are not compiled in "
                            f"{self.manifest.path} (it has {list(compiled)}): rebuild with --ratio-buckets")
        if policy is None:
            policy = self.manifest.policy if self.manifest is not None else self.settings.get("policy", DEFAULT_POLICY)
        if tau is not None and ratio is not None:
            raise TopiError("give either --ratio or --tau, not both")
        if tau is None:
            if ratio is None:
                ratio = DEFAULT_RATIO if compiled is None or DEFAULT_RATIO in compiled else max(compiled)
            validate_ratio(ratio)
            if compiled is not None and ratio != 0 and ratio not in compiled:
                raise TopiError(f"ratio {ratio} is not a compiled bucket of {self.manifest.path} "
                                f"(buckets: {', '.join(map(str, compiled))}): pick one or rebuild with --ratio-buckets")
        return Selector(data.layout.num_ctx, ratio=ratio or 0.0, tau=tau, buckets=buckets, policy=policy,
                        grid=data.layout.ref_grid, seed=seed)

    def warmup(self, data, selector: Selector) -> None:
        from topi_export.runtime.loop import warmup

        keeps = [k for _, k in selector.bucket_keeps()] if selector.tau is not None else [selector.choose(None)[1]]
        for keep in keeps:
            warmup(self.engine, data, keep)

    def denoise(self, data, **kw):
        from topi_export.runtime.loop import denoise

        kw.setdefault("update_interval", self.settings["update_interval"])
        return denoise(self.engine, data, **kw)

    # --- reporting ------------------------------------------------------------------------------
    def describe(self, data, selector: Selector, steps: int) -> dict:
        return {"model": self.model_info["source"], "backend": self.engine.name,
                "engine_dir": str(self.manifest.path) if self.manifest is not None else None,
                "inputs": data.source, "steps": steps,
                "layout": {"text_tokens": data.layout.text_tokens, "target_grid": list(data.layout.target_grid),
                           "reference_grid": list(data.layout.ref_grid)},
                "selection": {"ratio": selector.ratio, "tau": selector.tau, "buckets": list(selector.buckets),
                              "policy": selector.policy},
                "method": {k: self.settings[k] for k in ("pivotal_layers", "prune_start", "update_interval", "source")}}

    @staticmethod
    def schedule_summary(schedule) -> str:
        anchors = [r["step"] for r in schedule if r["kind"] == "anchor"]
        keeps = sorted({r["keep"] for r in schedule if r["kind"] == "pruned"})
        total = sum(r["time_s"] for r in schedule)
        return (f"{len(schedule)} steps, anchors at {anchors}, pruned steps keep {keeps} context tokens, "
                f"{total:.2f} s in the transformer")

    @staticmethod
    def compare_table(report) -> str:
        t = report["time_s"]
        rows = [("", "time [s]", "speedup", "PSNR [dB]", "rel. L2"),
                ("unpruned", f"{t['full']:.3f}", "1.00x", "-", "-"),
                ("ToPi", f"{t['topi']:.3f}", f"{report['speedup']:.2f}x", f"{report['psnr_db']:.2f}",
                 f"{report['rel_l2']:.2e}")]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         for r in rows)


class _Dims:
    """Duck-typed stand-in for an adapter where only the input dimensions are needed."""

    def __init__(self, info):
        self.in_channels = info["in_channels"]
        self.text_dim = info["text_dim"]
        self.pooled_dim = info["pooled_dim"]


def model_info(loaded) -> dict:
    a = loaded.adapter
    return {**loaded.identity(), "in_channels": a.in_channels, "text_dim": a.text_dim, "pooled_dim": a.pooled_dim,
            "guidance_embeds": a.guidance_embeds}


def open_session(*, model=None, engine_dir=None, backend=None, calibration=None, update_interval=None,
                 prune_start=None, device="cpu", dtype="fp32") -> Session:
    from topi_export.backends import BACKENDS

    if backend is not None and backend not in BACKENDS:
        raise TopiError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if engine_dir is not None:
        from topi_export.runtime.manifest import open_engine_session

        return open_engine_session(engine_dir, backend=backend, model=model, update_interval=update_interval,
                                   device=device, dtype=dtype)
    if backend not in (None, "torch"):
        raise TopiError(f"--backend {backend} runs built engines: pass --engine-dir (build one with "
                        f"`topi-export build --backend {backend}`)")
    from topi_export.backends.torch import TorchEngine
    from topi_export.models import load_model
    from topi_export.runtime.settings import method_settings

    loaded = load_model(model)
    settings = method_settings(loaded.identity(), calibration, update_interval, prune_start)
    return Session(TorchEngine(loaded.adapter, settings, device, dtype), settings, model_info(loaded),
                   adapter=loaded.adapter)
