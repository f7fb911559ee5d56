"""Experiment (not shipped): a mass-preserving merge on top of a selection policy.

Each pruned context token is assigned to its spatially nearest kept token; in the pruned layers every kept
key gets an additive attention-logit bias log(n_j) (n_j = tokens it stands for). Torch path only: it
patches the attention processor and the torch engine at run time. Shipping it would add a `keep_bias`
input to the pruned graph (ONNX Runtime, TensorRT profiles, Triton configs).

    python3 scripts/experiment_merge_bias.py   # kontext-digits, held-out samples 4-7, 28 steps
"""
from __future__ import annotations

import torch

import topi_export.models.flux_kontext as fk
from topi_export.backends.torch import TorchEngine
from topi_export.models import BUILTINS
from topi_export.runtime.inputs import load_inputs
from topi_export.runtime.loop import psnr
from topi_export.runtime.session import open_session

STATE = {"bias": None, "merge": False}
_call = fk.TopiFluxAttnProcessor.__call__
_pruned = TorchEngine.pruned


def call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
    bias = STATE["bias"]
    total = (encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0) + hidden_states.shape[1]
    if bias is not None and total == self.n_text + self.n_target + bias.numel():  # a pruned layer
        attention_mask = torch.zeros(1, 1, 1, total)
        attention_mask[..., -bias.numel():] = bias
    return _call(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def pruned(self, latents, timestep, keep_idx):
    if STATE["merge"]:
        h, w = self.inputs.layout.ref_grid
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
        nearest = torch.cdist(pos, pos[keep_idx]).argmin(1)
        STATE["bias"] = torch.bincount(nearest, minlength=len(keep_idx)).float().log()
    try:
        return _pruned(self, latents, timestep, keep_idx)
    finally:
        STATE["bias"] = None


def main():
    fk.TopiFluxAttnProcessor.__call__ = call
    TorchEngine.pruned = pruned
    session = open_session(model="kontext-digits")
    samples = BUILTINS["kontext-digits"] / "samples"
    data = [load_inputs(samples / f"sample_{i}.safetensors", session.adapter) for i in (4, 5, 6, 7)]
    fulls = [session.denoise(d, steps=28, selector=None) for d in data]
    print("ratio policy       merge  PSNR vs unpruned (min)  PSNR vs truth")
    for ratio in (0.3, 0.5):
        for policy in ("random", "topi", "topi-dither"):
            for merge in (False, True):
                STATE["merge"] = merge
                ps, gt = [], []
                for d, full in zip(data, fulls):
                    r = session.denoise(d, steps=28, selector=session.selector(d, ratio=ratio, policy=policy))
                    ps.append(psnr(r.latents, full.latents))
                    gt.append(psnr(r.latents, d.target_latents))
                print(f"{ratio:<5} {policy:12} {str(merge):6} {sum(ps) / len(ps):6.2f} ({min(ps):5.2f})"
                      f"          {sum(gt) / len(gt):6.2f}", flush=True)


if __name__ == "__main__":
    main()
