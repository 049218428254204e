"""Benchmark: train ResNet-20 on a Fashion-MNIST task, then time inference and score it.

Uses the real data (``/usr/share/datasets/fashion-mnist`` or ``--data-dir``), the paper's
recipe apart from the epoch count (SGD 0.9, wd 5e-4, batch 500, peak lr 0.4, warm-up then
linear decay, crop + flip) and ``mudsc.train`` / ``mudsc.evaluate`` exactly as the CLI
calls them. Prints a table and writes JSON.

    PYTHONPATH=src python bench/train.py --epochs 2 --out bench/results/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from mudsc.data import load_dataset, parse_classes
from mudsc.evaluate import evaluate
from mudsc.models.head import ClassEmbeddingHead
from mudsc.train import TrainConfig, train, train_config_dict


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def inference_rate(
    model: torch.nn.Module, images: torch.Tensor, batch: int, device: torch.device
) -> float:
    """Images per second of a forward pass (no grad, eval mode), after one warm-up batch."""
    model.eval()
    with torch.no_grad():
        model(images[:batch].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            model(images[i : i + batch].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--task", default="0,1,2,3,4", help="class ids of the task")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine(device)
    data = load_dataset("fashion-mnist", args.data_dir)
    classes = parse_classes(args.task)
    head = ClassEmbeddingHead.orthonormal(data.num_classes, 512, seed=0)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
    )
    result = train(
        "resnet20",
        data,
        classes,
        head,
        config,
        {"width": args.width},
        device,
        progress=lambda stage, done, total, info="": print(
            f"  {stage} epoch {done}/{total}: {info}", flush=True
        ),
    )
    test_images, test_labels = data.subset(classes, "test")
    test_images = data.normalize(test_images)
    report = evaluate(result.model, test_images, test_labels, [classes], head, device)
    rate = inference_rate(result.model, test_images, args.batch_size, device)
    n_train = len(data.subset(classes, "train")[0])

    row = {
        "model": f"resnet20x{args.width:g}",
        "task": classes,
        "epochs": args.epochs,
        "images": n_train * args.epochs,
        "train_seconds": result.seconds,
        "train_images_per_second": result.images_per_second,
        "final_train_accuracy": result.history[-1]["accuracy"],
        "test_accuracy": report.avg,
        "test_images": report.n_images,
        "inference_images_per_second": rate,
    }
    info["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = ["model", "epochs", "images", "train s", "train img/s", "test acc", "infer img/s"]
    cells = [
        row["model"],
        str(row["epochs"]),
        str(row["images"]),
        f"{row['train_seconds']:.1f}",
        f"{row['train_images_per_second']:.0f}",
        f"{100 * row['test_accuracy']:.2f}%",
        f"{row['inference_images_per_second']:.0f}",
    ]
    widths = [max(len(h), len(c)) for h, c in zip(header, cells, strict=True)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    print(" | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    print(f"device {device}; {info}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "train",
        "rows": [row],
        "config": train_config_dict(config),
        "device": str(device),
        "machine": info,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
