"""Benchmark: time to derive merge spaces with ``mudsc.spaces.trace``.

Times tracing alone (fx trace + shape run + rules + spec build) and with the numeric
self-check (``verify=True``, the default: a float64 copy is permuted and compared), for
ResNet-50 at several widths and two ViT sizes, by the torch.fx route (default) or the
torch.export route (``--route export``).  Prints a table and writes JSON.

    PYTHONPATH=src python bench/trace.py --out bench/results/trace.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mudsc.models import create
from mudsc.spaces import trace

CASES = [
    ("resnet50", {"width": 0.5}),
    ("resnet50", {"width": 1.0}),
    ("resnet50", {"width": 2.0}),
    ("vit", {}),
    ("vit", {"dim": 384, "depth": 12, "heads": 6}),
]


def _time(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/trace.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--route", choices=("fx", "export", "auto"), default="fx")
    args = parser.parse_args()

    rows = []
    for name, cfg in CASES:
        model = create(name, in_channels=3, image_size=args.image_size, embed_dim=512, **cfg)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        spec = trace(model, x, route=args.route)
        rows.append(
            {
                "model": name,
                "config": cfg,
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "fx_nodes": len(torch.fx.symbolic_trace(model).graph.nodes),
                "spaces": len(spec.spaces),
                "mergeable": len(spec.mergeable),
                "warnings": len(spec.warnings),
                "route": args.route,
                "trace_s": _time(
                    lambda m=model, x=x: trace(m, x, verify=False, route=args.route), args.repeats
                ),
                "trace_verify_s": _time(
                    lambda m=model, x=x: trace(m, x, route=args.route), args.repeats
                ),
            }
        )
    header = f"{'model':<10} {'config':<36} {'params(M)':>9} {'nodes':>6} {'spaces':>7} "
    header += f"{'free':>5} {'trace(s)':>9} {'+verify(s)':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<10} {json.dumps(r['config']):<36} {r['params_m']:>9.2f} "
            f"{r['fx_nodes']:>6} {r['spaces']:>7} {r['mergeable']:>5} {r['trace_s']:>9.3f} "
            f"{r['trace_verify_s']:>11.3f}"
        )
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "batch": args.batch,
        "repeats": args.repeats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
