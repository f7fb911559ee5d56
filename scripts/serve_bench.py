"""Serving numbers: requests per second and p50 / p99 latency of the generated loop model on a real tritonserver
for C concurrent clients, against the same requests run in-process, and the per-request overhead of BLS.

    python scripts/serve_bench.py --engine-dir E --env ENV [--clients 1,2,4] [--requests 4,3,2] [--steps 28]
                                  [--instances 1,2] [--ort-threads N] [--json out.json]

What it does (docs/triton.md, "Serving numbers"):
1. An inputs file for E's first layout (every tensor the family declares, seeded), or --inputs FILE.
2. In-process: ``serving/triton_engine.py run_request`` on a session of E opened as `topi-export run --engine-dir`
   opens it (ONNX Runtime in this process): the same request handling as the loop model, without Triton. One
   warm-up, then requests one after another: latency per request, requests per second.
3. Served: for each --instances value, the repository `topi-export triton --engine-models python --kind cpu`
   writes, on tritonserver (nvidia-pytriton of ENV, loopback, free ports); one warm-up request, then for each C
   of --clients, C gRPC clients each sending their share of --requests back to back (distinct seeds): latency
   of every request, requests per second = requests / wall time of the round.
4. BLS overhead (C = 1): the loop request's latency at the client, the loop's own time inside the server (the
   schedule's time_s) and the sum of its step times (each one an engine-model call over BLS + the host work of
   the step), against the in-process request and the sum of its step times (ONNX Runtime calls); and one anchor
   and one pruned engine call sent directly by a gRPC client against the same call in-process.
Prints a table and the load average before and after; --json writes everything.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_inputs(engine_dir, path, seed=7):
    """An inputs file for the engine directory's first layout: every tensor its family declares."""
    import torch

    from topi_export import Inputs, save_inputs
    from topi_export.artifacts.manifest import adapter, read_manifest

    m = read_manifest(engine_dir, verify_files=False)
    family, layout = adapter(m), m.layouts[0]
    g = torch.Generator().manual_seed(seed)
    tensors, scalars = {}, {}
    for spec in family.tensor_specs():
        if spec.role == "text":
            tensors[spec.name] = torch.randn(1, layout.text_tokens, spec.features, generator=g)
        elif spec.role == "mask":
            tensors[spec.name] = torch.ones(1, layout.text_tokens)
        elif spec.role == "pooled":
            tensors[spec.name] = torch.randn(1, spec.features, generator=g)
        else:
            scalars[spec.name] = spec.default
    save_inputs(path, Inputs(layout, torch.randn(1, layout.num_ctx, family.in_channels, generator=g), tensors,
                             scalars))
    return path


def request_arrays(path, **options):
    from safetensors import safe_open

    arrays = {}
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        for name in f.keys():
            if name != "target_latents":
                arrays[name] = f.get_tensor(name).astype(np.float32)
    for key in ("target_grid", "reference_grids"):
        if key in meta:
            arrays[key] = np.array([meta[key].encode()], dtype=np.object_)
    types = {"steps": np.int32, "update_interval": np.int32, "seed": np.uint64, "ratio": np.float32}
    for name, value in options.items():
        if value is not None:
            arrays[name] = np.array([value], dtype=types[name])
    return arrays


def grpc_request(grpcclient, arrays):
    types = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.uint64): "UINT64",
             np.dtype(np.int64): "INT64", np.dtype(np.object_): "BYTES"}
    inputs = []
    for name, array in arrays.items():
        t = grpcclient.InferInput(name, list(array.shape), types[array.dtype])
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


def engine_stats(server, model):
    """Triton's cumulative statistics of ``model``: successful requests, their time in the server (ns), and the
    time in the model's execute (compute_infer, ns)."""
    status, body = server._http("GET", f"/v2/models/{model}/stats")
    stats = json.loads(body)["model_stats"] if status == 200 else []
    out = {"count": 0, "ns": 0, "compute_ns": 0}
    for s in stats:
        inf = s["inference_stats"]
        out["count"] += int(inf["success"]["count"])
        out["ns"] += int(inf["success"]["ns"])
        out["compute_ns"] += int(inf["compute_infer"]["ns"])
    return out


def percentiles(values):
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "p50_s": float(np.percentile(a, 50)), "p99_s": float(np.percentile(a, 99)),
            "mean_s": float(a.mean()), "min_s": float(a.min()), "max_s": float(a.max())}


def step_sums(report):
    steps = report["schedule"]
    return {"steps": len(steps), "sum_step_s": sum(r["time_s"] for r in steps),
            "anchor_s": statistics.median([r["time_s"] for r in steps if r["kind"] == "anchor"] or [0.0]),
            "pruned_s": statistics.median([r["time_s"] for r in steps if r["kind"] == "pruned"] or [0.0])}


def in_process(engine_dir, inputs, args):
    from topi_export.runtime.session import open_session
    from topi_export.serving.triton_engine import run_request

    session = open_session(engine_dir=engine_dir)
    run_request(session, request_arrays(inputs, steps=args.steps, seed=0, ratio=args.ratio))  # warm-up
    n = max(args.requests)
    latencies, reports = [], []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        _, schedule = run_request(session, request_arrays(inputs, steps=args.steps, seed=1000 + i, ratio=args.ratio))
        latencies.append(time.perf_counter() - t0)
        reports.append(json.loads(schedule))
    wall = time.perf_counter() - start
    return session, {"requests": n, "rps": n / wall, **percentiles(latencies),
                     "loop_s": statistics.median(r["time_s"] for r in reports),
                     **{k: statistics.median(step_sums(r)[k] for r in reports)
                        for k in ("sum_step_s", "anchor_s", "pruned_s")}}


def graph_feeds(engine_dir, keep=None, seed=0):
    """Inputs of the topi graph for the first layout: an anchor step (every context token kept and scored) or,
    with ``keep``, a pruned step (a sorted subset of the context, one query)."""
    manifest = json.loads((Path(engine_dir) / "manifest.json").read_text())
    layout = manifest["layouts"][0]
    n_x = layout["target_grid"][0] * layout["target_grid"][1]
    n_ctx = sum(h * w for h, w in layout["reference_grids"])
    rng = np.random.default_rng(seed)
    keep_idx = np.arange(n_ctx) if keep is None else np.sort(rng.choice(n_ctx, keep, replace=False))
    sizes = {"B": manifest["batch"], "Nx": n_x, "Nc": n_ctx, "T": layout["text_tokens"], "K": len(keep_idx),
             "Q": n_x if keep is None else 1}
    feeds = {}
    for t in manifest["graphs"]["topi"]["inputs"]:
        shape = [d if isinstance(d, int) else sum(sizes[p] for p in d.split("+")) for d in t["dims"]]
        if t["name"] == "keep_idx":
            feeds[t["name"]] = keep_idx.astype(np.int64)
        elif t["name"] == "score_idx":
            feeds[t["name"]] = np.arange(shape[0], dtype=np.int64)
        elif t["name"].endswith("_mask"):
            feeds[t["name"]] = np.ones(shape, np.float32)
        else:
            feeds[t["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def direct_calls(session, engine_dir, server, name, repeats=5):
    """One anchor and one pruned call of the topi graph: in-process (ONNX Runtime) vs a gRPC client's direct
    request to the engine model; medians of ``repeats``."""
    import tritonclient.grpc as grpcclient

    m = session.manifest
    n_ctx = m.layouts[0].num_ctx
    keep = max(1, n_ctx // 2)
    ort = session.engine.session("topi")
    names = [t.name for t in m.graphs["topi"].outputs]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    out = {}
    try:
        for step, k in (("anchor", None), ("pruned", keep)):
            feeds = graph_feeds(engine_dir, keep=k, seed=5)
            inputs = grpc_request(grpcclient, feeds)
            local, remote = [], []
            for _ in range(repeats + 1):  # the first of each is a warm-up
                t0 = time.perf_counter()
                ort.run(names, feeds)
                local.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                client.infer(f"{name}_topi", inputs, client_timeout=600)
                remote.append(time.perf_counter() - t0)
            out[step] = {"in_process_s": statistics.median(local[1:]), "grpc_direct_s": statistics.median(remote[1:])}
    finally:
        client.close()
    return out


def served(engine_dir, inputs, args, instances, session):
    import tritonclient.grpc as grpcclient

    from topi_export.serving.server import TritonServer
    from topi_export.serving.triton_repo import generate_repository

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    name = "bench"
    generate_repository(engine_dir, work / "repo", name=name, instances=instances, kind="cpu",
                        engine_models="python", ort_threads=args.ort_threads)
    t0 = time.perf_counter()
    server = TritonServer(work / "repo", env=args.env, ready_timeout=900, exit_timeout=120).start()
    result = {"instances": instances, "ort_threads": args.ort_threads, "ready_s": time.perf_counter() - t0,
              "rounds": []}
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.infer(f"{name}_loop", grpc_request(grpcclient, request_arrays(inputs, steps=args.steps, seed=0,
                                                                             ratio=args.ratio)), client_timeout=3600)
        client.close()
        engine_before = engine_stats(server, f"{name}_topi")
        seed = 2000
        for clients, total in zip(args.clients, args.requests_per_round):
            latencies, errors, reports = [], [], []
            shares = [total // clients + (1 if c < total % clients else 0) for c in range(clients)]
            barrier = threading.Barrier(clients + 1)

            def run_client(count, first_seed):
                conn = grpcclient.InferenceServerClient(server.grpc_url)
                try:
                    barrier.wait()
                    for i in range(count):
                        req = grpc_request(grpcclient, request_arrays(inputs, steps=args.steps, seed=first_seed + i,
                                                                      ratio=args.ratio))
                        t = time.perf_counter()
                        res = conn.infer(f"{name}_loop", req, client_timeout=3600)
                        latencies.append(time.perf_counter() - t)
                        reports.append(json.loads(res.as_numpy("schedule")[0]))
                except Exception as exc:  # noqa: BLE001 - reported in the result
                    errors.append(f"{type(exc).__name__}: {exc}")
                finally:
                    conn.close()

            threads = []
            for c, count in enumerate(shares):
                threads.append(threading.Thread(target=run_client, args=(count, seed), daemon=True))
                seed += count
            for t in threads:
                t.start()
            barrier.wait()
            start = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            row = {"clients": clients, "requests": len(latencies), "errors": errors, "wall_s": wall,
                   "rps": len(latencies) / wall, **percentiles(latencies or [float("nan")]),
                   "server_loop_s": statistics.median(r["time_s"] for r in reports) if reports else None}
            if clients == 1 and reports:
                row.update({k: statistics.median(step_sums(r)[k] for r in reports)
                            for k in ("sum_step_s", "anchor_s", "pruned_s")})
                after = engine_stats(server, f"{name}_topi")
                calls = after["count"] - engine_before["count"]
                # the engine model's own time per request of the loop (Triton's statistics: from the request's
                # arrival at the engine model to its response), against the loop's step times (BLS calls + the
                # host work of each step)
                row["engine_calls_per_request"] = calls / len(reports)
                row["engine_s_per_request"] = (after["ns"] - engine_before["ns"]) / 1e9 / len(reports)
                row["engine_compute_s_per_request"] = (after["compute_ns"] - engine_before["compute_ns"]) / 1e9 / len(
                    reports)
            result["rounds"].append(row)
            print(f"  instances {instances}, C={clients}: {row['requests']} requests, {row['rps']:.3f} req/s, "
                  f"p50 {row['p50_s']:.3f} s, p99 {row['p99_s']:.3f} s{' ERRORS ' + str(errors) if errors else ''}",
                  flush=True)
        result["direct"] = direct_calls(session, engine_dir, server, name)
    finally:
        result["stop_code"] = server.stop()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine-dir", required=True)
    parser.add_argument("--env", required=True, help="server environment (topi-export serve --create-env)")
    parser.add_argument("--inputs", default=None)
    parser.add_argument("--clients", default="1,2,4")
    parser.add_argument("--requests", default=None,
                        help="requests per round, one per --clients value (default: 4 per client count, at least 4)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--ratio", type=float, default=None)
    parser.add_argument("--instances", default="1")
    parser.add_argument("--ort-threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    def counts(text, flag):
        try:
            values = [int(v) for v in str(text).split(",")]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            parser.error(f"{flag} {text!r}: give positive integers separated by commas, e.g. 1,2,4")
        return values

    args.clients = counts(args.clients, "--clients")
    counts(args.instances, "--instances")
    args.requests_per_round = (counts(args.requests, "--requests") if args.requests
                               else [max(4, 2 * c) for c in args.clients])
    if len(args.requests_per_round) != len(args.clients):
        parser.error(f"--requests {args.requests!r}: give one count per --clients value ({len(args.clients)})")
    args.requests = args.requests_per_round
    inputs = args.inputs or write_inputs(args.engine_dir, Path(tempfile.mkdtemp(prefix="serve-bench-")) / "in.st")
    load_before = os.getloadavg()
    t0 = time.time()
    print(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; in-process ...", flush=True)
    session, local = in_process(args.engine_dir, inputs, args)
    print(f"  in-process: {local['requests']} requests, {local['rps']:.3f} req/s, p50 {local['p50_s']:.3f} s, "
          f"p99 {local['p99_s']:.3f} s", flush=True)
    results = [served(args.engine_dir, inputs, args, int(i), session) for i in args.instances.split(",")]
    load_after = os.getloadavg()
    record = {"engine_dir": str(args.engine_dir), "steps": args.steps, "ratio": args.ratio, "cpus": os.cpu_count(),
              "load_before": load_before, "load_after": load_after, "minutes": (time.time() - t0) / 60,
              "in_process": local, "served": results}
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print("| setting | C | requests | req/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|")
    print(f"| in-process run_request | 1 | {local['requests']} | {local['rps']:.3f} | {local['p50_s']:.3f} | "
          f"{local['p99_s']:.3f} |")
    for res in results:
        for row in res["rounds"]:
            print(f"| Triton, {res['instances']} instance(s) | {row['clients']} | {row['requests']} | "
                  f"{row['rps']:.3f} | {row['p50_s']:.3f} | {row['p99_s']:.3f} |")
    first = results[0]["rounds"][0]
    print(f"BLS (C=1): request {first['p50_s']:.4f} s at the client, loop {first['server_loop_s']:.4f} s in the "
          f"server, steps {first.get('sum_step_s', float('nan')):.4f} s (anchor {first.get('anchor_s', 0):.4f}, "
          f"pruned {first.get('pruned_s', 0):.4f}); in-process request {local['p50_s']:.4f} s, loop "
          f"{local['loop_s']:.4f} s, steps {local['sum_step_s']:.4f} s (anchor {local['anchor_s']:.4f}, pruned "
          f"{local['pruned_s']:.4f})")
    if "engine_s_per_request" in first:
        calls = first["engine_calls_per_request"]
        print(f"engine model per loop request (Triton statistics): {calls:.0f} calls, {first['engine_s_per_request']:.4f} s "
              f"in the engine model ({first['engine_compute_s_per_request']:.4f} s in its execute); loop steps - "
              f"engine time = {(first['sum_step_s'] - first['engine_s_per_request']) / max(calls, 1) * 1000:.2f} ms "
              f"per step")
    for step, d in results[0]["direct"].items():
        print(f"direct {step} call: in-process {d['in_process_s']:.4f} s, gRPC to the engine model "
              f"{d['grpc_direct_s']:.4f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    from topi_export.errors import TopiError

    try:
        main()
    except TopiError as exc:  # a bad engine directory, environment or server: one line, as the CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
