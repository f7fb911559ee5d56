"""The ``topi-export`` command line. Subcommands live in ``topi_export/commands/<name>.py`` (each defines
``cmd``) and are imported only when invoked, so ``--help`` stays fast and works without heavy backends."""
from __future__ import annotations

import importlib
import sys

import click

COMMANDS = {
    "run": "Run a ToPi-pruned in-context generation (PyTorch reference or built engines).",
    "calibrate": "Measure per-layer context sensitivity; write a calibration profile.",
    "build": "Export the topi (+ dense baseline) ONNX graphs and build engines per shape and ratio bucket.",
    "check": "Compare built engines against the PyTorch reference, per graph and bucket.",
    "bench": "Benchmark speed and fidelity per ratio bucket and selection policy.",
    "triton": "Write a Triton Inference Server model repository from an engine directory.",
    "edit": "Edit reference image(s) with a prompt: the family's diffusers pipeline with the ToPi transformer.",
    "encode": "Write an inputs file (latents, prompt embeddings) from images and a prompt, through the pipeline.",
    "refit": "Write an engine directory with other LoRA adapters fused in, without re-exporting.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        try:
            module = importlib.import_module(f"topi_export.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("topi_export.commands"):
                return None
            raise
        return module.cmd

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, help_ in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="topi-export")
def cli():
    """topi-export: compile in-context DiTs (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit) with ToPi context-token pruning.

    Typical flow: calibrate (optional) -> build -> run --engine-dir ... --compare -> triton.
    """


def main(argv=None):
    from topi_export.errors import TopiError

    try:
        cli.main(args=argv, prog_name="topi-export", standalone_mode=False)
    except TopiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.UsageError as exc:  # one line, like every other error
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    sys.exit(0)


if __name__ == "__main__":
    main()
