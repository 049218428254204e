"""Merge benchmark: time per stage and peak memory, every method, several architectures.

Each (architecture, method) runs in a fresh subprocess so that its peak resident memory is
its own.  The "forward floor" is what a method cannot avoid: the plain forward passes it
must make (N models over the calibration data for activation methods, the merged model
once more for BatchNorm reset, N + 1 models for REPAIR) plus its assignment solves; the
ratio total / floor says how much overhead the engine adds.

    python bench/merge.py                       # ResNet-20 x1/x4/x8 and the ViT, all methods
    python bench/merge.py --archs resnet20x8 --methods mudsc-zip --device cuda

Each merge runs under ``mudsc.threads``' policy (short OpenMP spin set before torch
loads, threads from the affinity mask), as the ``mudsc`` command does;
``--threads-policy torch`` keeps torch's defaults.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if "--one" in sys.argv and "torch" not in sys.argv:  # before torch loads its OpenMP runtime
    sys.path.insert(0, SRC)
    from mudsc.threads import prepare_environment

    prepare_environment()

import torch  # noqa: E402

ARCHS = {
    "resnet20x1": ("resnet20", {"width": 1}),
    "resnet20x4": ("resnet20", {"width": 4}),
    "resnet20x8": ("resnet20", {"width": 8}),
    "vit": ("vit", {}),
}
# The authors' implementation on a 2-core machine, 1,000 images of 28x28, two ResNet-20s
# (issue 4): total seconds, and seconds of weight-space matching where they report it.
AUTHORS_TOTAL = {
    ("resnet20x4", "zipit"): 31.5, ("resnet20x8", "zipit"): 101.0,
    ("resnet20x4", "act-align"): 29.9, ("resnet20x8", "act-align"): 99.5,
    ("resnet20x4", "wzip"): 40.4, ("resnet20x8", "wzip"): 167.0,
    ("resnet20x4", "mudsc-align"): 31.2, ("resnet20x8", "mudsc-align"): 122.0,
    ("resnet20x4", "mudsc-zip"): 48.6, ("resnet20x8", "mudsc-zip"): 253.0,
}  # fmt: skip
AUTHORS_MATCHING = {
    ("resnet20x4", "mudsc-zip"): 19.0, ("resnet20x8", "mudsc-zip"): 159.0,
    ("resnet20x4", "wzip"): 32.0, ("resnet20x8", "wzip"): 141.0,
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(arch_key: str, method: str, images: int, batch: int, device: str, dtype: str) -> dict:
    """Time one merge stage by stage; returns a JSON-ready row."""
    sys.path.insert(0, SRC)
    from mudsc.merge import MergeConfig, merge_models
    from mudsc.methods import METHODS
    from mudsc.models import create
    from mudsc.renorm import resolve_mode

    if "torch" not in sys.argv:
        from mudsc.threads import configure_threads

        configure_threads()
    dev = torch.device(device)
    arch, args = ARCHS[arch_key]
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(create(arch, in_channels=1, image_size=28, **args).to(dev).eval())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, 1, 28, 28, generator=gen).to(dev) for _ in range(images // batch)]

    autocast = dtype == "bf16"

    # the engine runs conv nets in channels_last; time the floor in the same layout
    conv = any(isinstance(m, torch.nn.Conv2d) for m in models[0].modules())
    fmt = torch.channels_last if conv else torch.contiguous_format
    floor_model = [copy.deepcopy(models[0]).to(memory_format=fmt)]
    floor_batches = [b.contiguous(memory_format=fmt) for b in batches]

    def forward_floor() -> float:
        _sync(dev)
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
            for x in floor_batches:
                floor_model[0](x)
        _sync(dev)
        return time.perf_counter() - start

    forward_floor()  # warm-up
    one_model = forward_floor()
    cfg = MergeConfig(method=method, alpha=0.5, device=device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(dev)
    start = time.perf_counter()
    with torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
        result = merge_models(models, batches, cfg)
    _sync(dev)
    total = time.perf_counter() - start
    activations = METHODS[method].needs_activations
    mode = resolve_mode("auto", models[0])
    passes = (2 if activations else 0) + {"bn": 1, "repair": 3, "none": 0}[mode]
    floor = passes * one_model + result.timings.get("assignment", 0.0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    matching = result.timings.get("sweeps", 0.0)  # weight similarities + their solves
    theirs, theirs_matching = (
        AUTHORS_TOTAL.get((arch_key, method)),
        AUTHORS_MATCHING.get((arch_key, method)),
    )
    return {
        "arch": arch_key,
        "method": method,
        "images": images,
        "device": device,
        "dtype": dtype,
        "total_s": total,
        "forward_one_model_s": one_model,
        "forward_passes": passes,
        "floor_s": floor,
        "ratio_to_floor": total / floor if floor > 0 else None,
        "stats_over_forward": (
            result.timings.get("statistics", 0.0) / (2 * one_model) if activations else None
        ),
        "stages": result.timings,
        "sweeps": result.sweeps,
        "weight_matching_s": matching,
        "speedup_vs_authors": theirs / total if theirs else None,
        "matching_speedup_vs_authors": theirs_matching / matching if theirs_matching else None,
        "peak_mib": peak,
    }


def main() -> None:
    sys.path.insert(0, SRC)
    from mudsc.methods import method_names

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument(
        "--methods", default=",".join(method_names()), help="default: every registered method"
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument(
        "--threads-policy",
        choices=["mudsc", "torch"],
        default="mudsc",
        help="mudsc.threads' policy (default) or torch's defaults",
    )
    parser.add_argument("--out", default="bench/results/merge.json")
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "METHOD"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        row = run_one(a.one[0], a.one[1], a.images, a.batch, a.device, a.dtype)
        sys.stdout.write(json.dumps(row) + "\n")
        return
    rows = []
    header = (
        f"{'arch':<11} {'method':<12} {'total s':>8} {'floor s':>8} {'ratio':>6} "
        f"{'stats/fw':>8} {'solve':>7} {'sweeps':>7} {'apply':>6} {'repair':>7} {'peak MiB':>9} "
        f"{'x authors':>9} {'match x':>8}"
    )
    print(header)
    for arch in a.archs.split(","):
        for method in a.methods.split(","):
            cmd = [sys.executable, __file__, "--one", arch, method, "--images", str(a.images),
                   "--batch", str(a.batch), "--device", a.device, "--dtype", a.dtype,
                   "--threads-policy", a.threads_policy]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{arch:<11} {method:<12} FAILED: {out.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            st = row["stages"]
            sf = row["stats_over_forward"]
            vs, mvs = row["speedup_vs_authors"], row["matching_speedup_vs_authors"]
            print(
                f"{arch:<11} {method:<12} {row['total_s']:8.2f} {row['floor_s']:8.2f} "
                f"{row['ratio_to_floor'] or 0:6.2f} {'' if sf is None else f'{sf:.2f}':>8} "
                f"{st.get('solve', 0):7.2f} {st.get('sweeps', 0):7.2f} {st.get('apply', 0):6.2f} "
                f"{st.get('repair', 0):7.2f} {row['peak_mib']:9.0f} "
                f"{'' if vs is None else f'{vs:.2f}':>9} {'' if mvs is None else f'{mvs:.1f}':>8}",
                flush=True,
            )
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": a.device,
        "threads_policy": a.threads_policy,
        "gpu": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
