"""The methods of the paper's comparison, one registration each (see README.md)."""

from __future__ import annotations

from mudsc.methods.record import Method
from mudsc.solvers import Registry

XU = "Xu et al., Training-free Pretrained Model Merging (MuDSC), CVPR 2024"

METHODS: Registry[Method] = Registry(
    "method",
    "methods",
    [
        Method("avg", "weight averaging", "the baseline: plain parameter averaging, as in "
               "McMahan et al., FedAvg, AISTATS 2017", None, "identity"),
        Method("rebasin", "Git Re-Basin weight matching",
               "Ainsworth et al., Git Re-Basin, ICLR 2023", "weight-inner", "align"),
        Method("act-align", "activation alignment (Permute)",
               "Entezari et al., The Role of Permutation Invariance, ICLR 2022; Ainsworth et "
               "al., Git Re-Basin, ICLR 2023", "activation", "align"),
        Method("zipit", "ZipIt! activation zip",
               "Stoica et al., ZipIt! Merging Models from Different Tasks without Training, "
               "ICLR 2024", "activation", "zip"),
        Method("wzip", "weight-space zip", XU, "weight", "zip"),
        Method("mudsc-align", "MuDSC alignment", XU, "dual", "align"),
        Method("mudsc-zip", "MuDSC zip", XU, "dual", "zip"),
    ],
)  # fmt: skip


def method_names() -> list[str]:
    return METHODS.names()


def methods_help() -> str:
    """Every registered method with its description, reference and parameters."""
    return "\n".join(METHODS[name].help for name in METHODS)
