"""Engine builder for both TensorRT flavours: parse, profiles per bucket, precision, AOT targets."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from topi_export.errors import TopiError
from topi_export.backends.tensorrt.common import (
    DEFAULT_RTX_TARGET, GRAPH_KINDS, PRECISIONS, _gpu_info, _make_logger, import_trt, module_name,
    normalize_compute_capability, onnx_input_shapes, parse_workspace, profile_table, sm_name)
from topi_export.export.precision import autocast_onnx

def _import_plugins():
    try:
        from plugins import trt_plugins  # repo checkout on sys.path
    except ImportError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "plugins" / "trt_plugins.py").is_file():
            raise
        sys.path.insert(0, str(root))
        from plugins import trt_plugins
    return trt_plugins


def _register_plugins(backend: str, trt_name: str, log, echo) -> bool:
    """True when the topi plugins are registered with trt_name; otherwise prints why and returns False
    (the parser then inlines the topi function bodies)."""
    if backend == "tensorrt-rtx":
        msg = ("TensorRT-RTX has no Python plugin API (tensorrt_rtx.plugin): the ONNX parser inlines the topi "
               "function bodies")
        echo(f"  note: {msg}")
        log.note(msg)
        return False
    try:
        trt_plugins = _import_plugins()
        trt_plugins.register_plugins(trt_name)
    except Exception as exc:  # noqa: BLE001 - any failure means "build without plugins"
        msg = (f"topi plugins not registered ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
               f"the ONNX parser inlines the topi function bodies")
        echo(f"  note: {msg}")
        log.note(msg)
        return False
    msg = "topi plugins registered (namespace 'topi', version '1'): topi nodes import as fused plugins"
    echo(f"  {msg}")
    log.note(msg)
    return True


def _parser_errors(parser) -> str:
    errs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = ", ".join(x for x in (f"node {e.node_name()}" if e.node_name() else "",
                                      f"op {e.node_operator()}" if e.node_operator() else "") if x)
        errs.append(f"{e.desc()}{' (' + where + ')' if where else ''}")
    return errs


def _rtx_targets(trt, options, echo, log):
    caps = [normalize_compute_capability(c) for c in options.get("compute_capabilities") or []]
    gpu = _gpu_info()
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
    return caps, gpu


def build(graphs_dir, out_dir, bucket_table, layout, backend, options, echo=print) -> dict:
    """Build anchor.engine and pruned.engine into out_dir; returns the manifest's graphs/target/precision."""
    trt_name = module_name(backend)
    trt = import_trt(backend)
    graphs_dir, out_dir = Path(graphs_dir), Path(out_dir)
    options = dict(options or {})
    precision = options.get("precision") or "fp32"
    if precision not in PRECISIONS:
        raise TopiError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    workspace = parse_workspace(options.get("workspace"))
    opt_level = options.get("optimization_level")
    log = _make_logger(trt, verbose=bool(os.environ.get("TOPI_TRT_VERBOSE")))
    rtx = backend == "tensorrt-rtx"

    shapes = {k: onnx_input_shapes(graphs_dir / f"{k}.onnx") for k in GRAPH_KINDS}
    table = profile_table(bucket_table, layout, shapes)

    if rtx:
        caps, gpu = _rtx_targets(trt, options, echo, log)
    else:
        if options.get("compute_capabilities"):
            raise TopiError("--compute-capability is a TensorRT-RTX option: data-center TensorRT builds for the "
                            "GPU it runs on (use --backend tensorrt-rtx for ahead-of-time targets)")
        gpu = _gpu_info()
        if gpu is None:
            raise TopiError("--backend tensorrt builds on the GPU the engines are for, and no CUDA GPU is visible "
                            "(torch.cuda.is_available() is False); build on that GPU, or use --backend tensorrt-rtx "
                            "for ahead-of-time builds on a machine without a GPU")
        caps = [sm_name(gpu[1])]

    plugins = bool(options.get("plugins", True)) and _register_plugins(backend, trt_name, log, echo)
    try:
        builder = trt.Builder(log)
    except Exception as exc:  # noqa: BLE001
        raise TopiError(f"{trt_name} could not create a Builder ({exc}): "
                        f"{'check the NVIDIA driver and CUDA' if not rtx else 'reinstall tensorrt-rtx-cu13'}")
    if builder is None:
        raise TopiError(f"{trt_name} could not create a Builder: {(log.errors() or ['see its log'])[0]}")

    cache_path = Path(options["timing_cache"]) if options.get("timing_cache") else None
    if cache_path is not None and rtx:
        # TensorRT-RTX deprecated timing caches in 1.2 (no-ops: it does not time tactics; kernels are compiled
        # for the GPU at run time, see its runtime cache, TOPI_TRT_RUNTIME_CACHE).
        msg = f"--timing-cache {cache_path} ignored: timing caches are no-ops in TensorRT-RTX"
        echo(f"  note: {msg}")
        log.note(msg)
        cache_path = None
    timing_cache = None
    graphs, t_all = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="topi-trt-") as scratch:
        for kind in GRAPH_KINDS:
            t0 = time.perf_counter()
            log.stage = kind
            src = graphs_dir / f"{kind}.onnx"
            parse_path, cast_stats = src, None
            if precision != "fp32":
                import onnx

                from topi_export.export.graphs import save_model
                from topi_export.ops.onnx import register_schemas

                register_schemas()
                model, cast_stats = autocast_onnx(onnx.load(str(src)), precision)
                parse_path = Path(scratch) / f"{kind}.{precision}.onnx"
                save_model(model, parse_path)
                del model
                echo(f"  {kind}: {precision} autocast: {cast_stats['low_nodes']} nodes in {precision}, "
                     f"{cast_stats['fp32_nodes']} kept fp32, {cast_stats['casts']} casts")
                log.note(f"autocast {json.dumps(cast_stats)}")

            flags = 0
            if "STRONGLY_TYPED" in trt.NetworkDefinitionCreationFlag.__members__:
                flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, log)
            ok = parser.parse_from_file(str(parse_path))
            errors = _parser_errors(parser)
            for e in errors:
                log.lines.append((kind, "PARSER_ERROR", e))
            if not ok or errors:
                raise TopiError(f"{trt_name}'s ONNX parser rejected the {kind} graph ({len(errors)} error(s)); "
                                f"first: {errors[0] if errors else (log.errors(kind) or ['no message'])[0]}")
            log.note(f"parsed {src.name}: {network.num_layers} layers, {network.num_inputs} inputs, "
                     f"{network.num_outputs} outputs, parser errors: 0")
            plugin_layers = _count_plugin_layers(trt, network)
            if plugins and plugin_layers == 0:
                msg = "plugins registered but no plugin layer in the network: the parser inlined the topi functions"
                echo(f"  note: {kind}: {msg}")
                log.note(msg)

            config = builder.create_builder_config()
            if precision == "fp32" and "TF32" in trt.BuilderFlag.__members__:
                config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: matches the PyTorch reference
            if opt_level is not None:
                config.builder_optimization_level = int(opt_level)
            if workspace is not None:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
            if rtx:
                config.num_compute_capabilities = len(caps)
                for i, c in enumerate(caps):
                    config.set_compute_capability(getattr(trt.ComputeCapability, c), i)
            if cache_path is not None:
                if timing_cache is None:
                    data = cache_path.read_bytes() if cache_path.is_file() else b""
                    timing_cache = config.create_timing_cache(data)
                    log.note(f"timing cache {'loaded from' if data else 'new, saved to'} {cache_path}")
                if not config.set_timing_cache(timing_cache, False):
                    raise TopiError(f"timing cache {cache_path} does not match this {trt_name} / GPU: delete it or "
                                    f"pass another --timing-cache")

            profiles_out = _add_profiles(trt, builder, config, network, table[kind], bucket_table, kind)
            if config.num_optimization_profiles != len(table[kind]):
                raise TopiError(f"{trt_name} accepted {config.num_optimization_profiles} of {len(table[kind])} "
                                f"optimization profiles for the {kind} engine")
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise TopiError(f"{trt_name} failed to build the {kind} engine: "
                                f"{(log.errors(kind) or ['no error logged; rerun with TOPI_TRT_VERBOSE=1'])[0]}")
            engine_file = out_dir / f"{kind}.engine"
            with open(engine_file, "wb") as f:
                f.write(serialized)
            seconds = time.perf_counter() - t0
            size = engine_file.stat().st_size
            log.note(f"built {engine_file.name}: {size} bytes, {len(profiles_out)} profile(s), {seconds:.1f} s")
            echo(f"  {kind}: {network.num_layers} layers, {len(profiles_out)} profile(s)"
                 f"{', ' + str(plugin_layers) + ' topi plugin layer(s)' if plugin_layers else ''}, "
                 f"{size / 1e6:.1f} MB in {seconds:.1f} s")
            graphs[kind] = {"file": engine_file.name, "onnx": f"onnx/{kind}.onnx", "profiles": profiles_out,
                            "layers": network.num_layers, "plugin_layers": plugin_layers,
                            "build_seconds": round(seconds, 3)}
            if cast_stats:
                graphs[kind]["autocast"] = cast_stats
            del parser, network, config, serialized

    if timing_cache is not None and cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + f".tmp-{os.getpid()}")
        tmp.write_bytes(bytes(timing_cache.serialize()))
        os.replace(tmp, cache_path)
        log.stage = "done"
        log.note(f"timing cache saved to {cache_path}")
    log.stage = "done"
    log.note(f"total {time.perf_counter() - t_all:.1f} s; warnings {sum(1 for l in log.lines if l[1] == 'WARNING')}, "
             f"errors {len(log.errors())}, parser errors 0")
    (out_dir / "build_log.txt").write_text(log.text())

    version_key = trt_name  # "tensorrt" | "tensorrt_rtx"
    # the GPU name is recorded only when the engines target the GPU they were built on
    built_for_gpu = gpu is not None and not (rtx and options.get("compute_capabilities"))
    target = {"module": trt_name, "version": trt.__version__, "compute_capabilities": caps,
              "gpu": gpu[0] if built_for_gpu else None,
              "ahead_of_time": rtx, "strongly_typed": True,
              "plugins": "topi" if plugins else "inlined",
              "optimization_level": None if opt_level is None else int(opt_level),
              "workspace_bytes": workspace}
    return {"graphs": graphs, "target": target, "precision": precision, "versions": {version_key: trt.__version__}}


def _count_plugin_layers(trt, network) -> int:
    kinds = {getattr(trt.LayerType, n) for n in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, n)}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


def _add_profiles(trt, builder, config, network, profiles, bucket_table, kind) -> list[dict]:
    """Add the profiles to config; returns them as read back from TensorRT's profile objects."""
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    out = []
    for index, prof in enumerate(profiles):
        missing = sorted(set(names) - set(prof))
        if missing:
            raise TopiError(f"the {kind} network has inputs {missing} that the profile table does not cover")
        p = builder.create_optimization_profile()
        for name in names:
            lo, opt, hi = prof[name]
            p.set_shape(name, lo, opt, hi)
        idx = config.add_optimization_profile(p)
        if idx != index:
            raise TopiError(f"TensorRT rejected optimization profile {index} of the {kind} engine (returned {idx})")
        shapes = {}
        for name in names:
            lo, opt, hi = p.get_shape(name)
            shapes[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        entry = {"index": index, "shapes": shapes}
        if kind == "pruned":
            entry.update(ratio=bucket_table[index]["ratio"], keep=int(bucket_table[index]["keep"]))
        out.append(entry)
    return out


