"""Runnable example command lines, shown at the end of every command's ``--help``.

They live in one table so a test can parse each one against its command (options that
exist, values in range, names in the registries) and they cannot rot.
"""

from __future__ import annotations

EXAMPLES: dict[str, tuple[str, ...]] = {
    "train": (
        "mudsc train -o runs/a --dataset fashion-mnist --arch resnet20 --task 0,1,2,3,4",
        "mudsc train -o runs/b --dataset fashion-mnist --split 5+5 --task-index 1 --epochs 20",
    ),
    "eval": (
        "mudsc eval runs/merged",
        "mudsc eval runs/a runs/b --tasks '0,1,2,3,4;5,6,7,8,9' --json",
    ),
    "spec": (
        "mudsc spec --arch resnet20 --arch-args '{\"width\": 2}'",
        "mudsc spec runs/a --json",
    ),
    "demo": ("mudsc demo", "mudsc demo --json"),
    "merge": (
        "mudsc merge runs/a runs/b -o runs/merged --method mudsc-zip --alpha auto",
        "mudsc merge runs/a runs/b -o runs/zipit --method zipit --calibration-size 500 --json",
    ),
    "experiment": (
        "mudsc experiment configs/smoke-embedded.yaml -o runs/smoke",
        "mudsc experiment configs/fmnist-5+5-resnet20x4.yaml --dry-run --json",
    ),
    "landscape": (
        "mudsc landscape runs/a runs/b -o landscape.png --resolution 15",
        "mudsc landscape runs/a runs/b --methods zipit,mudsc-zip --json",
    ),
    "diagnose": (
        "mudsc diagnose runs/a runs/b -o diagnose.png",
        "mudsc diagnose runs/a runs/b --methods zipit,mudsc-zip --json",
    ),
    "interpolate": (
        "mudsc interpolate runs/a runs/b --method mudsc-zip --steps 21",
        "mudsc interpolate runs/a runs/b -o path.png --json",
    ),
}


def epilog(command: str) -> str:
    """The ``--help`` epilog of ``command``: its examples, one paragraph each."""
    return "\n\n".join(("Examples:", *EXAMPLES[command]))
