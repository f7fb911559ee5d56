"""Engine builder for both TensorRT flavours (docs/design.md, "Backends"): parse the exported graphs, one
optimization profile per (layout, anchor) and (layout, bucket), strongly typed, AOT targets for TensorRT-RTX.

The builder config (profiles, optimization level, workspace, timing cache, weight stripping, TensorRT-RTX's
compute capabilities, no TF32 for fp32) comes from Polygraphy's ``CreateConfig`` / ``CreateConfigRTX`` and the
engine from its ``EngineBytesFromNetwork``. Kept by hand, because Polygraphy does not do it: the parse (a builder
with our logger, so every TensorRT message lands in build_log.txt, and each parser error with its node), the
read-back of every profile from TensorRT, and the strip-weights probe's verdict."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from topi_export.backends.base import BuildOutput
from topi_export.backends.tensorrt.common import (
    BUILD_LOG, DEFAULT_RTX_TARGET, ENGINE_FILES, PRECISIONS, TensorRTOptions, TensorRTRTXOptions,
    compute_capability_tuple, gpu_info, import_trt, make_logger, module_name, normalize_compute_capability,
    parse_workspace, polygraphy, profile_shapes, sm_name)
from topi_export.errors import TopiError


def strip_supported(trt) -> bool:
    """Weight-stripped engines refitted from the ONNX weights need STRIP_PLAN and the ONNX parser refitter."""
    return ("STRIP_PLAN" in trt.BuilderFlag.__members__ and hasattr(trt, "Refitter")
            and hasattr(trt, "OnnxParserRefitter"))


def config_loader(backend: str, trt, precision: str, caps, *, profiles=(), level=None, workspace=None,
                  cache_path=None, strip: bool = False, refit: bool = False):
    """Polygraphy's builder-config loader, a callable (builder, network) -> IBuilderConfig."""
    CreateConfig, Profile, PostprocessConfig, _, _ = polygraphy(backend)
    rtx = backend == "tensorrt-rtx"
    shaped = []
    for prof in profiles:
        p = Profile()
        for name, (lo, opt, hi) in prof.items():
            p.add(name, lo, opt, hi)
        shaped.append(p)
    # refit: any weights may be set later (BuilderFlag.REFIT); a stripped plan alone refits with identical weights
    kwargs = dict(profiles=shaped, builder_optimization_level=level, strip_plan=strip,
                  refittable=(strip and rtx) or refit,
                  memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace} if workspace else None,
                  load_timing_cache=str(cache_path) if cache_path else None)
    if rtx:
        kwargs["compute_capabilities"] = [compute_capability_tuple(c) for c in caps]
    else:
        kwargs["tf32"] = False  # fp32 means fp32: matches the PyTorch reference

    def finish(builder, network, config):
        if strip and not rtx and not refit:  # TensorRT refits a stripped plan with the same weights
            config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        if rtx and precision == "fp32" and "TF32" in trt.BuilderFlag.__members__:
            config.clear_flag(trt.BuilderFlag.TF32)
        if config.num_optimization_profiles != len(shaped):
            raise TopiError(f"TensorRT took {config.num_optimization_profiles} of {len(shaped)} optimization profiles: "
                            f"the graph's static dims do not match the layouts; re-export the graphs")

    return PostprocessConfig(CreateConfig(**kwargs), finish)


def build_engine_bytes(backend: str, builder, network, loader, cache_path=None):
    """Polygraphy's EngineBytesFromNetwork (it also saves the timing cache); None when TensorRT builds nothing."""
    from polygraphy.exception import PolygraphyException

    _, _, _, EngineBytesFromNetwork, logger = polygraphy(backend)
    with logger.verbosity(logger.CRITICAL):  # TensorRT's own messages go to our log; Polygraphy's chatter nowhere
        try:
            return EngineBytesFromNetwork((builder, network), config=loader,
                                          save_timing_cache=str(cache_path) if cache_path else None)()
        except PolygraphyException:
            return None


def _check_strip(trt, builder, log, caps, backend: str, gpu, strip: bool = True, refit: bool = False) -> None:
    """Build a one-MatMul refittable (weight-stripped) network for the same targets: some installs have the API but
    cannot build such engines (TensorRT-RTX 1.7.1 without a GPU fails in its compiler). Refuse the flag then."""
    import numpy as np

    flag = " ".join(f for f, on in (("--strip-weights", strip), ("--refittable", refit)) if on)
    stage, log.stage = log.stage, f"{flag} probe"
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    x = network.add_input("x", trt.float32, (1, 16))
    w = network.add_constant((16, 16), trt.Weights(np.ones((16, 16), np.float32)))
    y = network.add_matrix_multiply(x, trt.MatrixOperation.NONE, w.get_output(0), trt.MatrixOperation.NONE)
    network.mark_output(y.get_output(0))
    ok = build_engine_bytes(backend, builder, network,
                            config_loader(backend, trt, "fp32", caps, strip=strip, refit=refit)) is not None
    errors = log.errors(log.stage)
    log.stage = stage
    if not ok:
        first = (errors or ["no error logged"])[0].split(" (")[0]
        where = " without a GPU" if gpu is None else ""
        raise TopiError(f"{flag}: {trt.__name__} {trt.__version__} cannot build "
                        f"{'weight-stripped, ' if strip else ''}refittable engines{where} ({first}): drop {flag}"
                        f"{' (the engine then holds the weights)' if strip else ''}"
                        f"{' or build on the GPU the engines are for' if where else ''}")
    log.note(f"{flag}: such engines can be built here (probe passed)")


def _register_plugins(backend: str, trt_name: str, log, echo, masked: bool = False) -> bool:
    """True when the topi plugins are registered with trt_name; otherwise prints why and returns False
    (the parser then inlines the topi function bodies)."""
    def note(msg):
        echo(f"  note: {msg}")
        log.note(msg)

    if backend == "tensorrt-rtx":
        note("TensorRT-RTX has no Python plugin API (tensorrt_rtx.plugin): the ONNX parser inlines the topi "
             "function bodies")
        return False
    try:
        from topi_export.kernels import trt_plugins

        trt_plugins.register_plugins(trt_name, masked=masked)
    except Exception as exc:  # noqa: BLE001 - any failure means "build without plugins"
        first = str(exc).splitlines()[0] if str(exc) else ""
        note(f"topi plugins not registered ({exc.__class__.__name__}: {first}); the ONNX parser inlines the topi "
             f"function bodies")
        return False
    msg = "topi plugins registered (namespace 'topi', version '1'): topi nodes import as fused plugins"
    echo(f"  {msg}")
    log.note(msg)
    return True


def _parser_errors(parser) -> list[str]:
    errs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = ", ".join(x for x in (f"node {e.node_name()}" if e.node_name() else "",
                                      f"op {e.node_operator()}" if e.node_operator() else "") if x)
        errs.append(f"{e.desc()}{' (' + where + ')' if where else ''}")
    return errs


def _rtx_targets(trt, options, echo, log):
    caps = [normalize_compute_capability(c) for c in options.compute_capabilities]
    gpu = gpu_info()
    if not caps:
        if gpu is not None:
            caps = [sm_name(gpu[1])]
            echo(f"  target: the GPU here, {gpu[0]} ({caps[0]})")
        else:
            caps = [DEFAULT_RTX_TARGET]
            echo(f"  target: {DEFAULT_RTX_TARGET} (no GPU here and no --compute-capability given)")
        log.note(f"compute capabilities: {caps} (default)")
    members = trt.ComputeCapability.__members__
    for c in caps:
        if c not in members or c in ("NONE", "CURRENT"):
            allowed = [m for m in members if m not in ("NONE", "CURRENT")]
            raise TopiError(f"compute capability {c} is not a TensorRT-RTX {trt.__version__} target: choose from "
                            f"{', '.join(allowed)} (Hopper SM90 and data-center GPUs need --backend tensorrt)")
    return list(dict.fromkeys(caps)), gpu


def _count_plugin_layers(trt, network) -> int:
    kinds = {getattr(trt.LayerType, n) for n in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, n)}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


def _read_back_profiles(builder, network, profiles, kind) -> list[dict]:
    """The profiles' shapes as TensorRT's own profile objects hold them (written to the build log, checked by the
    tests against the manifest): the inputs must be exactly the network's."""
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = sorted(set(names) - set(profiles[0]))
    extra = sorted(set(profiles[0]) - set(names))
    if missing or extra:
        raise TopiError(f"the {kind} network's inputs {names} do not match the graph entry "
                        f"(missing {missing}, unused {extra}): re-export the graphs")
    out = []
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name in names:
            p.set_shape(name, *prof[name])
        out.append({n: [list(s) for s in p.get_shape(n)] for n in names})
    return out


def build(job, backend: str) -> BuildOutput:
    """One engine per exported graph: topi.engine / cached.engine (one profile per job.profiles entry),
    extract.engine and dense.engine (one per layout)."""
    trt_name = module_name(backend)
    trt = import_trt(backend)
    echo = job.echo
    rtx = backend == "tensorrt-rtx"
    options = job.options or (TensorRTRTXOptions() if rtx else TensorRTOptions())
    if job.precision not in PRECISIONS:
        raise TopiError(f"--precision {job.precision!r}: choose one of {', '.join(PRECISIONS)}")
    workspace = parse_workspace(options.workspace)
    opt_level = options.optimization_level
    strip = bool(options.strip_weights)
    if strip and not strip_supported(trt):
        raise TopiError(f"--strip-weights needs weight-stripped engines (BuilderFlag.STRIP_PLAN) and "
                        f"OnnxParserRefitter, which {trt_name} {trt.__version__} lacks: drop --strip-weights (the "
                        f"engine then holds the weights)")
    log = make_logger(trt, verbose=bool(os.environ.get("TOPI_TRT_VERBOSE")))

    if rtx:
        caps, gpu = _rtx_targets(trt, options, echo, log)
    else:
        gpu = gpu_info()
        if gpu is None:
            raise TopiError("--backend tensorrt builds on the GPU the engines are for, and no CUDA GPU is visible "
                            "(torch.cuda.is_available() is False): build on that GPU, or use --backend tensorrt-rtx "
                            "for ahead-of-time builds on a machine without a GPU")
        caps = [sm_name(gpu[1])]

    import onnx

    from topi_export.ops.onnx import graph_has_key_mask

    # a graph whose influence nodes take a key mask (Qwen) needs the masked plugins (kernels/trt_plugins.py)
    masked = "topi" in job.graphs and graph_has_key_mask(
        onnx.load(str(Path(job.onnx_dir) / job.graphs["topi"].file), load_external_data=False))
    plugins = not options.no_plugins and _register_plugins(backend, trt_name, log, echo, masked)
    try:
        builder = trt.Builder(log)
    except Exception as exc:  # noqa: BLE001
        raise TopiError(f"{trt_name} could not create a Builder ({exc}): "
                        f"{'reinstall tensorrt-rtx-cu13' if rtx else 'check the NVIDIA driver and CUDA'}")
    if builder is None:
        raise TopiError(f"{trt_name} could not create a Builder: {(log.errors() or ['see its log'])[0]}")

    refit = bool(getattr(options, "refittable", False))
    if strip or refit:
        _check_strip(trt, builder, log, caps, backend, gpu, strip=strip, refit=refit)

    cache_path = Path(options.timing_cache) if options.timing_cache else None
    if cache_path is not None and rtx:
        # TensorRT-RTX deprecated timing caches in 1.2 (no-ops: kernels are compiled for the GPU at run time and
        # kept in its runtime cache, TOPI_TRT_RUNTIME_CACHE)
        msg = f"--timing-cache {cache_path} ignored: timing caches are no-ops in TensorRT-RTX"
        echo(f"  note: {msg}")
        log.note(msg)
        cache_path = None
    if "dense" in job.graphs and not strip:
        msg = ("the dense engine holds a second copy of the weights (each engine embeds its own): build with "
               "--strip-weights to keep one copy, in the ONNX weights file")
        echo(f"  note: {msg}")
        log.note(msg)

    built, stats, t_all = {}, {}, time.perf_counter()
    for kind in job.graphs:  # topi, or extract + cached (reference K/V cache), then dense
        t0 = time.perf_counter()
        log.stage = kind
        graph = job.graphs[kind]
        src = Path(job.onnx_dir) / graph.file
        profiles = profile_shapes(graph, kind, job.profiles, job.layouts, job.batch)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, log)
        ok = parser.parse_from_file(str(src))  # resolves weights.data next to the graph
        errors = _parser_errors(parser)
        for e in errors:
            log.lines.append((kind, "PARSER_ERROR", e))
        if not ok or errors:
            raise TopiError(f"{trt_name}'s ONNX parser rejected the {kind} graph ({len(errors)} error(s)); first: "
                            f"{errors[0] if errors else (log.errors(kind) or ['no message'])[0]}: re-export the "
                            f"graphs (rerun with TOPI_TRT_VERBOSE=1 for the parser's log)")
        plugin_layers = _count_plugin_layers(trt, network)
        log.note(f"parsed {src.name}: {network.num_layers} layers, {network.num_inputs} inputs, "
                 f"{network.num_outputs} outputs, {plugin_layers} plugin layers, parser errors: 0")
        if plugins and plugin_layers == 0:
            msg = "plugins registered but no plugin layer in the network: the parser inlined the topi functions"
            echo(f"  note: {kind}: {msg}")
            log.note(msg)

        # one line per engine, read back from TensorRT: [{input: [min, opt, max]}] (checked by the tests)
        log.note(f"profiles {json.dumps(_read_back_profiles(builder, network, profiles, kind), separators=(',', ':'))}")
        if cache_path is not None:
            log.note(f"timing cache {'loaded from' if cache_path.is_file() else 'new, saved to'} {cache_path}")
        loader = config_loader(backend, trt, job.precision, caps, profiles=profiles, level=opt_level,
                               workspace=workspace, cache_path=cache_path, strip=strip, refit=refit)
        serialized = build_engine_bytes(backend, builder, network, loader, cache_path)
        if serialized is None:
            raise TopiError(f"{trt_name} failed to build the {kind} engine: "
                            f"{(log.errors(kind) or ['no error logged; rerun with TOPI_TRT_VERBOSE=1'])[0]}")
        engine_file = Path(job.out_dir) / ENGINE_FILES[kind]
        with open(engine_file, "wb") as f:
            f.write(serialized)
        seconds, size = time.perf_counter() - t0, engine_file.stat().st_size
        log.note(f"built {engine_file.name}: {size} bytes, {len(profiles)} profile(s), {seconds:.1f} s")
        echo(f"  {kind}: {network.num_layers} layers, {len(profiles)} profile(s)"
             f"{', ' + str(plugin_layers) + ' topi plugin layer(s)' if plugin_layers else ''}, "
             f"{size / 1e6:.2f} MB in {seconds:.1f} s")
        built[kind] = engine_file.name
        stats[kind] = {"profiles": len(profiles), "layers": network.num_layers, "plugin_layers": plugin_layers,
                       "bytes": size}
        del parser, network, serialized

    if cache_path is not None:
        log.note(f"timing cache saved to {cache_path}")
    log.stage = "done"
    log.note(f"total {time.perf_counter() - t_all:.1f} s; warnings {sum(1 for x in log.lines if x[1] == 'WARNING')}, "
             f"errors {len(log.errors())}, parser errors 0")
    (Path(job.out_dir) / BUILD_LOG).write_text(log.text())

    # the GPU name is recorded only when the engines target the GPU they were built on
    built_for_gpu = gpu is not None and not (rtx and options.compute_capabilities)
    target = {"module": trt_name, "version": trt.__version__, "compute_capabilities": caps,
              "gpu": gpu[0] if built_for_gpu else None, "ahead_of_time": rtx, "precision": job.precision,
              "strongly_typed": True, "plugins": "topi" if plugins else "inlined",
              "weights": "stripped" if strip else "engine", "refittable": refit or (strip and rtx),
              "optimization_level": None if opt_level is None else int(opt_level), "workspace_bytes": workspace,
              "engines": stats}
    return BuildOutput(built, target, keep_onnx=strip, versions={trt_name: trt.__version__})
