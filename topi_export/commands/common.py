"""Options and helpers shared by several subcommands (one definition, same flag names everywhere)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from topi_export.errors import TopiError
from topi_export.fsutil import atomic_write_bytes  # noqa: F401  (re-exported for commands)


def model_option(f):
    return click.option("--model", default=None, metavar="NAME|PATH",
                        help="Built-in model (kontext-digits, tiny-kontext, mid-kontext) or a local diffusers folder (transformer or pipeline). "
                             "Default: the embedded model.")(f)


def steps_option(f):
    return click.option("--steps", "--denoising-steps", "steps", type=int, default=28, show_default=True,
                        help="Denoising steps.")(f)


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
