#!/usr/bin/env python3
"""Train ``flux2-pick``: a small, deterministic, really-trained multi-reference FLUX.2-layout model.

Why: ToPi prunes reference (context) tokens by their influence on the target tokens, and it pays most
where much of the context is irrelevant: multi-reference edits. This model sees three references from
different photos; the conditioning names ONE of them and an edit, so two thirds of the context is
irrelevant to every request and the model has to route its attention to the selected reference.

Data: scikit-image's bundled sample photos, random 32x32 px crops packed like ``kontext-digits`` (RGB +
luma, 2x2 per token: 16 channels, a 16x16 token grid), the three references of a request from three
different photos. ``astronaut``, ``coffee`` and ``chelsea`` are held out for evaluation. Task: target =
edit(reference[sel]), the conditioning a fixed seeded random ``prompt_embeds`` per (reference, edit)
(``flux2_pick.pick_conditioning``). Layout exactly as Flux2Pipeline: hidden_states = [noisy target |
ref_0 | ref_1 | ref_2], img_ids 4-D (T, H, W, L) with the target at T = 0 and reference i at T = 10 + 10 i,
text ids (0, 0, 0, l), timestep = sigma in [0, 1], no guidance embedding; only out[:, :Nx] is the velocity.

Training: rectified flow, x_t = (1 - t) x0 + t noise, target velocity noise - x0, t = logit-normal shifted
by mu = compute_empirical_mu(Nx, 28) (the time shift the FLUX.2 schedule applies at 28 steps), AdamW with
warmup then constant LR, EMA weights saved. Most steps (``--low-res-frac``) use 16 px crops (8x8-token
grids, a quarter of the tokens): RoPE is relative, so "copy the token at the same (h, w) of the reference
at T = 10 + 10 sel" is the same operation at any grid size, and a low-res step costs about a quarter of a
full one. The LR schedule does not depend on the total step count, so a run stopped by ``--minutes``
after K steps is bit-identical to a run with ``--steps K`` (same seed, same thread count).

Evaluation: held-out requests generated with diffusers' FlowMatchEulerDiscreteScheduler exactly as
Flux2Pipeline does (sigmas = linspace(1, 1/N, N), mu = compute_empirical_mu(Nx, N), shift=3.0 with dynamic
shifting, transformer timestep = t / 1000). PSNR against ground truth and against the trivial baselines
"copy the selected reference unedited" / "copy a wrong reference"; and a pruning sanity check: the same
generation with the two unselected references' tokens dropped from the sequence (every step, every layer),
PSNR against the full generation.

    python scripts/train_multiref.py --steps 2000 --minutes 0 --threads 1 --eval-crop 48   # writes topi_export/assets/flux2-pick
    python scripts/train_multiref.py --samples-only --eval-crop 48 --eval-count 30   # re-evaluate, rewrite the samples
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import shlex
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from topi_export.models.flux2_pick import (EDITS, NUM_REFERENCES, TEXT_TOKENS, image_ids, model_config,
                                           pick_conditioning, reference_ids, reference_slices, target_ids,
                                           text_ids)
from topi_export.models.kontext_digits import latents_to_image, mse_rgb, rgb_to_latents

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "topi_export" / "assets" / "flux2-pick"
TRAIN_IMAGES = ("camera", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "coins",
                "moon", "grass", "gravel", "brick", "cell", "logo", "page", "text", "clock")
HELDOUT_IMAGES = ("astronaut", "coffee", "chelsea")
EVAL_SEED = 777  # held-out requests and their noise do not depend on --seed
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
SHIFT_STEPS = 28  # the training time shift is the schedule's at this many steps (Flux2Pipeline's default)


def _kontext_script():
    """scripts/train_kontext.py as a module: its image loading / cropping / logging helpers are reused."""
    spec = importlib.util.spec_from_file_location("train_kontext", Path(__file__).resolve().parent / "train_kontext.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tk = _kontext_script()


# ------------------------------------------------------------------------------------------------ data
def make_request(rng: np.random.Generator, levels: list, sel: int, edit: str, crop, count: int = NUM_REFERENCES):
    """(target, [ref_0, ..., ref_{count-1}]) HxWx3 crops in [-1, 1]: the references from different images,
    target = edit(reference[sel]). ``crop``: px, or (height, width) px (train_kontext.make_pair)."""
    imgs = rng.choice(len(levels), size=count, replace=False)
    refs, target = [], None
    for i, k in enumerate(imgs):
        tgt, ref = tk.make_pair(rng, [levels[k]], edit if i == sel else "identity", crop)
        refs.append(ref)
        if i == sel:
            target = tgt
    return target, refs


def to_latents(crops: list[np.ndarray]) -> torch.Tensor:
    rgb = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return rgb_to_latents(rgb)


def make_batch(rng, levels, sel: list[int], edit_idx: list[int], crop: int):
    """(x0 [B, N, 16], references [B, 3N, 16], prompt_embeds [B, T, D])."""
    tgts, refs = [], [[] for _ in range(NUM_REFERENCES)]
    for s, e in zip(sel, edit_idx):
        tgt, rs = make_request(rng, levels, s, EDITS[e], crop)
        tgts.append(tgt)
        for i, r in enumerate(rs):
            refs[i].append(r)
    ref = torch.cat([to_latents(r) for r in refs], dim=1)
    prompt = torch.cat([pick_conditioning(s, EDITS[e]) for s, e in zip(sel, edit_idx)])
    return to_latents(tgts), ref, prompt


# ------------------------------------------------------------------------------------------------ model
def velocity(model, xt, ref, t, prompt, img_ids, txt_ids):
    """One transformer call the way Flux2Pipeline makes it; ``img_ids`` covers [target | ref]."""
    out = model(hidden_states=torch.cat([xt, ref], dim=1), encoder_hidden_states=prompt, timestep=t,
                img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
    return out[:, :xt.shape[1]]


def make_scheduler(steps: int, num_target: int, device=None):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from topi_export.models.sampling import compute_empirical_mu

    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=compute_empirical_mu(num_target, steps),
                        device=device)
    sched.set_begin_index(0)
    return sched


@torch.no_grad()
def generate(model, ref, prompt, noise, img_ids, txt_ids, steps: int):
    """The Flux2Pipeline denoising loop (no CFG, no guidance embedding), starting from ``noise``."""
    sched = make_scheduler(steps, noise.shape[1], noise.device)
    x = noise.clone()
    for t in sched.timesteps:
        ts = t.expand(x.shape[0]).to(x.dtype)
        v = velocity(model, x, ref, ts / 1000, prompt, img_ids, txt_ids)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def generate_selected_only(model, ref, prompt, noise, sel, grid, grids, steps: int):
    """The same loop with the unselected references' tokens dropped from the sequence (all steps, all
    layers); the selected reference keeps its own ids (T = 10 + 10 sel)."""
    out = torch.empty_like(noise)
    slices, ids = reference_slices(grids), reference_ids(grids).to(noise.device)
    for s in sel.unique().tolist():
        rows = (sel == s).nonzero().flatten()
        img_ids = torch.cat([target_ids(grid).to(noise.device), ids[slices[s]]])
        out[rows] = generate(model, ref[rows][:, slices[s]], prompt[rows], noise[rows], img_ids,
                             text_ids().to(noise.device), steps)
    return out


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (the shipped model: 2000)")
    p.add_argument("--minutes", type=float, default=0.0, help="wall budget of the training loop, stops early (0 = none)")
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
    p.add_argument("--eval-count", type=int, default=60, help="held-out requests for the PSNR evaluation")
    p.add_argument("--eval-steps", type=int, default=28, help="denoising steps of the evaluation")
    p.add_argument("--num-samples", type=int, default=8, help="held-out sample files to write")
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--edits", default=",".join(EDITS), help="comma-separated subset of the edits to train and evaluate")
    p.add_argument("--low-res-crop", type=int, default=16,
                   help="crop size in px of the low-resolution training steps (RoPE is relative, so what is learnt\n"
                        "at a small grid carries over; a low-res step costs a fraction of a full one)")
    p.add_argument("--low-res-frac", type=float, default=0.9, help="fraction of the steps at --low-res-crop")
    p.add_argument("--device", default="cpu", help="torch device (the shipped weights were trained on CPU)")
    p.add_argument("--eval-crop", type=int, default=None,
                   help="crop size in px of the held-out evaluation and the sample files (default: --crop; the\n"
                        "shipped samples: 48, a 24x24 grid, longer context than training saw: RoPE is relative)")
    p.add_argument("--samples-only", action="store_true",
                   help="no training: load the model in --out, evaluate it at --eval-crop, write the samples,\n"
                        "the preview and the card (training numbers from the RESULT line of OUT/train_log.txt);\n"
                        "the evaluation log goes to OUT/eval_log.txt")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers import Flux2Transformer2DModel
    from topi_export.models.sampling import compute_empirical_mu

    dev = torch.device(args.device)
    out = args.out
    log, cmd = tk.start_run(args, "train_multiref.py", argv,
                            args.log or out / ("eval_log.txt" if args.samples_only else "train_log.txt"))

    edits = [e.strip() for e in args.edits.split(",") if e.strip()]
    if not edits or any(e not in EDITS for e in edits):
        raise SystemExit(f"--edits {args.edits!r}: name edits among {', '.join(EDITS)}")
    edit_ids = torch.tensor([EDITS.index(e) for e in edits])
    if args.samples_only:
        return samples_only(args, log, cmd, edits, edit_ids, dev)
    grid = (args.crop // 2, args.crop // 2)
    grids = [grid] * NUM_REFERENCES
    n_target = grid[0] * grid[1]
    mu = compute_empirical_mu(n_target, SHIFT_STEPS)
    ids_img, ids_txt = image_ids(grid, grids).to(dev), text_ids().to(dev)
    if args.low_res_frac > 0 and not (0 < args.low_res_crop <= args.crop and args.low_res_crop % 2 == 0):
        raise SystemExit(f"--low-res-crop {args.low_res_crop}: an even size in (0, --crop]")
    layouts = {c: image_ids((c // 2, c // 2), [(c // 2, c // 2)] * NUM_REFERENCES).to(dev)
               for c in (args.crop, args.low_res_crop)}  # img_ids per training crop size
    t0 = time.time()
    train_levels = [tk.pyramid(tk.load_image(n), args.crop) for n in TRAIN_IMAGES]
    held_levels = [tk.pyramid(tk.load_image(n), args.crop) for n in HELDOUT_IMAGES]
    log(f"# data: {len(TRAIN_IMAGES)} train images ({sum(map(len, train_levels))} pyramid levels), held out "
        f"{', '.join(HELDOUT_IMAGES)}; crops {args.crop}px -> {grid[0]}x{grid[1]} tokens; {NUM_REFERENCES} "
        f"references from different images; edits {', '.join(edits)} ({time.time() - t0:.1f}s)")

    n_eval = max(args.eval_count, args.num_samples)
    ev_sel, ev_edit, ev_x0, ev_ref, ev_prompt, ev_noise = held_out_set(held_levels, edit_ids, n_eval, args.crop)
    ev_t = (torch.arange(n_eval) % 8 + 0.5) / 8  # val-loss timesteps: a fixed grid over (0, 1)

    model = Flux2Transformer2DModel(**model_config())
    ema = copy.deepcopy(model).requires_grad_(False)
    model.to(dev), ema.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"# model: Flux2Transformer2DModel {json.dumps(model_config())}, {n_params} params "
        f"({n_params * 4 / 1e6:.2f} MB fp32); sequence {TEXT_TOKENS} text + {n_target} target + "
        f"{NUM_REFERENCES * n_target} reference tokens; training t shift mu = compute_empirical_mu({n_target}, "
        f"{SHIFT_STEPS}) = {mu:.3f}")
    opt = tk.make_optimizer(model, args.lr)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def val_loss(m):
        m.eval()
        xt = (1 - ev_t[:, None, None]) * ev_x0 + ev_t[:, None, None] * ev_noise
        losses = []
        for i in range(0, n_eval, 16):  # chunks keep the memory small
            sl = slice(i, i + 16)
            v = velocity(m, xt[sl].to(dev), ev_ref[sl].to(dev), ev_t[sl].to(dev), ev_prompt[sl].to(dev), ids_img, ids_txt)
            losses.append(F.mse_loss(v.cpu(), (ev_noise - ev_x0)[sl], reduction="sum"))
        m.train()
        return (sum(losses) / ev_x0.numel()).item()

    def draw(step):
        sel = torch.randint(NUM_REFERENCES, (args.batch,), generator=gen)
        edit_idx = edit_ids[torch.randint(len(edits), (args.batch,), generator=gen)]
        # Low-res steps spread evenly: floor(step * frac) advances on a fraction ``frac`` of the steps.
        low = math.floor((step + 1) * args.low_res_frac) > math.floor(step * args.low_res_frac)
        crop = args.low_res_crop if low else args.crop
        x0, ref, prompt = make_batch(rng, train_levels, sel.tolist(), edit_idx.tolist(), crop)
        noise = torch.randn(x0.shape, generator=gen)
        t = tk.sample_t(gen, args.batch, mu)
        return x0, noise, t, (ref.to(dev), prompt.to(dev), layouts[crop])

    def predict(m, xt, t, extra):
        ref, prompt, img_ids = extra
        return velocity(m, xt, ref, t, prompt, img_ids, ids_txt)

    result = tk.train_loop(model, ema, opt, args, log, draw, predict, val_loss, device=dev)
    return evaluate_and_save(ema, args, log, cmd, result, edits, edit_ids, dev, n_params, mu)


# ------------------------------------------------------------------------------------------------ evaluation
def held_out_set(levels, edit_ids, n: int, crop: int):
    """The fixed held-out requests (independent of --seed): request i selects reference i % 3 and edit
    (i + i // lcm) % E, so the first lcm(3, E) requests cover every reference and edit, and the first 3 E every
    (reference, edit) pair. Returns (sel, edit, x0, references, prompt_embeds, noise); a prefix of a larger set
    is the smaller set."""
    erng = np.random.default_rng(EVAL_SEED)
    idx = torch.arange(n)
    sel = idx % NUM_REFERENCES
    edit = edit_ids[(idx + idx // math.lcm(NUM_REFERENCES, len(edit_ids))) % len(edit_ids)]
    x0, ref, prompt = make_batch(erng, levels, sel.tolist(), edit.tolist(), crop)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    return sel, edit, x0, ref, prompt, noise


def evaluate_and_save(ema, args, log, cmd, result, edits, edit_ids, dev, n_params, mu):
    """The FLUX.2 sampling loop on held-out requests at --eval-crop; then the weights (unless --samples-only),
    the sample files, the preview and the model card."""
    from safetensors.torch import save_file

    out, crop = args.out, args.eval_crop or args.crop
    samples_out = args.samples_out or out / "samples"
    grid = (crop // 2, crop // 2)
    grids = [grid] * NUM_REFERENCES
    n_eval = max(args.eval_count, args.num_samples)
    levels = [tk.pyramid(tk.load_image(n), crop) for n in HELDOUT_IMAGES]
    ev_sel, ev_edit, ev_x0, ev_ref, ev_prompt, ev_noise = held_out_set(levels, edit_ids, n_eval, crop)
    ids_img, ids_txt = image_ids(grid, grids).to(dev), text_ids().to(dev)
    log(f"# held-out evaluation at {crop} px crops ({grid[0]}x{grid[1]} tokens per image): {n_eval} requests")
    ema.eval()
    t1 = time.time()
    gen_x, drop_x = torch.empty_like(ev_x0), torch.empty_like(ev_x0)
    chunk = 16 if crop <= 32 else 4  # chunks keep the memory small
    for i in range(0, n_eval, chunk):
        sl = slice(i, i + chunk)
        a = [x[sl].to(dev) for x in (ev_ref, ev_prompt, ev_noise)]
        gen_x[sl] = generate(ema, *a, ids_img, ids_txt, args.eval_steps).cpu()
        drop_x[sl] = generate_selected_only(ema, *a, ev_sel[sl].to(dev), grid, grids, args.eval_steps).cpu()
    eval_s = time.time() - t1
    slices = reference_slices(grids)
    sel_ref = torch.stack([ev_ref[i, slices[s]] for i, s in enumerate(ev_sel.tolist())])
    wrong_ref = torch.stack([ev_ref[i, slices[(s + 1) % NUM_REFERENCES]] for i, s in enumerate(ev_sel.tolist())])
    n = args.eval_count
    mses = {"model": mse_rgb(gen_x, ev_x0)[:n], "selected_only": mse_rgb(drop_x, ev_x0)[:n],
            "copy_selected": mse_rgb(sel_ref, ev_x0)[:n], "copy_wrong": mse_rgb(wrong_ref, ev_x0)[:n],
            "drop_vs_full": mse_rgb(drop_x, gen_x)[:n]}
    per_edit = {}
    for e in edits:
        m = ev_edit[:n] == EDITS.index(e)
        if m.any():
            per_edit[e] = {"n": int(m.sum()), **{k: tk._psnr(v[m]) for k, v in mses.items()}}
    result = {**result, "eval_crop": crop, "eval_requests": int(n), "eval_steps": args.eval_steps,
              "eval_seconds": round(eval_s, 1), **{f"psnr_{k}": tk._psnr(v) for k, v in mses.items()},
              "per_edit": per_edit}
    log("# held-out PSNR (dB, RGB in [0,1]; mean of per-request PSNR, identical pairs capped at 60 dB):")
    log("#   model = full generation vs truth; sel-only = generation with the unselected references dropped vs")
    log("#   truth; copy-sel / copy-wrong = the selected (unedited) / a wrong reference vs truth;")
    log("#   drop-vs-full = sel-only generation vs full generation")
    head = f"#   {'edit':<12} {'n':>3} {'model':>7} {'sel-only':>9} {'copy-sel':>9} {'copy-wrong':>11} {'drop-vs-full':>13}"
    log(head)
    rows = list(per_edit.items()) + [("all", {"n": n, **{k: result[f'psnr_{k}'] for k in mses}})]
    for e, r in rows:
        log(f"#   {e:<12} {r['n']:>3} {r['model']:>7.2f} {r['selected_only']:>9.2f} {r['copy_selected']:>9.2f} "
            f"{r['copy_wrong']:>11.2f} {r['drop_vs_full']:>13.2f}")
    log(f"# evaluation: {args.eval_steps} steps x {n_eval} requests, full + selected-only, in {eval_s:.0f}s")

    if not args.samples_only:
        ema.to("cpu").save_pretrained(out, safe_serialization=True)
    samples_out.mkdir(parents=True, exist_ok=True)
    for old in samples_out.glob("sample_*.safetensors"):
        old.unlink()  # a smaller --num-samples must not leave samples of another run behind
    gs = f"{grid[0]}x{grid[1]}"
    for i in range(args.num_samples):
        save_file({"reference_latents": ev_ref[i:i + 1].contiguous(), "prompt_embeds": ev_prompt[i:i + 1].contiguous(),
                   "noise": ev_noise[i:i + 1].contiguous(), "target_latents": ev_x0[i:i + 1].contiguous()},
                  samples_out / f"sample_{i}.safetensors",
                  metadata={"target_grid": gs, "reference_grids": ",".join([gs] * NUM_REFERENCES),
                            "selected_reference": str(int(ev_sel[i])), "edit": EDITS[int(ev_edit[i])]})
    _write_preview(out / "preview.png", ev_ref, sel_ref, ev_x0, gen_x, drop_x, grid, grids, min(args.num_samples, 8))
    weights = out / "diffusion_pytorch_model.safetensors"
    result["weights_bytes"] = weights.stat().st_size
    log(f"# saved {out.name}/ ({result['weights_bytes'] / 1e6:.2f} MB weights), {args.num_samples} samples in "
        f"{samples_out.name}/")
    (out / "MODEL_CARD.md").write_text(_model_card(args, cmd, result, n_params, mu))
    log(f"RESULT {json.dumps(result)}")
    return result


def samples_only(args, log, cmd, edits, edit_ids, dev) -> dict:
    """Re-evaluate the saved model at --eval-crop and rewrite its samples, preview and card (no training)."""
    from diffusers import Flux2Transformer2DModel
    from topi_export.models.sampling import compute_empirical_mu

    train_log = args.out / "train_log.txt"
    if not train_log.exists() or "RESULT " not in train_log.read_text():
        raise SystemExit(f"--samples-only: {train_log} has no RESULT line: train the model first")
    trained = json.loads(train_log.read_text().rsplit("RESULT ", 1)[1].splitlines()[0])
    # The card describes the training run: its arguments come from the log's first line (the command).
    train_args = parse_args(shlex.split(train_log.read_text().splitlines()[0].lstrip("# "))[2:])
    for k in ("out", "samples_out", "eval_crop", "eval_count", "eval_steps", "num_samples", "samples_only", "device"):
        setattr(train_args, k, getattr(args, k))
    args = train_args
    keep = ("steps", "train_seconds", "final_loss", "val_loss", "ema_val_loss")
    result = {k: trained[k] for k in keep}
    result["training_size_eval"] = {"crop": trained.get("eval_crop", args.crop), "requests": trained["eval_requests"],
                                    "psnr_model": trained["psnr_model"], "psnr_drop_vs_full": trained["psnr_drop_vs_full"]}
    model = Flux2Transformer2DModel.from_pretrained(args.out).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    mu = compute_empirical_mu((args.crop // 2) ** 2, SHIFT_STEPS)
    return evaluate_and_save(model, args, log, cmd, result, edits, edit_ids, dev, n_params, mu)


def _write_preview(path: Path, ref, sel_ref, x0, gen_x, drop_x, grid, grids, n: int):
    """A PNG: rows = samples; columns = ref 0 | ref 1 | ref 2 || selected | truth | generated | sel-only."""
    slices = reference_slices(grids)
    return tk.write_preview_png(path, [[latents_to_image(ref[i:i + 1, s], g) for s, g in zip(slices, grids)] + [None] +
                                       [latents_to_image(a[i:i + 1], grid) for a in (sel_ref, x0, gen_x, drop_x)]
                                       for i in range(n)])


def _model_card(args, cmd, r, n_params, mu) -> str:
    cfg = model_config()
    n_target = (args.crop // 2) ** 2
    ref_tokens = NUM_REFERENCES * n_target
    gh = args.crop // 2
    ec = r["eval_crop"]
    eg = ec // 2
    at_size = "the training size" if ec == args.crop else "1.5x the training size" if ec * 2 == args.crop * 3 else "not the training size"
    small = r.get("training_size_eval")
    small_line = "" if not small else (
        f"\n\nAt the training size ({small['crop']} px crops, {small['requests']} requests, the evaluation in "
        f"`train_log.txt`): model {small['psnr_model']:.2f} dB, drop vs full {small['psnr_drop_vs_full']:.2f} dB.")

    def row(name, v):
        return (f"| {name} | {v['n']} | {v['model']:.2f} | {v['copy_selected']:.2f} | {v['copy_wrong']:.2f} | "
                f"{v['selected_only']:.2f} | {v['drop_vs_full']:.2f} |")

    rows = "\n".join(row(e, v) for e, v in r["per_edit"].items())
    rows += "\n" + row("all", {"n": r["eval_requests"], **{k[5:]: v for k, v in r.items() if k.startswith("psnr_")}})
    edited = {e: v for e, v in r["per_edit"].items() if e != "identity"}
    if edited and len(edited) < len(r["per_edit"]):  # copying the selected reference is exact for identity
        n = sum(v["n"] for v in edited.values())
        rows += "\n" + row("all but identity", {"n": n, **{k: round(sum(v[k] * v["n"] for v in edited.values()) / n, 3)
                                                          for k in next(iter(edited.values())) if k != "n"}})
    repro = (f"python scripts/train_multiref.py --steps {r['steps']} --minutes 0 --seed {args.seed} --batch {args.batch} "
             f"--crop {args.crop} --low-res-crop {args.low_res_crop} --low-res-frac {args.low_res_frac} --edits {args.edits} "
             f"--lr {args.lr} --warmup {args.warmup} --ema {args.ema} --threads {args.threads}"
             + (f" --eval-crop {ec}" if ec != args.crop and not args.samples_only else ""))
    if args.samples_only:
        produced = (f"Training (`train_log.txt`; the weights):\n\n    {repro}\n\nEvaluation at {ec} px, samples, preview "
                    f"and this card (`eval_log.txt`; no training):\n\n    {cmd}\n")
    else:
        produced = (f"Command that produced this folder:\n\n    {cmd}\n\nSame weights without the wall-clock cap (the run "
                    f"above stopped after {r['steps']} steps):\n\n    {repro}\n")
    return f"""# flux2-pick

A small, really-trained multi-reference edit model in the exact FLUX.2 layout (diffusers
`Flux2Transformer2DModel`, `Flux2Pipeline` token layout and 4-D position ids), shipped so that ToPi
context-token pruning can be shown where it pays: most of the context is irrelevant to the request.
Not a general image model.

## Task and data

- "Latents" are image crops, not VAE latents, packed exactly like `kontext-digits`: RGB in [-1, 1] plus
  a luma channel, 2x2 px per token (token channel = c*4 + dy*2 + dx): 16 channels per token. Training
  crops are {args.crop}x{args.crop} px (a {gh}x{gh} token grid), the held-out samples {ec}x{ec} px ({eg}x{eg}).
  `topi_export.models.kontext_digits.latents_to_image` turns latents back into an RGB image.
- A request: {NUM_REFERENCES} reference crops from {NUM_REFERENCES} DIFFERENT photos, and a conditioning that
  selects ONE reference and names an edit; target = edit(reference[selected]). So 2/3 of the
  reference tokens are irrelevant to every request.
- Conditioning: `prompt_embeds` [1, {TEXT_TOKENS}, {cfg['joint_attention_dim']}], fixed seeded random vectors per
  (reference, edit) pair (`flux2_pick.pick_conditioning`): the first {TEXT_TOKENS // 2} tokens name the
  reference (one random embedding per reference index, shared by all edits), the last {TEXT_TOKENS - TEXT_TOKENS // 2}
  the edit. No pooled embedding, no guidance embedding.
- Edits (as `kontext-digits`): `identity`; `invert`; `swap_rb` (red/blue swap); `shift_down` /
  `shift_right` (the view pans so content moves 2 tokens down / right; the rows / columns panned in
  are not in the reference). `flux2_pick.edit_latents` computes a target from its reference.
- Images: scikit-image's bundled sample photos at scales 1, 1/2, 1/4, ... (short side <= 400 px), random
  crops and horizontal flips (`train_kontext.pyramid` / `make_pair`). Train: {', '.join(TRAIN_IMAGES)}.
  Held out for evaluation: {', '.join(HELDOUT_IMAGES)} (every held-out request uses all three).
- Layout exactly as `Flux2Pipeline`: `hidden_states = cat([noisy target, ref_0, ref_1, ref_2])` (each
  image in raster order), `img_ids = cat([target ids, reference ids])` with 4-D ids (T, H, W, L): target
  T = 0, reference i T = 10 + 10 i, H / W = token row / column, L = 0 (`flux2_pick.image_ids`); text ids
  (0, 0, 0, l) (`flux2_pick.text_ids`); `timestep` = sigma in [0, 1] (pipeline: t / 1000),
  `guidance=None`; only the first target-many tokens of the output are the velocity.

## Model

`Flux2Transformer2DModel` config: `{json.dumps(cfg)}`: 2 double-stream + 4 single-stream blocks
(6 layers), 4 heads x 32 dims (width 128), {n_params} parameters, {r['weights_bytes'] / 1e6:.2f} MB
safetensors (fp32, EMA weights). Sequence: {TEXT_TOKENS} text + {n_target} target + {ref_tokens} reference tokens at
{args.crop} px; the held-out samples ({ec} px) have {TEXT_TOKENS} + {eg * eg} + {NUM_REFERENCES * eg * eg} tokens.

## Training

Rectified flow: x_t = (1 - t) x0 + t noise, target velocity = noise - x0, t = sigmoid(N(0, 1)) shifted
with mu = compute_empirical_mu({n_target}, {SHIFT_STEPS}) = {mu:.3f} (the time shift of the FLUX.2 schedule at
{SHIFT_STEPS} steps). AdamW (lr {args.lr}, betas 0.9/0.99, weight decay 0.01 on matrices), {args.warmup}-step
linear warmup then constant LR, grad-norm clip 1.0, batch {args.batch}, EMA {args.ema}. The selected reference
and the edit are uniform per request. A fraction {args.low_res_frac} of the steps (spread evenly) trains on
{args.low_res_crop} px crops ({args.low_res_crop // 2}x{args.low_res_crop // 2}-token grids, the same ids scheme): RoPE is relative, so
the copy-from-the-selected-reference operation is the same at any grid size, and such a step costs about
a quarter of a full-size one. Seeded and deterministic for a given step count and thread count (the LR
schedule does not depend on the total step count).

- steps: {r['steps']}, training wall time: {r['train_seconds']} s ({r['train_seconds'] / 60:.1f} min)
- machine: {tk.cpu_name()}, torch {torch.__version__}, {args.threads} threads (the cores were shared with
  other jobs, so wall time is an upper bound)
- final training loss (mean of the last {args.log_every} steps): {r['final_loss']:.4f}
- held-out velocity MSE at 8 fixed t (raw / EMA weights): {r['val_loss']:.4f} / {r['ema_val_loss']:.4f}
- log: `train_log.txt`

How the recipe was chosen: short exploratory runs of this script on one H200 GPU (`--device cuda
--threads 1 --minutes 0`, other arguments default unless listed; GPU numerics differ from CPU, so these
are not bit-reproducible here), evaluated as below. Cost = CPU time relative to 800 full-size steps,
a low-res step counted as a quarter of a full one (measured on CPU: 0.87 s vs 3.9 s per step, batch 8).

| run | cost | model vs truth | drop vs full |
|---|---|---|---|
| `--steps 800 --low-res-frac 0` | 1.0 | 15.15 | 30.95 |
| `--steps 1600 --low-res-frac 0` | 2.0 | 18.95 | 33.37 |
| `--steps 2000 --low-res-frac 0` | 2.5 | 21.72 | 35.10 |
| `--steps 1600 --low-res-frac 0.75` | 0.9 | 19.79 | 37.09 |
| `--steps 2000 --low-res-frac 0.9` | 0.8 | 20.61 | 37.30 |

## Held-out evaluation

{r['eval_requests']} held-out requests (crops of {', '.join(HELDOUT_IMAGES)} at {ec} px: {eg}x{eg} tokens per image,
{at_size}; RoPE is relative, so the learnt copy carries over; references and edits cycle so that
every (reference, edit) pair occurs equally often), generated with diffusers' `FlowMatchEulerDiscreteScheduler` exactly as
`Flux2Pipeline` does (shift=3.0, dynamic shifting, sigmas = linspace(1, 1/N, N), mu =
compute_empirical_mu({eg * eg}, N), transformer timestep = t/1000), N = {r['eval_steps']} steps, seeded noise.
PSNR in dB of the RGB channels (images in [0, 1]), mean of per-request PSNR (an exact match counts as
60 dB). Columns: **model** = full generation vs ground truth; **copy selected** / **copy wrong** = the
trivial outputs "the selected reference, unedited" / "another reference" vs ground truth; **selected
only** = the generation with the two unselected references' tokens dropped from the sequence at every
step and every layer (the selected one keeps its ids) vs ground truth; **drop vs full** = that
generation vs the full one (the pruning sanity check: high when the model ignores the irrelevant
references).

| edit | requests | model | copy selected | copy wrong | selected only | drop vs full |
|---|---|---|---|---|---|---|
{rows}{small_line}

Preview (`preview.png`): rows = held-out samples; columns = reference 0 | reference 1 | reference 2 ||
selected reference | ground truth | generation | generation with the unselected references dropped.

## Samples

`samples/sample_{{i}}.safetensors` (the first {args.num_samples} evaluation requests), the multi-reference
inputs format: `reference_latents` [1, {NUM_REFERENCES * eg * eg}, 16] (the references concatenated in order),
`prompt_embeds` [1, {TEXT_TOKENS}, {cfg['joint_attention_dim']}], `noise` [1, {eg * eg}, 16], `target_latents`
[1, {eg * eg}, 16]; string metadata `target_grid` = "{eg}x{eg}", `reference_grids` =
"{','.join([f'{eg}x{eg}'] * NUM_REFERENCES)}", `selected_reference` (index), `edit`. No pooled embeds, no guidance.

## Reproduce

{produced}"""


if __name__ == "__main__":
    main()
