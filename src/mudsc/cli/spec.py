"""``mudsc spec``: the merge spaces that tracing finds in a checkpoint or a zoo model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer

from mudsc.cli.common import console, friendly, parse_arch_args
from mudsc.errors import CheckpointError, ConfigError
from mudsc.inputs import existing_directory


@friendly
def spec_command(
    checkpoint: Path = typer.Argument(None, help="A checkpoint directory."),
    arch: str = typer.Option(None, help="Trace a zoo architecture instead of a checkpoint."),
    arch_args: str = typer.Option(None, help="Architecture arguments as JSON."),
    in_channels: int = typer.Option(3, min=1, max=64, help="Input channels of --arch."),
    image_size: int = typer.Option(32, min=1, max=1024, help="Input height and width of --arch."),
    list_archs: bool = typer.Option(False, "--list", help="List the zoo's architectures."),
    as_json: bool = typer.Option(False, "--json", help="Print the spec itself as JSON."),
    full: bool = typer.Option(False, "--full", help="List every member module."),
) -> None:
    """Print the merge spaces that tracing finds in a model."""
    from mudsc.models import create, names
    from mudsc.spaces import trace

    if list_archs:
        console.print("\n".join(names()))
        return
    if (checkpoint is None) == (arch is None):
        raise ConfigError("give a checkpoint or --arch NAME (one of them)")
    if checkpoint is not None:
        from mudsc.checkpoint import load_checkpoint

        model = load_checkpoint(existing_directory(checkpoint, "checkpoint", CheckpointError)).model
        in_channels = model.config.get("in_channels", in_channels)
        image_size = model.config.get("image_size", image_size)
    else:
        model = create(
            arch, in_channels=in_channels, image_size=image_size, **parse_arch_args(arch_args)
        )
    merge_spec = trace(model.eval(), torch.zeros(2, in_channels, image_size, image_size))
    if as_json:
        sys.stdout.write(merge_spec.to_json() + "\n")
    else:
        console.print(merge_spec.describe(full), highlight=False, soft_wrap=True)
