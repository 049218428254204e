"""Reduced-precision statistics check: merged accuracy with --precision bf16 / tf32 against
float32 on a Fashion-MNIST pair (issue 11: within 0.5 point of float32).

Two sources trained on classes 0-4 and 5-9 (``--sources A B``, or trained here with
``mudsc train``), merged by each method once per precision on the same calibration draw,
each merged model scored on the test set (average per-task accuracy).  Prints a table and
writes JSON.

    python bench/precision.py --device cuda --precisions fp32,bf16,tf32   # the GPU check
    python bench/precision.py --precisions fp32,bf16 --epochs 1 --arch-args '{"hidden": 64}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
TOLERANCE = 0.5  # accuracy points


def train_sources(args: argparse.Namespace, out: Path) -> list[Path]:
    """Two sources (classes 0-4 and 5-9) trained with the CLI."""
    paths = []
    for name, task, seed in (("a", "0,1,2,3,4", 0), ("b", "5,6,7,8,9", 1)):
        path = out / name
        if not path.exists():
            cmd = [sys.executable, "-m", "mudsc", "train", "-o", str(path), "--dataset",
                   "fashion-mnist", "--task", task, "--seed", str(seed), "--arch", args.arch,
                   "--arch-args", args.arch_args, "--epochs", str(args.epochs),
                   "--device", args.device]  # fmt: skip
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": SRC})
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> dict:
    from mudsc.checkpoint import load_checkpoint
    from mudsc.data import draw_calibration, load_dataset
    from mudsc.evaluate import evaluate
    from mudsc.merge import MergeConfig, merge_models

    dev = torch.device(args.device)
    work = Path(args.work)
    paths = [Path(p) for p in args.sources] if args.sources else train_sources(args, work)
    loaded = [load_checkpoint(p, dev) for p in paths]
    tasks = [t for ck in loaded for t in ck.tasks]
    data = load_dataset("fashion-mnist", args.data_dir)
    classes = sorted({c for t in tasks for c in t})
    calib = draw_calibration(data, classes, args.calibration, args.batch, 0, dev).batches
    images, labels = data.normalize(data.test_images), data.test_labels
    rows = []
    for method in args.methods.split(","):
        for precision in args.precisions.split(","):
            cfg = MergeConfig(method=method, precision=precision, device=str(dev))
            start = time.perf_counter()
            result = merge_models([ck.model for ck in loaded], calib, cfg)
            seconds = time.perf_counter() - start
            acc = evaluate(result.model, images, labels, tasks, loaded[0].head, dev).avg
            rows.append({"method": method, "precision": precision, "accuracy": 100 * acc,
                         "statistics_s": result.timings.get("statistics", 0.0),
                         "total_s": seconds})  # fmt: skip
    base = {r["method"]: r["accuracy"] for r in rows if r["precision"] == "fp32"}
    for r in rows:
        r["delta"] = r["accuracy"] - base[r["method"]] if r["method"] in base else None
        r["within"] = r["delta"] is not None and abs(r["delta"]) <= TOLERANCE
    return {"meta": _meta(args, paths), "rows": rows}


def _meta(args: argparse.Namespace, paths: list[Path]) -> dict:
    return {"machine": platform.processor() or platform.machine(), "device": args.device,
            "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "sources": [str(p) for p in paths], "calibration": args.calibration,
            "batch": args.batch, "tolerance_points": TOLERANCE,
            "command": " ".join(sys.argv)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sources", nargs=2, help="two source checkpoints (else trained)")
    parser.add_argument("--work", default="bench/results/precision-sources")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--arch-args", default='{"width": 4}')
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--methods", default="zipit,mudsc-zip")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calibration", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--out", default="bench/results/precision.json")
    args = parser.parse_args()
    table = run(args)
    print(f"{'method':<12} {'precision':<9} {'accuracy %':>10} {'delta':>7} {'stats s':>8} "
          f"{'total s':>8}  within {TOLERANCE} pt")  # fmt: skip
    for r in table["rows"]:
        delta = "" if r["delta"] is None else f"{r['delta']:+.2f}"
        print(f"{r['method']:<12} {r['precision']:<9} {r['accuracy']:>10.2f} {delta:>7} "
              f"{r['statistics_s']:>8.2f} {r['total_s']:>8.2f}  {r['within']}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
