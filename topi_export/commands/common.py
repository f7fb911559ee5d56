"""Options and helpers shared by several subcommands (one definition, same flag names everywhere)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from topi_export.errors import TopiError
from topi_export.fsutil import atomic_write_bytes  # noqa: F401  (re-exported for commands)


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
                        help="Built-in model (kontext-digits, tiny-kontext, mid-kontext) or a local diffusers folder (transformer or pipeline). "
                             "Default: the embedded model.")(f)


def steps_option(f):
    return click.option("--steps", "--denoising-steps", "steps", type=int, default=28, show_default=True,
                        help="Denoising steps.")(f)


def device_options(f):
    f = click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
                     help="PyTorch backend precision (fp16/bf16 need --device cuda).")(f)
    return click.option("--device", default="cpu", show_default=True,
                        help="PyTorch backend device: cpu or cuda[:N] (fused Triton kernels on CUDA).")(f)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(f)


def show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def _jsonable(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def save_latents(path, latents) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({"latents": latents.contiguous()}))


def check_choice(value, choices, what):
    if value not in choices:
        raise TopiError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")
