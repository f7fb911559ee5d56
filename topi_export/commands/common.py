"""Options and helpers shared by several subcommands (one definition, same flag names everywhere)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from topi_export.errors import TopiError
from topi_export.fsutil import (atomic_write_bytes, check_distinct_outputs, check_writable,  # noqa: F401
                                refuse_overwrite)

MAX_SEED = (1 << 64) - 1


class ManyValues(click.Option):
    """``--inputs A B C`` as well as ``--inputs A --inputs B``: takes every following argument up to the
    next option (click options take a fixed number of values)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("multiple", True)
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            opt = parser._long_opt.get(name) or parser._short_opt.get(name)
            if opt is None:
                continue
            plain = opt.process

            def process(value, state, plain=plain):
                values = [value]
                while state.rargs and not state.rargs[0].startswith("-"):
                    values.append(state.rargs.pop(0))
                for v in values:
                    plain(v, state)

            opt.process = process


def model_option(f):
    return click.option("--model", default=None, metavar="NAME|PATH",
                        help="Built-in model (flux2-pick, kontext-digits, tiny-kontext, tiny-flux2, tiny-qwen-edit, "
                             "mid-*) or a local diffusers folder (transformer or pipeline). Default: the embedded "
                             "model.")(f)


def steps_option(f):
    return click.option("--steps", "--denoising-steps", "steps", type=click.IntRange(1, 1000), default=28,
                        show_default=True, help="Denoising steps (1..1000).")(f)


def seed_option(f):
    return click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                        help="Seed of the initial noise (0..2^64-1).")(f)


def device_options(f):
    f = click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
                     help="PyTorch backend precision (fp16/bf16 need --device cuda).")(f)
    return click.option("--device", default="cpu", show_default=True,
                        help="PyTorch backend device: cpu or cuda[:N] (fused Triton kernels on CUDA).")(f)


def reuse_options(f):
    f = click.option("--reuse-order", type=click.IntRange(0, 1), default=0, show_default=True,
                     help="Reused steps take the last computed velocity (0) or extrapolate it in sigma from the last "
                          "two (1).")(f)
    return click.option("--reuse", default=None, metavar="off|auto|N",
                        help="Step reuse: steps that skip the transformer and reuse a velocity. auto: the criterion "
                             "the model's calibration measured; N: that many steps (lowest measured error, or spread "
                             "evenly without a criterion). Never anchors, the first two or the last two steps. "
                             "Default: auto when this model's profile measured a criterion, else off.")(f)


def residual_option(f):
    from topi_export.plan.limits import RESIDUAL_CHOICES

    return click.option("--pruning-residual", "pruning_residual", type=click.Choice(list(RESIDUAL_CHOICES)),
                        default="off", show_default=True,
                        help="At every anchor also run the kept set on the anchor's input; the pruned steps until the "
                             "next anchor add the difference (one more pruned call per anchor; docs/design.md, "
                             "\"Pruning residual\").")(f)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(f)


def show_progress(quiet: bool) -> bool:
    """Progress is shown unless --quiet: a bar on a terminal, log lines otherwise (topi_export/progress.py)."""
    return not quiet


POLICY_HELP = ("Token selection policy (default: the engine directory's, else the package default); an unknown "
               "name lists them all with what each does (README, Selection policies).")


def output_files(paths, protected=()) -> None:
    """Before any work: every output file can be written, is not another output's file, and overwrites nothing
    the run reads."""
    check_distinct_outputs(paths)
    for p in paths:
        if p:
            check_writable(p)
            refuse_overwrite(p, [q for q in protected if q])


def write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(strict_json(obj), indent=2, allow_nan=False, default=_jsonable) + "\n").encode())


def strict_json(obj):
    """Infinite PSNR (identical latents) -> null, so reports are strict JSON."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _jsonable(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def save_latents(path, latents) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({"latents": latents.contiguous()}))


def parse_float_list(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise TopiError(f"bad {what} {text!r}: give comma-separated numbers, e.g. 0.5,0.7") from None
