#!/usr/bin/env python3
"""Train ``kontext-texture``: a small, deterministic, really-trained FLUX.1 Kontext-layout model with CURVED
sampling trajectories.

Why: the shipped models learn edits whose answer is a deterministic function of the reference, so their flows are
nearly straight and reusing a velocity across steps looks free (flux2-pick: ~63 dB against the normal run with 12
of 28 steps reused). Real editing models are not that straight: the coarse structure follows the reference, the
fine detail is one draw from a continuous distribution, and the x0-prediction moves during sampling (early: the
conditional mean; later: committed detail). Three of this model's four edits add such random detail (grain,
band-pass texture, colour grain, with random amplitude, frequency, orientation and phase); one is deterministic
(smooth), the control. ``topi_export.models.kontext_texture`` defines them. ``scripts/measure_curvature.py`` measures the
curvature.

Data: scikit-image's bundled photos, random 32x32 px crops packed like ``kontext-digits`` (RGB + luma, 2x2 px per
token: a 16x16 token grid), ``train_kontext.make_pair``; ``astronaut``, ``coffee`` and ``chelsea`` are held out.
Layout exactly as FluxKontextPipeline (``train_kontext.velocity``).

Training: ``train_kontext.train_loop`` (rectified flow, AdamW, warmup then constant LR, EMA), t shifted by
calculate_shift(Nx). Evaluation: held-out requests sampled as FluxKontextPipeline does (``train_kontext.generate``,
28 steps). A random edit has no single right answer, so besides the PSNR against the truth the evaluation reports
the PSNR of the conditional mean (the best possible in MSE; a faithful sample of the right distribution scores
about 3 dB below it when the detail dominates the error), the PSNR of the coarse structure (both blurred), and the
detail's strength (std of output minus conditional mean) of the model and of the truth.

    python scripts/train_texture.py --threads 1     # the shipped recipe: writes topi_export/assets/kontext-texture
    python scripts/train_texture.py --eval-only                  # re-evaluate, rewrite samples, preview and card
    python scripts/train_texture.py --threads 1 --edits smooth,token_grain,blob_grain --steps 2000 \
        --out topi_export/assets/kontext-mottle                  # kontext-mottle: mid-schedule colour mottling

``--edits`` picks the edits (default: kontext-texture's four); ``--out``'s folder name is the asset name in the card.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import shlex
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from topi_export.models import kontext_texture as kt
from topi_export.models.kontext_digits import latents_to_image, mse_rgb, rgb_to_latents
from topi_export.models.sampling import calculate_shift
from topi_export.plan import Layout

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "topi_export" / "assets" / "kontext-texture"
EVAL_SEED = 777  # held-out requests and their noise do not depend on --seed
CALIB_SEED = 778  # the calibration requests (training photos)
GUIDANCE = 2.5  # FluxKontextPipeline's default guidance_scale; training draws U[1, 4] like kontext-digits
DEFAULT_EDITS = ("smooth", "grain", "texture", "color_grain")  # kontext-texture's


def _script(name: str):
    """A sibling script as a module (its functions are reused, not copied)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tk = _script("train_kontext")
TRAIN_IMAGES = ("camera", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "coins",
                "moon", "grass", "gravel", "brick", "cell", "logo", "page", "text", "clock")  # flux2-pick's
HELDOUT_IMAGES = ("astronaut", "coffee", "chelsea")


# ------------------------------------------------------------------------------------------------ data
class Conditioning:
    """The fixed embeddings of the chosen edits, indexed by position in ``edits``."""

    def __init__(self, edits=DEFAULT_EDITS):
        pairs = [kt.texture_conditioning(e) for e in edits]
        self.prompt = torch.cat([p for p, _ in pairs])  # [E, T, D]
        self.pooled = torch.cat([q for _, q in pairs])  # [E, P]

    def __call__(self, edit: torch.Tensor):
        return self.prompt[edit], self.pooled[edit]


def make_batch(rng, gen, levels, edit: list[int], crop: int, edits=DEFAULT_EDITS):
    """(x0 [B, N, 16], reference [B, N, 16]): reference crops (numpy ``rng``), each target = its edit (an index into
    ``edits``) with the random detail drawn from ``gen`` (sample by sample, in order)."""
    refs = [tk.make_pair(rng, levels, "identity", crop)[1] for _ in edit]
    rgb = torch.from_numpy(np.stack(refs)).permute(0, 3, 1, 2).contiguous()
    return rgb_to_latents(kt.edit_rgb(rgb, [edits[e] for e in edit], gen)), rgb_to_latents(rgb)


def request_set(levels, n: int, crop: int, seed: int, edits=DEFAULT_EDITS):
    """Fixed requests (independent of --seed): request i has edit edits[i % E]; a prefix of a larger set is the
    smaller set. Returns (edit index, x0, reference, noise)."""
    edit = torch.arange(n) % len(edits)
    detail = torch.Generator().manual_seed(seed + 1)
    x0, ref = make_batch(np.random.default_rng(seed), detail, levels, edit.tolist(), crop, edits)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return edit, x0, ref, noise


# ------------------------------------------------------------------------------------------------ main
def parse_edits(text: str) -> tuple[str, ...]:
    """--edits: a comma list of known, distinct edit names."""
    import argparse

    edits = tuple(e.strip() for e in text.split(",") if e.strip())
    unknown = [e for e in edits if e not in kt.EDITS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown edit(s) {', '.join(unknown)}; known: {', '.join(kt.EDITS)}")
    if not edits or len(set(edits)) != len(edits):
        raise argparse.ArgumentTypeError(f"give one or more distinct edits (known: {', '.join(kt.EDITS)})")
    return edits


def parse_args(argv=None):
    p = tk.asset_parser(__doc__, DEFAULT_OUT, crop_help="crop size in px (token grid = crop/2)",
                        low_res_help="crop size in px of the low-res steps")
    p.add_argument("--edits", type=parse_edits, default=DEFAULT_EDITS,
                   help=f"comma list of the edits to train (default {','.join(DEFAULT_EDITS)}; known: "
                        f"{','.join(kt.EDITS)})")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers import FluxTransformer2DModel

    out = args.out
    log, cmd = tk.start_run(args, "train_texture.py", argv,
                            out / ("eval_log.txt" if args.eval_only else "train_log.txt"))
    if args.eval_only:
        args, result = tk.training_run(args, out, parse_args)
        model = FluxTransformer2DModel.from_pretrained(out)
        return evaluate_and_save(model, args, log, cmd, result)

    edits = args.edits
    layouts = {c: Layout(kt.TEXT_TOKENS, (c // 2, c // 2), ((c // 2, c // 2),)) for c in (args.crop, args.low_res_crop)}
    layout = layouts[args.crop]
    mu = calculate_shift(layout.num_target)
    t0 = time.time()
    size = max(args.crop, args.low_res_crop)
    train_levels = [tk.pyramid(tk.load_image(n), size) for n in TRAIN_IMAGES]
    log(f"# data: {len(TRAIN_IMAGES)} train images ({sum(map(len, train_levels))} pyramid levels), held out "
        f"{', '.join(HELDOUT_IMAGES)}; crops {args.crop}px -> {layout.target_grid[0]}x{layout.target_grid[1]} tokens"
        f" (a fraction {args.low_res_frac} of the steps at {args.low_res_crop}px); edits {', '.join(edits)} "
        f"({time.time() - t0:.1f}s)")
    cond = Conditioning(edits)
    held_levels = [tk.pyramid(tk.load_image(n), args.crop) for n in HELDOUT_IMAGES]
    n_eval = max(args.eval_count, args.num_samples)
    ev_edit, ev_x0, ev_ref, ev_noise = request_set(held_levels, n_eval, args.crop, EVAL_SEED, edits)
    ev_prompt, ev_pooled = cond(ev_edit)
    ev_g = torch.full((n_eval,), GUIDANCE)
    ev_t = (torch.arange(n_eval) % 8 + 0.5) / 8  # val-loss timesteps: a fixed grid over (0, 1)

    model = FluxTransformer2DModel(**kt.model_config())
    ema = copy.deepcopy(model).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"# model: FluxTransformer2DModel {json.dumps(kt.model_config())}, {n_params} params "
        f"({n_params * 4 / 1e6:.2f} MB fp32); training t shift mu = calculate_shift({layout.num_target}) = {mu:.3f}")
    opt = tk.make_optimizer(model, args.lr)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def val_loss(m):
        m.eval()
        xt = (1 - ev_t[:, None, None]) * ev_x0 + ev_t[:, None, None] * ev_noise
        v = tk.velocity(m, xt, ev_ref, ev_t, ev_g, ev_prompt, ev_pooled, layout)
        m.train()
        return F.mse_loss(v, ev_noise - ev_x0).item()

    def draw(step):
        edit = torch.randint(len(edits), (args.batch,), generator=gen)
        # Low-res steps spread evenly (as train_multiref): floor(step * frac) advances on a fraction of the steps.
        low = math.floor((step + 1) * args.low_res_frac) > math.floor(step * args.low_res_frac)
        c = args.low_res_crop if low else args.crop
        x0, ref = make_batch(rng, gen, train_levels, edit.tolist(), c, edits)
        noise = torch.randn(x0.shape, generator=gen)
        t = tk.sample_t(gen, args.batch, mu)
        guidance = 1 + 3 * torch.rand(args.batch, generator=gen)
        return x0, noise, t, (ref, guidance, *cond(edit), layouts[c])

    result = tk.train_loop(model, ema, opt, args, log, draw, tk.predict_kontext, val_loss)
    ema.save_pretrained(out, safe_serialization=True)
    return evaluate_and_save(ema, args, log, cmd, result)


def _detail_std(x, mean):
    """Per-sample std of the RGB entries of x - mean (latent units: images in [-1, 1])."""
    return (x - mean)[..., :12].flatten(1).pow(2).mean(1).sqrt()


def evaluate_and_save(model, args, log, cmd, result) -> dict:
    """The Kontext sampling loop on held-out requests; then the samples, calibration samples, preview and card."""
    out = args.out
    edits = args.edits
    grid = (args.crop // 2, args.crop // 2)
    layout = Layout(kt.TEXT_TOKENS, grid, (grid,))
    cond = Conditioning(edits)
    held_levels = [tk.pyramid(tk.load_image(n), args.crop) for n in HELDOUT_IMAGES]
    n_eval = max(args.eval_count, args.num_samples)
    ev_edit, ev_x0, ev_ref, ev_noise = request_set(held_levels, n_eval, args.crop, EVAL_SEED, edits)
    ev_prompt, ev_pooled = cond(ev_edit)
    ev_g = torch.full((n_eval,), GUIDANCE)
    model.eval()
    t1 = time.time()
    gen_x = torch.cat([tk.generate(model, ev_ref[i:i + 16], ev_prompt[i:i + 16], ev_pooled[i:i + 16],
                                   ev_noise[i:i + 16], ev_g[i:i + 16], layout, args.eval_steps)
                       for i in range(0, n_eval, 16)])
    eval_s = time.time() - t1
    mean_x = kt.mean_latents(ev_ref, [edits[int(e)] for e in ev_edit], grid)
    n = args.eval_count
    lp = lambda x: kt.lowpass_latents(x[:n], grid)  # noqa: E731
    mses = {"model": mse_rgb(gen_x, ev_x0)[:n], "cond_mean": mse_rgb(mean_x, ev_x0)[:n],
            "copy_reference": mse_rgb(ev_ref, ev_x0)[:n], "model_coarse": mse_rgb(lp(gen_x), lp(ev_x0)),
            "model_vs_mean": mse_rgb(gen_x, mean_x)[:n]}
    stds = {"detail_truth": _detail_std(ev_x0, mean_x)[:n], "detail_model": _detail_std(gen_x, mean_x)[:n]}
    groups = {e: ev_edit[:n] == k for k, e in enumerate(edits)}
    groups["random edits"] = sum((ev_edit[:n] == edits.index(e) for e in kt.RANDOM_EDITS if e in edits),
                                 torch.zeros(n, dtype=torch.bool)).bool()
    groups["all"] = torch.ones(n, dtype=torch.bool)
    per_group = {g: {"n": int(m.sum()), **{k: tk._psnr(v[m]) for k, v in mses.items()},
                     **{k: round(float(v[m].mean()), 4) for k, v in stds.items()}}
                 for g, m in groups.items() if m.any()}
    result = {**result, "eval_requests": n, "eval_steps": args.eval_steps, "eval_seconds": round(eval_s, 1),
              "per_group": per_group}
    log("# held-out evaluation (PSNR in dB of RGB in [0,1], mean of per-request PSNR, exact matches capped at 60 dB):")
    log("#   model = generation vs truth; cond-mean / copy-ref = the conditional mean (no detail) / the reference vs")
    log("#   truth; coarse = both blurred (sigma 2 px); vs-mean = generation vs conditional mean; detail = std of")
    log("#   (x - conditional mean) over RGB (latent units), truth and model")
    log(f"#   {'group':<13} {'n':>3} {'model':>7} {'cond-mean':>10} {'copy-ref':>9} {'coarse':>7} {'vs-mean':>8} "
        f"{'detail-truth':>13} {'detail-model':>13}")
    for g, r in per_group.items():
        log(f"#   {g:<13} {r['n']:>3} {r['model']:>7.2f} {r['cond_mean']:>10.2f} {r['copy_reference']:>9.2f} "
            f"{r['model_coarse']:>7.2f} {r['model_vs_mean']:>8.2f} {r['detail_truth']:>13.4f} {r['detail_model']:>13.4f}")
    log(f"# evaluation: {args.eval_steps} steps x {n_eval} requests in {eval_s:.0f}s")

    write_samples(out / "samples", layout, ev_edit, ev_x0, ev_ref, ev_noise, cond, args.num_samples, HELDOUT_IMAGES,
                  edits)
    train_levels = [tk.pyramid(tk.load_image(name), args.crop) for name in TRAIN_IMAGES]
    cal = request_set(train_levels, args.num_calibration, args.crop, CALIB_SEED, edits)
    write_samples(out / "calibration_samples", layout, *cal, cond, args.num_calibration, TRAIN_IMAGES, edits)
    preview = _write_preview(out / "preview.png", ev_ref, ev_x0, mean_x, gen_x, grid, min(args.num_samples, 8))
    result["weights_bytes"] = (out / "diffusion_pytorch_model.safetensors").stat().st_size
    n_params = sum(p.numel() for p in model.parameters())
    log(f"# saved {out.name}/ ({result['weights_bytes'] / 1e6:.2f} MB weights), {args.num_samples} held-out samples, "
        f"{args.num_calibration} calibration samples")
    (out / "MODEL_CARD.md").write_text(_model_card(args, cmd, result, n_params, layout, preview))
    log(f"RESULT {json.dumps(result)}")
    return result


def write_samples(folder: Path, layout, edit, x0, ref, noise, cond, count: int, images, edits=DEFAULT_EDITS) -> None:
    """Inputs files (artifacts/inputs.py format) of the first ``count`` requests; stale ones are removed."""
    from topi_export.request import Inputs
    from topi_export.artifacts.inputs import save_inputs

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("sample_*.safetensors"):
        old.unlink()
    for i in range(count):
        prompt, pooled = cond(edit[i:i + 1])
        data = Inputs(layout, ref[i:i + 1].contiguous(), {"prompt_embeds": prompt, "pooled_prompt_embeds": pooled},
                      noise=noise[i:i + 1].contiguous(), target_latents=x0[i:i + 1].contiguous(), scalars={"guidance": GUIDANCE},
                      meta={"edit": edits[int(edit[i])], "photos": ",".join(images)})
        save_inputs(folder / f"sample_{i}.safetensors", data)


def _write_preview(path: Path, ref, x0, mean_x, gen_x, grid, n: int):
    """A PNG: rows = samples; columns = reference | conditional mean | one truth | generation."""
    return tk.write_preview_png(path, [[latents_to_image(a[i:i + 1], grid) for a in (ref, mean_x, x0, gen_x)]
                                       for i in range(n)])


# How the recipe was chosen: the exploratory run's numbers, from its log and scripts/measure_curvature.py (see the card).
EXPLORATION = """\
One exploratory run of a first design (edits identity, smooth, grain with std U[0.05, 0.25], texture with std
U[0.10, 0.35]; `--steps 600 --low-res-frac 0`, 40 held-out requests, then `scripts/measure_curvature.py` on its 8
samples and on kontext-digits' 8). It learnt the task: on the random edits 18.04 dB against the truth vs 21.47 dB for
the conditional mean (a sample scores ~3 dB below the mean), coarse structure 31.4 dB, detail strength 0.191 vs 0.190
in the truth. But it was no more curved than kontext-digits:

| model (8 samples) | reuse 3, 5, ..., 25: mean / min | reuse 4, 6, ..., 26: mean / min | velocity change |
|---|---|---|---|
| first design, 600 steps | 55.17 / 50.48 dB | 47.05 / 45.24 dB | 0.0440 |
| (its grain / texture samples) | 53.60 / 50.60 dB | 48.16 / 46.73 dB | 0.0459 / 0.0471 |
| kontext-digits | 53.82 / 49.96 dB | 50.92 / 46.58 dB | 0.0408 |

A Gaussian detail component of std a is decided around t / (1 - t) ~ a, so weak detail is decided in the last few
steps, where every model's velocity changes fast anyway, and the deterministic edits
(half of the samples) were as straight as kontext-digits. The shipped design therefore has larger amplitudes (grain
U[0.15, 0.35], texture U[0.20, 0.45], a colour grain U[0.10, 0.30] on the unblurred reference) and one deterministic
edit (smooth, the control) instead of two. Half of the steps use 16 px crops (8x8 tokens; the edits are local and
RoPE relative, as for flux2-pick's low-res steps), 2400 steps in all: about 1380 CPU s (0.95 s per full step, 0.20 s
per low-res step, batch 8, one thread, `time.process_time`)."""


def _curvature_section() -> str:
    """The curvature numbers of docs/results/curvature.json (scripts/measure_curvature.py), when measured."""
    path = REPO / "docs" / "results" / "curvature.json"
    try:
        data = json.loads(path.read_text())
        models, patterns = data["models"], list(data["patterns"])
    except (OSError, ValueError, KeyError):
        return "Not measured yet: run `python scripts/measure_curvature.py`."
    head = " | ".join(f"{k}: mean / min (dB)" for k in patterns)
    lines = [f"| model / edit | samples | {head} |", "|---" * (2 + len(patterns)) + "|"]

    def row(label, r):
        cells = " | ".join(f"{r[k]['reuse_psnr_mean']:.2f} / {r[k]['reuse_psnr_min']:.2f}" for k in patterns)
        return f"| {label} | {r['samples']} | {cells} |"

    for name, r in models.items():
        lines.append(row(f"`{name}`", r))
        if name == "kontext-texture":
            lines += [row(f"&nbsp;&nbsp;{e}", v) for e, v in r.get("per_edit", {}).items()]
    commands = sorted({r["command"] for r in models.values() if "command" in r})
    computed = ", ".join("the model's auto plan" if v["computed_steps"] is None else
                         f"{v['computed_steps']} of {data['steps']}" for v in data["patterns"].values())
    return (f"From `docs/results/curvature.json` ({'; '.join(f'`{c}`' for c in commands)}): each model's shipped "
            f"held-out samples through the runtime (`open_session`, every computed step unpruned), the normal "
            f"{data['steps']}-step run against runs that reuse the last computed velocity (the runtime's `reuse` step, "
            f"no model call) at the listed steps ({computed} steps computed); PSNR of the final latents as `run "
            f"--compare` computes it.\n\n" + "\n".join(lines))


def _edit_bullets(edits) -> str:
    """The card's list of the trained edits (for the default edits: kontext-texture's card text)."""
    (lo_g, hi_g), (lo_t, hi_t), (lo_c, hi_c) = (kt.AMPLITUDE[e] for e in ("grain", "texture", "color_grain"))
    (lo_k, hi_k), (lo_b, hi_b) = (kt.AMPLITUDE[e] for e in ("token_grain", "blob_grain"))
    lo_f, hi_f = kt.TEXTURE_FREQUENCY
    text = {
        "smooth": f"Gaussian blur, sigma {kt.SMOOTH_SIGMA} px (deterministic: the control)",
        "grain": f"each token's 2x2 px replaced by their mean, plus monochrome white grain, std a ~ U[{lo_g}, {hi_g}]\n"
                 f"    per sample (random)",
        "texture": f"`smooth` plus a monochrome band-pass Gaussian random texture: centre frequency U[{lo_f}, {hi_f}]\n"
                   f"    cycles/px, random orientation and anisotropy, std a ~ U[{lo_t}, {hi_t}] per sample (random)",
        "color_grain": f"the reference plus white grain drawn independently per colour channel, std a ~ "
                       f"U[{lo_c}, {hi_c}]\n"
                       f"    per sample (random)",
        "token_grain": f"the reference plus colour noise constant over each token's 2x2 px, drawn independently per\n"
                       f"    colour channel, std a ~ U[{lo_k}, {hi_k}] per sample (random)",
        "blob_grain": f"the reference plus colour noise constant over 4x4 px blocks (2x2 tokens), drawn independently\n"
                      f"    per colour channel, std a ~ U[{lo_b}, {hi_b}] per sample (random)",
    }
    return ";\n".join(f"  - `{e}`: {text[e]}" for e in edits) + "."


def _intro(edits) -> str:
    if tuple(edits) == DEFAULT_EDITS:
        return """A small, really-trained in-context model in the exact FLUX.1 Kontext layout (diffusers `FluxTransformer2DModel`,
`FluxKontextPipeline` token layout and ids) whose sampling trajectories are CURVED: two of its edits keep the
reference's coarse structure and add fine detail that is random given the condition, drawn from a continuous
distribution. The shipped models' edits are deterministic, their flows nearly straight, so reusing velocities
across steps looks free on them; on this one it does not. Not a general image model."""
    random = [f"`{e}`" for e in edits if e in kt.RANDOM_EDITS]
    return textwrap.fill(
        "A small, really-trained in-context model in the exact FLUX.1 Kontext layout (diffusers "
        "`FluxTransformer2DModel`, `FluxKontextPipeline` token layout and ids) whose sampling trajectories are CURVED: "
        f"{len(random)} of its {len(edits)} edits ({', '.join(random)}) keep the reference's coarse structure and add "
        "detail that is random given the condition, drawn from a continuous distribution. Trained by "
        f"`scripts/train_texture.py --edits {','.join(edits)}`: kontext-texture's recipe with other edits of "
        "`topi_export.models.kontext_texture`. Not a general image model.", 116, break_on_hyphens=False)


def _recipe(edits, steps: int) -> str:
    """How the recipe was chosen (kontext-texture: the exploratory run; other edit sets: why these edits)."""
    if tuple(edits) == DEFAULT_EDITS:
        return EXPLORATION
    text = (f"No exploratory run: kontext-texture's recipe (model, optimizer, crops, seed, evaluation) with "
            f"`--edits {','.join(edits)}` and {steps} steps.")
    block = [e for e in edits if e in kt.BLOCK]
    if block:
        parts = []
        for e in block:
            n = kt.BLOCK[e] ** 2
            lo, hi = (a * math.sqrt(n) for a in kt.AMPLITUDE[e])
            parts.append(f"`{e}` (n = {n}, a in [{kt.AMPLITUDE[e][0]}, {kt.AMPLITUDE[e][1]}]: t ~ "
                         f"{lo / (1 + lo):.2f} - {hi / (1 + hi):.2f})")
        text += (" A Gaussian component aggregated over n px with per-pixel std a is decided around t / (1 - t) ~ "
                 f"a sqrt(n): {', '.join(parts)} are decided in the MIDDLE of the 28-step schedule, whereas "
                 "kontext-texture's grain and texture are decided late (t ~ 0.2 - 0.3), inside the steps step reuse "
                 "never touches. No clamp and no discrete modes: the detail is Gaussian given its amplitude.")
    return textwrap.fill(text, 116, break_on_hyphens=False)


def _curvature(edits) -> str:
    if tuple(edits) == DEFAULT_EDITS:
        return _curvature_section()
    return ("A held-out test model for the step-reuse criterion: it was kept out of every choice of the criterion,\n"
            "and its step-reuse numbers, measured after the criterion was fixed, are in docs/benchmarks.md section 8\n"
            "(`docs/results/curvature.json`, `docs/results/reuse_fidelity_<model>.json`), not in this card.")


def _model_card(args, cmd, r, n_params, layout, preview) -> str:
    cfg = kt.model_config()
    g = layout.target_grid
    nt = layout.num_target

    def row(name, v):
        return (f"| {name} | {v['n']} | {v['model']:.2f} | {v['cond_mean']:.2f} | {v['copy_reference']:.2f} | "
                f"{v['model_coarse']:.2f} | {v['model_vs_mean']:.2f} | {v['detail_truth']:.3f} | "
                f"{v['detail_model']:.3f} |")

    rows = "\n".join(row(k, v) for k, v in r["per_group"].items())
    repro = (f"python scripts/train_texture.py --steps {r['steps']} --seed {args.seed} --batch {args.batch} "
             f"--crop {args.crop} --low-res-crop {args.low_res_crop} --low-res-frac {args.low_res_frac} "
             f"--lr {args.lr} --warmup {args.warmup} --ema {args.ema} --threads {args.threads}"
             + ("" if tuple(args.edits) == DEFAULT_EDITS else f" --edits {','.join(args.edits)}")
             + ("" if Path(args.out).resolve() == DEFAULT_OUT.resolve() else f" --out {shlex.quote(str(args.out))}"))
    edits = tuple(args.edits)
    low_res = (f" A fraction {args.low_res_frac} of the steps (spread evenly) uses {args.low_res_crop} px crops."
               if args.low_res_frac > 0 else "")
    if args.eval_only:
        produced = (f"Training (`train_log.txt`; the weights):\n\n    {repro}\n\nEvaluation, samples, preview and this "
                    f"card (`eval_log.txt`; no training):\n\n    {cmd}\n")
    else:
        produced = f"Command that produced this folder:\n\n    {cmd}\n\nWith every argument spelled out:\n\n    {repro}\n"
    return f"""# {Path(args.out).resolve().name}

{_intro(edits)}

## Task and data

- "Latents" are image crops, not VAE latents, packed exactly like `kontext-digits`: RGB in [-1, 1] plus a luma
  channel, 2x2 px per token (token channel = c*4 + dy*2 + dx), 16 channels per token: {args.crop}x{args.crop} px crops,
  a {g[0]}x{g[1]} token grid for the reference and the target. `kontext_digits.latents_to_image` shows latents.
- Edits (`topi_export.models.kontext_texture`; the conditioning names one, fixed seeded random `prompt_embeds`
  [1, {kt.TEXT_TOKENS}, {kt.TEXT_DIM}] and `pooled_prompt_embeds` [1, {kt.POOLED_DIM}] per edit; `guidance` embedded,
  trained on U[1, 4], samples use {GUIDANCE}):
{_edit_bullets(edits)}
  The random detail is continuous (Gaussian given its parameters), so there are no discrete modes; its mean is
  zero, so the conditional mean of a target is its deterministic part (`kontext_texture.mean_latents`).
- Images: scikit-image's bundled photos at scales 1, 1/2, 1/4, ... (short side <= 400 px), random crops and
  horizontal flips (`train_kontext.pyramid` / `make_pair`). Train: {', '.join(TRAIN_IMAGES)}.
  Held out: {', '.join(HELDOUT_IMAGES)}.
- Layout exactly as `FluxKontextPipeline`: `hidden_states = cat([noisy target, reference])`, `img_ids =
  kontext_ids(layout)`, `txt_ids` zeros, `timestep` = sigma in [0, 1]; only `out[:, :{nt}]` is the velocity.

## Model

`FluxTransformer2DModel` config (`kontext_digits.model_config`, the same as kontext-digits): `{json.dumps(cfg)}`:
2 double-stream + 4 single-stream blocks (6 layers), 4 heads x 32 dims (width 128), {n_params} parameters,
{r['weights_bytes'] / 1e6:.2f} MB safetensors (fp32, EMA weights).

## Training

`train_kontext.train_loop`: rectified flow, x_t = (1 - t) x0 + t noise, target velocity = noise - x0, t =
sigmoid(N(0, 1)) shifted with mu = calculate_shift({nt}) = {calculate_shift(nt):.3f}. AdamW (lr {args.lr}, betas
0.9/0.99, weight decay 0.01 on matrices), {args.warmup}-step linear warmup then constant LR, grad-norm clip 1.0, batch
{args.batch}, EMA {args.ema}; edits uniform; a fresh random detail for every training target.{low_res} Seeded and
deterministic for a given step count and thread count.

- steps: {r['steps']}, training wall time: {r['train_seconds']} s ({r['train_seconds'] / 60:.1f} min)
- machine: {tk.cpu_name()}, torch {torch.__version__}, {args.threads} thread(s) (the 2 cores were shared with
  other jobs, so wall time is an upper bound)
- final training loss (mean of the last {args.log_every} steps): {r['final_loss']:.4f}
- held-out velocity MSE at 8 fixed t (raw / EMA weights): {r['val_loss']:.4f} / {r['ema_val_loss']:.4f}
- log: `train_log.txt`

How the recipe was chosen:

{_recipe(edits, r['steps'])}

## Held-out evaluation

{r['eval_requests']} held-out requests (crops of {', '.join(HELDOUT_IMAGES)}, edits cycling), generated as
`FluxKontextPipeline` does (`train_kontext.generate`: FlowMatchEulerDiscreteScheduler, shift=3.0, dynamic shifting,
sigmas = linspace(1, 1/N, N), mu = calculate_shift({nt}), transformer timestep = t/1000), N = {r['eval_steps']}
steps, guidance {GUIDANCE}, seeded noise. PSNR in dB of the RGB channels (images in [0, 1]), mean of per-request PSNR
(exact matches count as 60 dB). A random edit has no single right answer: **cond. mean** (the deterministic part,
the best possible output in MSE) bounds what any output can score against the truth, and a sample of the right
distribution scores about 3 dB below it where the detail dominates the error. Columns: **model** = generation vs
truth; **cond. mean** / **copy ref** = the conditional mean / the unedited reference vs truth; **coarse** = model vs
truth, both blurred (sigma {kt.EVAL_SIGMA} px); **vs mean** = generation vs the conditional mean; **detail truth** /
**detail model** = std of (x - conditional mean) over the RGB entries (latent units, [-1, 1] images), i.e. how
strong the random detail is (about 0 for an output that only predicts the mean).

| edits | requests | model | cond. mean | copy ref | coarse | vs mean | detail truth | detail model |
|---|---|---|---|---|---|---|---|---|
{rows}

{f'Preview (`{preview}`): rows = held-out samples; columns = reference | conditional mean | ground truth (one draw) | generation.' if preview else ''}

## Curvature

{_curvature(edits)}

## Samples

`samples/sample_{{i}}.safetensors` (the first {args.num_samples} held-out requests, edits cycling) and
`calibration_samples/sample_{{i}}.safetensors` ({args.num_calibration} requests from the TRAINING photos, for a
calibration that does not touch held-out data), written by `topi_export.artifacts.inputs.save_inputs`:
`reference_latents` [1, {nt}, 16], `prompt_embeds` [1, {kt.TEXT_TOKENS}, {kt.TEXT_DIM}], `pooled_prompt_embeds`
[1, {kt.POOLED_DIM}], `noise` [1, {nt}, 16], `target_latents` [1, {nt}, 16] (one draw of the edit), `guidance` [1];
string metadata `target_grid`, `reference_grids` = "{g[0]}x{g[1]}", `edit`, `photos`.

## Reproduce

{produced}"""


if __name__ == "__main__":
    main()
