#!/usr/bin/env python3
"""Train ``kontext-digits``: a small, deterministic, really-trained in-context FLUX.1 Kontext-layout model.

Why: ToPi prunes reference (context) tokens by their influence on the target tokens. On random weights
attention is near uniform, so pruning cannot be evaluated there. This model is trained on an in-context
edit task whose answer lives in the reference, so which context tokens it attends to matters.

Data: scikit-image's bundled sample photos, random 32x32 px crops (RGB in [-1, 1] plus a luma channel,
packed 2x2 per token like Flux: 16 channels, a 16x16 token grid). No VAE. ``astronaut`` and ``coffee``
are held out for evaluation. Task: target = edit(reference), the edit named by the conditioning (a fixed,
seeded random ``prompt_embeds`` / ``pooled_prompt_embeds`` per edit): identity, colour inversion, red/blue
swap, and a 2-token pan down / right (the target copies the reference with a spatial offset; the rows /
columns panned in are not in the reference). Layout exactly as FluxKontextPipeline: hidden_states =
[noisy target | reference], img_ids from ``kontext_ids`` (reference first id 1), txt_ids zeros,
timestep = sigma in [0, 1], only out[:, :Nx] is the velocity.

Training: rectified flow, x_t = (1 - t) x0 + t noise, target velocity noise - x0 (FlowMatchEulerDiscrete
steps prev = x + (sigma_next - sigma) v), t = logit-normal shifted by mu = calculate_shift(Nx) (the Kontext
schedule's shift), AdamW with warmup then constant LR, EMA weights saved. The LR schedule does not
depend on the total step count, so a run stopped by ``--minutes`` after K steps is bit-identical to a run
with ``--steps K`` (same seed, same thread count).

Evaluation: held-out pairs generated with diffusers' FlowMatchEulerDiscreteScheduler exactly as
FluxKontextPipeline does (sigmas = linspace(1, 1/N, N), mu = calculate_shift(Nx), shift=3.0 with
dynamic shifting, transformer timestep = t / 1000); PSNR against ground truth, and the PSNR of the
trivial baseline "output = the unedited reference".

    python scripts/train_kontext.py --minutes 15        # writes topi_export/assets/kontext-digits
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from topi_export.models.flux_kontext import SCHEDULER, kontext_ids
from topi_export.models.sampling import calculate_shift, flow_match_scheduler
from topi_export.plan import Layout
from topi_export.models.kontext_digits import (EDITS, SHIFT_TOKENS, TEXT_TOKENS, edit_conditioning,
                                               latents_to_image, model_config, mse_rgb, rgb_to_latents)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "topi_export" / "assets" / "kontext-digits"
TRAIN_IMAGES = ("camera", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
                "coins", "moon", "grass", "gravel", "brick", "cell", "logo", "page", "text", "clock")
HELDOUT_IMAGES = ("astronaut", "coffee")
EVAL_SEED = 777  # held-out pairs and their noise do not depend on --seed
__all__ = ["main", "latents_to_image"]


# ------------------------------------------------------------------------------------------------ data
def load_image(name: str) -> np.ndarray:
    """A bundled scikit-image sample as float32 HxWx3 in [0, 1]."""
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:  # RGBA (logo): composite on white
        a = img[..., 3:]
        img = img[..., :3] * a + (1 - a)
    return np.ascontiguousarray(img[..., :3])


def pyramid(img: np.ndarray, crop: int) -> list[np.ndarray]:
    """The image at scales 1, 1/2, 1/4, ... whose short side lies in [crop + 8, 400] px, in [-1, 1]."""
    from skimage.transform import resize

    levels, scale = [], 1.0
    while min(img.shape[:2]) * scale >= crop + 8:
        h, w = round(img.shape[0] * scale), round(img.shape[1] * scale)
        if min(h, w) <= 400:
            lv = img if scale == 1.0 else resize(img, (h, w), anti_aliasing=True, preserve_range=True)
            levels.append(np.ascontiguousarray(lv.astype(np.float32) * 2 - 1))
        scale /= 2
    return levels


def make_pair(rng: np.random.Generator, levels: list[list[np.ndarray]], edit: str, crop):
    """(target, reference) HxWx3 crops in [-1, 1] for ``edit`` from a random image, level and position.
    ``crop``: the crop size in px, or (height, width) px."""
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    img = levels[rng.integers(len(levels))]
    lv = img[rng.integers(len(img))]
    if rng.random() < 0.5:
        lv = lv[:, ::-1]
    m = 2 * SHIFT_TOKENS  # px margin for the pans
    y = int(rng.integers(m, lv.shape[0] - ch + 1))
    x = int(rng.integers(m, lv.shape[1] - cw + 1))
    ref = lv[y:y + ch, x:x + cw]
    if edit == "identity":
        tgt = ref
    elif edit == "invert":
        tgt = -ref
    elif edit == "swap_rb":
        tgt = ref[..., ::-1]
    elif edit == "shift_down":  # content moves down: target row r shows reference row r - m
        tgt = lv[y - m:y - m + ch, x:x + cw]
    elif edit == "shift_right":
        tgt = lv[y:y + ch, x - m:x - m + cw]
    else:
        raise ValueError(edit)
    return np.ascontiguousarray(tgt), np.ascontiguousarray(ref)


def to_latents(crops: list[np.ndarray]) -> torch.Tensor:
    rgb = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return rgb_to_latents(rgb)


class Conditioning:
    def __init__(self):
        pairs = [edit_conditioning(e) for e in EDITS]
        self.prompt = torch.cat([p for p, _ in pairs])  # [E, T, D]
        self.pooled = torch.cat([q for _, q in pairs])  # [E, P]

    def __call__(self, edit_idx: torch.Tensor):
        return self.prompt[edit_idx], self.pooled[edit_idx]


def make_batch(rng, levels, edit_idx: list[int], crop: int):
    tgts, refs = zip(*(make_pair(rng, levels, EDITS[e], crop) for e in edit_idx))
    return to_latents(list(tgts)), to_latents(list(refs))


# ------------------------------------------------------------------------------------------------ model
def make_scheduler(steps: int, num_target: int):
    """FluxKontextPipeline's scheduler: sigmas linspace(1, 1/N, N), mu = calculate_shift(Nx)."""
    return flow_match_scheduler(SCHEDULER, steps, calculate_shift(num_target))


def velocity(model, xt, ref, t, guidance, prompt, pooled, layout: Layout):
    txt_ids, img_ids = kontext_ids(layout)
    out = model(hidden_states=torch.cat([xt, ref], dim=1), timestep=t, guidance=guidance,
                pooled_projections=pooled, encoder_hidden_states=prompt, txt_ids=txt_ids, img_ids=img_ids,
                return_dict=False)[0]
    return out[:, :layout.num_target]


@torch.no_grad()
def generate(model, ref, prompt, pooled, noise, guidance, layout: Layout, steps: int):
    """The FluxKontextPipeline denoising loop (no CFG), starting from ``noise``."""
    sched = make_scheduler(steps, layout.num_target)
    x = noise.clone()
    for t in sched.timesteps:
        ts = t.expand(x.shape[0]).to(x.dtype)
        v = velocity(model, x, ref, ts / 1000, guidance, prompt, pooled, layout)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


# ------------------------------------------------------------------------------------------------ training
def make_optimizer(model, lr: float):
    """AdamW (betas 0.9/0.99), weight decay 0.01 on matrices only (not on biases and norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


def sample_t(gen: torch.Generator, batch: int, mu: float) -> torch.Tensor:
    """Training noise levels: logit-normal, shifted by mu (the schedule's time shift at inference)."""
    t = torch.sigmoid(torch.randn(batch, generator=gen))
    return math.exp(mu) * t / (1 + (math.exp(mu) - 1) * t)  # = FlowMatchEuler's exponential time shift


def train_loop(model, ema, opt, args, log, draw, predict, val_loss, device=None) -> dict:
    """The rectified-flow loop every training script runs: x_t = (1 - t) x0 + t noise, loss = MSE(v, noise - x0),
    linear LR warmup then constant (so a run stopped by --minutes after K steps equals a run with --steps K),
    grad-norm clip 1.0, EMA with a warm-up decay. ``draw(step) -> (x0, noise, t, extra)`` makes a batch (the
    script's own random draws, in its own order); ``predict(model, xt, t, extra)`` is the transformer call.
    args: steps, minutes, lr, warmup, ema, log_every, val_every. Returns the training numbers of the card."""
    log(f"step 0 val_loss {val_loss(model):.4f}")
    budget = args.minutes * 60 if args.minutes > 0 else math.inf
    start = time.time()
    window, step, losses = [], 0, []
    model.train()
    while step < args.steps:
        if time.time() - start > budget:
            log(f"# wall budget of {args.minutes} min reached after {step} steps")
            break
        x0, noise, t, extra = draw(step)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        target = noise - x0
        if device is not None:
            xt, t, target = xt.to(device), t.to(device), target.to(device)
        v = predict(model, xt, t, extra)
        loss = F.mse_loss(v, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        step += 1
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            el = time.time() - start
            losses.append((step, sum(window) / len(window)))
            log(f"step {step} loss {losses[-1][1]:.4f} lr {lr:.2e} gnorm {gnorm:.2f} "
                f"elapsed {el:.0f}s ({el / step:.2f}s/step)")
            window = []
        if step % args.val_every == 0:
            log(f"step {step} val_loss {val_loss(model):.4f} ema_val_loss {val_loss(ema):.4f}")
    train_s = time.time() - start
    if window:
        losses.append((step, sum(window) / len(window)))
    final_val, final_ema_val = val_loss(model), val_loss(ema)
    log(f"# trained {step} steps in {train_s:.0f}s; final train loss (last window) {losses[-1][1]:.4f}; "
        f"val_loss {final_val:.4f}; ema_val_loss {final_ema_val:.4f}")
    return {"steps": step, "train_seconds": round(train_s), "final_loss": round(losses[-1][1], 5),
            "val_loss": round(final_val, 5), "ema_val_loss": round(final_ema_val, 5)}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=100000, help="max optimizer steps (default: until --minutes)")
    p.add_argument("--minutes", type=float, default=15.0, help="wall budget of the training loop (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--log", type=Path, default=None, help="default: OUT/train_log.txt")
    p.add_argument("--samples-out", type=Path, default=None, help="default: OUT/samples")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=32, help="crop size in px (token grid = crop/2)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-count", type=int, default=50, help="held-out pairs for the PSNR evaluation")
    p.add_argument("--eval-steps", type=int, default=28, help="denoising steps of the evaluation")
    p.add_argument("--num-samples", type=int, default=8, help="held-out sample files to write")
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


def asset_parser(doc: str, default_out: Path, *, crop_help: str, low_res_help: str, crop_type=int, crop=32,
                 low_res_crop=16, low_res_frac=0.5):
    """The command line the asset training scripts share (train_canvas.py, train_texture.py): their recipe, crops,
    evaluation and sample counts, and --eval-only."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2400, help="optimizer steps")
    p.add_argument("--minutes", type=float, default=0.0, help="wall budget of the training loop, stops early (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=default_out)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=crop_type, default=crop, help=crop_help)
    p.add_argument("--low-res-crop", type=crop_type, default=low_res_crop, help=low_res_help)
    p.add_argument("--low-res-frac", type=float, default=low_res_frac, help="fraction of the steps at --low-res-crop")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-count", type=int, default=40, help="held-out requests for the PSNR evaluation")
    p.add_argument("--eval-steps", type=int, default=28, help="denoising steps of the evaluation")
    p.add_argument("--num-samples", type=int, default=8, help="held-out sample files to write")
    p.add_argument("--num-calibration", type=int, default=4, help="calibration sample files (training photos)")
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-only", action="store_true",
                   help="no training: load the model in --out, evaluate it, rewrite the samples, the preview and the\n"
                        "card (training numbers from the RESULT line of OUT/train_log.txt; log: OUT/eval_log.txt)")
    return p


def predict_kontext(m, xt, t, extra):
    """train_loop's predict for the Kontext-layout asset scripts: extra = (ref, guidance, prompt, pooled, layout)."""
    ref, guidance, prompt, pooled, lay = extra
    return velocity(m, xt, ref, t, guidance, prompt, pooled, lay)


def training_run(args, out: Path, parse_args):
    """--eval-only of an asset script: (the training run's arguments, parsed by ``parse_args`` from the log's first
    line, with this run's evaluation arguments; its training numbers from the log's RESULT line)."""
    train_log = out / "train_log.txt"
    text = train_log.read_text() if train_log.exists() else ""
    if "RESULT " not in text:
        raise SystemExit(f"--eval-only: {train_log} has no RESULT line: train the model first")
    trained = json.loads(text.rsplit("RESULT ", 1)[1].splitlines()[0])
    train_args = parse_args(shlex.split(text.splitlines()[0].lstrip("# "))[2:])
    for k in ("out", "eval_count", "eval_steps", "num_samples", "num_calibration", "eval_only"):
        setattr(train_args, k, getattr(args, k))
    keep = ("steps", "train_seconds", "final_loss", "val_loss", "ema_val_loss")
    return train_args, {k: trained[k] for k in keep}


class Logger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")

    def __call__(self, msg: str):
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def start_run(args, script: str, argv, log_path: Path):
    """What every training script does first: torch threads, denormals flushed, the seed, the output folder, the
    log, and the command and machine at its top. Returns (log, the command line)."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals slow CPU matmuls ~10x once the loss drops
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Logger(log_path)
    cmd = f"python scripts/{script} " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    log(f"# {cmd}")
    log(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {cpu_name()}, {os.cpu_count()} cores")
    return log, cmd


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    out = args.out
    log, cmd = start_run(args, "train_kontext.py", argv, args.log or out / "train_log.txt")
    samples_out = args.samples_out or out / "samples"

    grid = (args.crop // 2, args.crop // 2)
    layout = Layout(TEXT_TOKENS, grid, (grid,))
    mu = calculate_shift(layout.num_target)
    t0 = time.time()
    train_levels = [pyramid(load_image(n), args.crop) for n in TRAIN_IMAGES]
    held_levels = [pyramid(load_image(n), args.crop) for n in HELDOUT_IMAGES]
    log(f"# data: {len(TRAIN_IMAGES)} train images ({sum(map(len, train_levels))} pyramid levels), held out "
        f"{', '.join(HELDOUT_IMAGES)}; crops {args.crop}px -> {grid[0]}x{grid[1]} tokens; edits {', '.join(EDITS)} "
        f"({time.time() - t0:.1f}s)")
    cond = Conditioning()

    # Held-out evaluation set (fixed, independent of --seed): edits cycle so any prefix covers all edits.
    erng = np.random.default_rng(EVAL_SEED)
    n_eval = max(args.eval_count, args.num_samples)
    ev_edit = torch.tensor([i % len(EDITS) for i in range(n_eval)])
    ev_x0, ev_ref = make_batch(erng, held_levels, ev_edit.tolist(), args.crop)
    eg = torch.Generator().manual_seed(EVAL_SEED)
    ev_noise = torch.randn(ev_x0.shape, generator=eg)
    ev_t = (torch.arange(n_eval) % 8 + 0.5) / 8  # val-loss timesteps: a fixed grid over (0, 1)
    ev_g = torch.full((n_eval,), 2.5)
    ev_prompt, ev_pooled = cond(ev_edit)

    model = FluxTransformer2DModel(**model_config())
    ema = copy.deepcopy(model).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"# model: FluxTransformer2DModel {json.dumps(model_config())}, {n_params} params "
        f"({n_params * 4 / 1e6:.2f} MB fp32)")
    opt = make_optimizer(model, args.lr)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def val_loss(m):
        m.eval()
        xt = (1 - ev_t[:, None, None]) * ev_x0 + ev_t[:, None, None] * ev_noise
        v = velocity(m, xt, ev_ref, ev_t, ev_g, ev_prompt, ev_pooled, layout)
        m.train()
        return F.mse_loss(v, ev_noise - ev_x0).item()

    def draw(step):
        edit_idx = torch.randint(len(EDITS), (args.batch,), generator=gen)
        x0, ref = make_batch(rng, train_levels, edit_idx.tolist(), args.crop)
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_t(gen, args.batch, mu)
        guidance = 1 + 3 * torch.rand(args.batch, generator=gen)
        return x0, noise, t, (ref, guidance, *cond(edit_idx))

    def predict(m, xt, t, extra):
        ref, guidance, prompt, pooled = extra
        return velocity(m, xt, ref, t, guidance, prompt, pooled, layout)

    result = train_loop(model, ema, opt, args, log, draw, predict, val_loss)

    # ---- evaluation: the Kontext sampling loop on held-out pairs, PSNR vs ground truth ---------------
    ema.eval()
    t1 = time.time()
    gen_x = generate(ema, ev_ref, ev_prompt, ev_pooled, ev_noise, ev_g, layout, args.eval_steps)
    eval_s = time.time() - t1
    mse_m, mse_b = mse_rgb(gen_x, ev_x0), mse_rgb(ev_ref, ev_x0)
    per_edit = {}
    for i, e in enumerate(EDITS):
        sel = ev_edit[:args.eval_count] == i
        if sel.any():
            per_edit[e] = {"n": int(sel.sum()), "model": _psnr(mse_m[:args.eval_count][sel]),
                           "baseline": _psnr(mse_b[:args.eval_count][sel])}
    m_all, b_all = mse_m[:args.eval_count], mse_b[:args.eval_count]
    edited = ev_edit[:args.eval_count] != EDITS.index("identity")
    result = {
        **result,
        "eval_pairs": int(args.eval_count), "eval_steps": args.eval_steps, "eval_seconds": round(eval_s, 1),
        "psnr_model": _psnr(m_all), "psnr_baseline": _psnr(b_all),
        "psnr_model_edited": _psnr(m_all[edited]) if edited.any() else None,
        "psnr_baseline_edited": _psnr(b_all[edited]) if edited.any() else None,
        "per_edit": per_edit,
    }
    log("# held-out PSNR (dB, RGB in [0,1]; mean of per-pair PSNR, identical pairs capped at 60 dB):")
    log(f"#   {'edit':<12} {'n':>3} {'model':>7} {'baseline':>9}")
    for e, r in per_edit.items():
        log(f"#   {e:<12} {r['n']:>3} {r['model']:>7.2f} {r['baseline']:>9.2f}")
    log(f"#   {'all':<12} {len(m_all):>3} {result['psnr_model']:>7.2f} {result['psnr_baseline']:>9.2f}")
    if result["psnr_model_edited"] is not None:
        log(f"#   {'all but id.':<12} {int(edited.sum()):>3} {result['psnr_model_edited']:>7.2f} "
            f"{result['psnr_baseline_edited']:>9.2f}")
    log(f"# evaluation: {args.eval_steps} steps x {len(ev_ref)} pairs in {eval_s:.0f}s")

    # ---- save -------------------------------------------------------------------------------------------
    ema.save_pretrained(out, safe_serialization=True)
    samples_out.mkdir(parents=True, exist_ok=True)
    gs = f"{grid[0]}x{grid[1]}"
    for i in range(args.num_samples):
        save_file({"reference_latents": ev_ref[i:i + 1].contiguous(), "prompt_embeds": ev_prompt[i:i + 1].contiguous(),
                   "pooled_prompt_embeds": ev_pooled[i:i + 1].contiguous(), "noise": ev_noise[i:i + 1].contiguous(),
                   "guidance": ev_g[i:i + 1].contiguous(), "target_latents": ev_x0[i:i + 1].contiguous()},
                  samples_out / f"sample_{i}.safetensors",
                  metadata={"target_grid": gs, "reference_grid": gs, "edit": EDITS[int(ev_edit[i])]})
    preview = _write_preview(out / "preview.png", ev_ref, gen_x, ev_x0, grid, min(args.num_samples, 8))
    weights = out / "diffusion_pytorch_model.safetensors"
    result["weights_bytes"] = weights.stat().st_size
    log(f"# saved {out} ({result['weights_bytes'] / 1e6:.2f} MB weights), {args.num_samples} samples in {samples_out}")
    (out / "MODEL_CARD.md").write_text(_model_card(args, cmd, result, n_params, layout, preview))
    log(f"RESULT {json.dumps(result)}")
    return result


def _psnr(mse: torch.Tensor) -> float:
    return round(float((10 * torch.log10(1.0 / mse.clamp_min(1e-6))).mean()), 3)


def write_preview_png(path: Path, rows, gap: int = 2):
    """One PNG of rows of image tiles (HxWx3 uint8; None: a 6 px blank), white gaps (``gap`` px between columns, 2
    between rows), scaled 3x. None when there is nothing to draw or PIL is missing; else the file's name."""
    if not rows:
        return None
    try:
        from PIL import Image
    except ImportError:
        return None
    lines = []
    for tiles in rows:
        h = next(t for t in tiles if t is not None).shape[0]
        parts = []
        for tile in tiles:
            parts += [np.full((h, 6, 3), 255, np.uint8) if tile is None else tile, np.full((h, gap, 3), 255, np.uint8)]
        lines.append(np.concatenate(parts[:-1], axis=1))
        lines.append(np.full((2, lines[-1].shape[1], 3), 255, np.uint8))
    img = np.concatenate(lines[:-1], axis=0)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)
    return path.name


def _write_preview(path: Path, ref, gen_x, x0, grid, n: int):
    """A PNG: rows = samples, columns = reference | generated | ground truth."""
    return write_preview_png(path, [[latents_to_image(a[i:i + 1], grid) for a in (ref, gen_x, x0)] for i in range(n)])


def _model_card(args, cmd, r, n_params, layout, preview) -> str:
    cfg = model_config()
    rows = "\n".join(f"| {e} | {v['n']} | {v['model']:.2f} | {v['baseline']:.2f} |" for e, v in r["per_edit"].items())
    repro = (f"python scripts/train_kontext.py --steps {r['steps']} --minutes 0 --seed {args.seed} --batch {args.batch} "
             f"--crop {args.crop} --lr {args.lr} --warmup {args.warmup} --ema {args.ema} --threads {args.threads}")
    edited = ""
    if r["psnr_model_edited"] is not None:
        edited = f"| all but identity | | {r['psnr_model_edited']:.2f} | {r['psnr_baseline_edited']:.2f} |\n"
    return f"""# kontext-digits

A small, really-trained in-context model in the exact FLUX.1 Kontext layout (diffusers
`FluxTransformer2DModel`, `FluxKontextPipeline` token layout and ids), shipped so that ToPi context-token
pruning can be evaluated on a model whose attention to the reference matters. It is the default
built-in model of topi-export (`load_model("kontext-digits")`). Not a general image model.

## Task and data

- "Latents" are image crops, not VAE latents: {args.crop}x{args.crop} px RGB in [-1, 1] plus a luma channel
  (4 channels), packed 2x2 per token like Flux's `_pack_latents` (token channel = c*4 + dy*2 + dx):
  16 channels per token, a {layout.target_grid[0]}x{layout.target_grid[1]} token grid, so
  {layout.num_target} target + {layout.num_ctx} reference tokens (+ {layout.text_tokens} text tokens).
  `topi_export.models.kontext_digits.latents_to_image` turns latents back into an RGB image.
- Images: scikit-image's bundled sample photos (`skimage.data`), at scales 1, 1/2, 1/4, ... (short side
  <= 400 px), random crops and horizontal flips. Train: {', '.join(TRAIN_IMAGES)}.
  Held out for evaluation: {', '.join(HELDOUT_IMAGES)}.
- Task: target = edit(reference); the edit is named by the conditioning, a fixed seeded random
  `prompt_embeds` [1, {TEXT_TOKENS}, {cfg['joint_attention_dim']}] and `pooled_prompt_embeds`
  [1, {cfg['pooled_projection_dim']}] per edit (`kontext_digits.edit_conditioning`). Edits:
  `identity`; `invert` (colour inversion); `swap_rb` (red/blue swap); `shift_down` / `shift_right`
  (the view pans so content moves {SHIFT_TOKENS} tokens down / right; the rows / columns panned in are not
  in the reference and must be guessed). Every edit keeps a token-to-token spatial correspondence
  between target and reference, so the reference tokens a target token needs are well defined (and the
  last {SHIFT_TOKENS} reference rows / columns are useless for the pans).
- Layout: `hidden_states = cat([noisy target, reference])`, `img_ids = kontext_ids(layout)` (reference
  ids first component 1), `txt_ids` zeros, `timestep` = sigma in [0, 1] (pipeline: t / 1000), `guidance`
  (trained on U[1, 4]; samples use 2.5); only `out[:, :{layout.num_target}]` is the velocity.

## Model

`FluxTransformer2DModel` config: `{json.dumps(cfg)}`: 2 double-stream + 4 single-stream blocks
(6 layers), 4 heads x 32 dims, {n_params} parameters, {r['weights_bytes'] / 1e6:.2f} MB safetensors
(fp32, EMA weights).

## Training

Rectified flow: x_t = (1 - t) x0 + t noise, target velocity = noise - x0, t = sigmoid(N(0, 1)) shifted
with mu = calculate_shift({layout.num_target}) = {calculate_shift(layout.num_target):.3f} (the time shift the
Kontext schedule applies at inference). AdamW (lr {args.lr}, betas 0.9/0.99, weight decay 0.01 on
matrices), {args.warmup}-step linear warmup then constant LR, grad-norm clip 1.0, batch {args.batch},
EMA {args.ema}. Seeded and deterministic for a given step count and thread count (the LR schedule does
not depend on the total step count).

- steps: {r['steps']}, training wall time: {r['train_seconds']} s ({r['train_seconds'] / 60:.1f} min)
- machine: {cpu_name()}, torch {torch.__version__}, {args.threads} threads (the 2 cores were shared with
  other jobs, so wall time is an upper bound)
- final training loss (mean of the last {args.log_every} steps): {r['final_loss']:.4f}
- held-out velocity MSE at 8 fixed t (raw / EMA weights): {r['val_loss']:.4f} / {r['ema_val_loss']:.4f}
- log: `train_log.txt`

## Held-out evaluation

{r['eval_pairs']} held-out pairs (crops of {', '.join(HELDOUT_IMAGES)}, edits cycling), generated with diffusers'
`FlowMatchEulerDiscreteScheduler` exactly as `FluxKontextPipeline` does (shift=3.0, dynamic shifting,
sigmas = linspace(1, 1/N, N), mu = calculate_shift({layout.num_target}), transformer timestep = t/1000),
N = {r['eval_steps']} steps, guidance 2.5, seeded noise. PSNR in dB of the RGB channels (images in [0, 1]),
mean of per-pair PSNR (an exact match counts as 60 dB). Baseline: output = the unedited reference.

| edit | pairs | model | baseline (reference) |
|---|---|---|---|
{rows}
| all | {r['eval_pairs']} | {r['psnr_model']:.2f} | {r['psnr_baseline']:.2f} |
{edited}
{f'Preview (`{preview}`): rows = held-out samples; columns = reference | generated | ground truth.' if preview else ''}

## Samples

`samples/sample_{{i}}.safetensors` (the first {args.num_samples} evaluation pairs): `reference_latents`
[1, {layout.num_ctx}, 16], `prompt_embeds` [1, {TEXT_TOKENS}, {cfg['joint_attention_dim']}], `pooled_prompt_embeds`
[1, {cfg['pooled_projection_dim']}], `noise` [1, {layout.num_target}, 16], `guidance` [1], `target_latents`
[1, {layout.num_target}, 16]; metadata `target_grid`, `reference_grid`, `edit`.

## Reproduce

Command that produced this folder:

    {cmd}

Same weights without the wall-clock cap (the run above stopped after {r['steps']} steps):

    {repro}
"""


if __name__ == "__main__":
    main()
