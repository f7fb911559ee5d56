"""What one graph for every step costs on pruned steps (docs/design.md, "Graphs").

The deployed `topi` graph serves anchors and pruned steps: a pruned step passes one scored query, so it still runs
the influence nodes on that query. This script exports, next to it, a graph that can ONLY run pruned steps (the
same model with keep_idx and no influence output) and times a pruned step of each on ONNX Runtime, interleaved,
median of --reps. Usage:

    python scripts/single_graph_cost.py --model mid-kontext --target-grid 32x32 --text-tokens 128 --ratio 0.5
    python scripts/single_graph_cost.py --model flux2-pick --target-grid 16x16 --ref-grids 16x16,16x16,16x16 \
        --text-tokens 8 --ratio 0.5
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topi_export.export.graphs import example_feed, export_graph  # noqa: E402
from topi_export.models import load_model  # noqa: E402
from topi_export.plan import Layout, keep_count, parse_grid, parse_grids  # noqa: E402


def export_pruned_only(family, settings, feed, path):
    """The same model as the topi graph, with keep_idx and no influence output: it can only run pruned steps."""
    import inspect

    from torch.export import Dim

    from topi_export.ops.onnx import attach_functions, register_schemas, translation_table

    register_schemas()
    names = [k for k in feed if k != "score_idx"]

    class PrunedOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = family.model

        def forward(self, *args, **kwargs):
            kw = {**dict(zip(names, args)), **kwargs}
            core = {k: kw.pop(k) for k in ("latents", "context", "timestep", "keep_idx")}
            v, _ = family.forward(core["latents"], core["context"], core["timestep"], kw, keep_idx=core["keep_idx"],
                                  prune_start=settings.prune_start)
            return v

    param = inspect.Parameter
    PrunedOnly.forward.__signature__ = inspect.Signature(
        [param("self", param.POSITIONAL_OR_KEYWORD)] + [param(n, param.POSITIONAL_OR_KEYWORD) for n in names])
    dyn = {n: None for n in names}
    dyn.update(latents={1: Dim.AUTO}, context={1: Dim.AUTO}, keep_idx={0: Dim.AUTO})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(PrunedOnly().eval(), (), kwargs={n: feed[n] for n in names}, dynamo=True,
                                    dynamic_shapes=dyn, input_names=names, output_names=["velocity"],
                                    custom_translation_table=translation_table(), optimize=True)
    program.save(str(path), external_data=True)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    attach_functions(model)
    onnx.save_model(model, str(path))


def main():
    import onnxruntime as ort

    from topi_export.backends.onnxruntime import session_options

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mid-kontext")
    ap.add_argument("--target-grid", default="32x32")
    ap.add_argument("--ref-grids", default=None, help="reference grids HxW,HxW (default: the target grid)")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    loaded = load_model(args.model)
    fam = loaded.family
    settings = fam.default_settings()
    grid = parse_grid(args.target_grid)
    layout = Layout(args.text_tokens, grid, parse_grids(args.ref_grids) if args.ref_grids else (grid,))
    data = fam.synthetic_inputs(layout, 0)
    work = Path(tempfile.mkdtemp(prefix="single-graph-"))
    export_graph(fam, settings, data, layout, "topi", work / "topi.onnx")
    keep = keep_count(args.ratio, layout.num_ctx)
    feed = example_feed(fam, data, layout, "topi", keep=keep, queries=1, batch=1)
    export_pruned_only(fam, settings, feed, work / "pruned.onnx")
    sessions = {k: ort.InferenceSession(str(work / f"{k}.onnx"), session_options(), providers=["CPUExecutionProvider"])
                for k in ("topi", "pruned")}
    feeds = {}
    for k, s in sessions.items():
        names = [i.name for i in s.get_inputs()]
        feeds[k] = {n: feed[n].numpy() for n in names}
    outs = {k: s.run(None, feeds[k])[0] for k, s in sessions.items()}  # warm-up and equality
    times = {k: [] for k in sessions}
    for _ in range(args.reps):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"model": args.model, "layout": layout.describe(), "ratio": args.ratio, "keep": keep,
              "topi_pruned_step_ms": med["topi"], "pruned_only_step_ms": med["pruned"],
              "overhead": med["topi"] / med["pruned"] - 1, "reps": args.reps,
              "max_abs_diff": float(np.abs(outs["topi"][0] - outs["pruned"]).max())}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
