"""Peak memory of the influence computation in ONNX Runtime (CPU): the single-node function body that
materialised the [B, H, Nx, S] attention matrix versus query_lse + context_influence (query chunks).

    python3 scripts/influence_memory.py                  # B=1 H=4 Nx=4096 S=8704 Nc=4096 D=64, fp32
    python3 scripts/influence_memory.py --heads 2 --target 1024 --json out.json

Each variant runs in a fresh subprocess, with ONNX Runtime's CPU memory arena on (the default) and off; its
peak activation memory is the growth of the process's peak resident set size (getrusage ru_maxrss) across
session.run, after the session and the inputs exist. With the arena on, ORT also keeps the blocks it grew.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPSET = 20
VARIANTS = ("materialized", "chunked")


def materialized_model(opset: int = OPSET):
    """The single-node ``topi::influence_score`` body exported before query chunking (MatMul + Softmax
    over all keys: [B, H, Nx, S] scores, then probabilities)."""
    from onnx import TensorProto, helper

    c = helper.make_node

    def i64(name, vals):
        return c("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals))

    body = [
        c("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        c("MatMul", ["q_target", "kt"], ["logits"]),
        c("Shape", ["q_target"], ["d"], start=3, end=4),
        c("CastLike", ["d", "q_target"], ["d_f"]),
        c("Sqrt", ["d_f"], ["sqrt_d"]),
        c("Div", ["logits", "sqrt_d"], ["scaled"]),
        c("Softmax", ["scaled"], ["probs"], axis=-1),
        c("Shape", ["v_ctx"], ["nc"], start=2, end=3),
        c("Neg", ["nc"], ["start"]),
        i64("end", [2**62]),
        i64("ax_key", [3]),
        c("Slice", ["probs", "start", "end", "ax_key"], ["p_ctx"]),
        i64("ax_query", [2]),
        c("ReduceMean", ["p_ctx", "ax_query"], ["attn"], keepdims=0),
        c("ReduceL2", ["v_ctx", "ax_key"], ["vnorm"], keepdims=0),
        c("Mul", ["attn", "vnorm"], ["per_head"]),
        i64("ax_head", [1]),
        c("ReduceSum", ["per_head", "ax_head"], ["influence"], keepdims=0),
    ]
    fn = helper.make_function("topi", "influence_score", ["q_target", "k", "v_ctx"], ["influence"], body,
                              [helper.make_opsetid("", opset)])
    node = helper.make_node("influence_score", ["q", "k", "v"], ["influence"], domain="topi")
    return _model([node], [fn], opset)


def chunked_model(opset: int = OPSET):
    """What the exporter emits now: query_lse -> context_influence with their Loop bodies."""
    from topi_export.ops.onnx import PLUGIN_ATTRS, function_protos
    from onnx import helper

    nodes = [helper.make_node("query_lse", ["q", "k"], ["lse"], domain="topi", **PLUGIN_ATTRS),
             helper.make_node("context_influence", ["q", "k", "v", "lse"], ["influence"], domain="topi",
                              **PLUGIN_ATTRS)]
    fns = [f for f in function_protos(opset) if f.name in ("query_lse", "context_influence")]
    return _model(nodes, fns, opset)


def _model(nodes, functions, opset):
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    inputs = [vi(n, TensorProto.FLOAT, ["B", "H", f"N{n}", "D"]) for n in "qkv"]
    graph = helper.make_graph(nodes, "influence", inputs, [vi("influence", TensorProto.FLOAT, ["B", "Nc"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("topi", 1)])
    model.functions.extend(functions)
    return model


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def measure(variant: str, arena: bool, b: int, h: int, nx: int, s: int, nc: int, d: int, seed: int = 0) -> dict:
    """Run one variant in this process; returns peak RSS before / after session.run and the output."""
    import numpy as np
    import onnxruntime as ort

    import topi_export.ops.onnx  # noqa: F401  (both variants pay the same imports: equal baselines)

    model = {"materialized": materialized_model, "chunked": chunked_model}[variant]()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    so.enable_cpu_mem_arena = arena
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feed = {name: rng.standard_normal((b, h, n, d), dtype=np.float32) for name, n in (("q", nx), ("k", s), ("v", nc))}
    before = _maxrss_bytes()
    t0 = time.perf_counter()
    (out,) = session.run(None, feed)
    seconds = time.perf_counter() - t0
    after = _maxrss_bytes()
    return {"variant": variant, "arena": arena, "peak_rss_before_run": before, "peak_rss_after_run": after,
            "peak_activation_bytes": after - before, "run_seconds": round(seconds, 3),
            "influence": out.tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--target", type=int, default=4096, help="Nx, target (query) tokens")
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--context", type=int, default=4096, help="Nc, context tokens (the last keys)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--arena", type=int, choices=(0, 1), default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dims = (args.batch, args.heads, args.target, args.text + args.target + args.context, args.context, args.head_dim)
    if args.variant:
        print(json.dumps(measure(args.variant, bool(args.arena), *dims)))
        return 0

    import numpy as np

    runs = []
    for arena in (1, 0):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--arena", str(arena), "--batch", str(args.batch),
                   "--heads", str(args.heads), "--target", str(args.target), "--text", str(args.text),
                   "--context", str(args.context), "--head-dim", str(args.head_dim)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    outputs = [np.asarray(r.pop("influence")) for r in runs]
    rel = max(float(np.abs(o - outputs[0]).max() / np.abs(outputs[0]).max()) for o in outputs)
    b, h, nx, s, nc, d = dims
    print(f"B={b} H={h} Nx={nx} S={s} Nc={nc} D={d}, float32, ONNX Runtime {_ort_version()} CPU; "
          f"one [B,H,Nx,S] score tensor = {b * h * nx * s * 4 / 2**20:.0f} MiB")
    print(f"{'variant':<14} {'ORT arena':>9} {'peak activation':>16} {'peak RSS':>10} {'run':>8}")
    for r in runs:
        print(f"{r['variant']:<14} {'on' if r['arena'] else 'off':>9} {r['peak_activation_bytes'] / 2**20:>12.0f} MiB "
              f"{r['peak_rss_after_run'] / 2**20:>6.0f} MiB {r['run_seconds']:>7.2f}s")
    print(f"max relative difference between the outputs: {rel:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"dims": dict(zip("B H Nx S Nc D".split(), dims)), "runs": runs,
                                         "max_rel_diff": rel}, indent=2))
    return 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    sys.exit(main())
