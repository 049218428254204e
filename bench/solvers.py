"""Time the solvers on synthetic activation similarities; print a table, write JSON.

    PYTHONPATH=src python bench/solvers.py [--out bench/results/solvers.json]
        [--sizes 128 512 1024 2048] [--models 2] [--groups 8] [--repeats 3]

Every registered solver that reads a similarity is timed ungrouped and with ``--groups``
blocks, at its declared parameters (plus the extra settings in ``VARIANTS``).  The
similarity is the Pearson correlation of synthetic features: every model's units are
noisy copies of model 0's units in a random order, as for networks trained alike.  Each
solver is timed on the whole call (input checks included); the best of ``--repeats`` is
reported, with the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mudsc.solvers import SOLVERS, Solver

VARIANTS = {"zip": [{"zip_a": 1e-4, "zip_b": 0.075}]}
"""Parameter settings timed besides the declared defaults."""


def similarity(total: int, n_models: int, seed: int, device: str) -> torch.Tensor:
    """Correlation of N models' features, model i a shuffled noisy copy of model 0."""
    gen = torch.Generator().manual_seed(seed)
    n = total // n_models
    base = torch.randn(n, 256, generator=gen, dtype=torch.float64)
    feats = [base] + [
        base[torch.randperm(n, generator=gen)] + torch.randn(n, 256, generator=gen)
        for _ in range(n_models - 1)
    ]
    x = torch.cat(feats)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True)
    return (x @ x.T).to(device)


def cases(sim: torch.Tensor, n_models: int, groups: int) -> dict[str, Callable[[], object]]:
    """Label -> call, for every registered solver that reads a similarity."""
    out: dict[str, Callable[[], object]] = {}
    for name in SOLVERS.names():
        solver = SOLVERS[name]
        if not solver.needs_similarity:
            continue
        defaults = {p.name: p.default for p in solver.params}
        for params in [defaults, *VARIANTS.get(name, [])]:
            label = name + (
                f"({','.join(f'{k}={v:g}' for k, v in params.items())})" if params else ""
            )
            out[label] = _call(solver, sim, n_models, 1, params)
        out[f"{name}(G={groups})"] = _call(solver, sim, n_models, groups, defaults)
    return out


def _call(
    solver: Solver, sim: torch.Tensor, n_models: int, groups: int, params: dict[str, float]
) -> Callable[[], object]:
    return lambda: solver.solve(sim, n_models, groups=groups, **params)


def best_of(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) wall time in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/solvers.json"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    rows = []
    for total in args.sizes:
        sim = similarity(total, args.models, seed=0, device=args.device)
        for name, run in cases(sim, args.models, args.groups).items():
            run()  # warm-up
            best, median = best_of(run, args.repeats)
            rows.append({"units": total, "solver": name, "best_s": best, "median_s": median})
            print(f"{total:>6}  {name:<24} best {best:8.4f} s   median {median:8.4f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "models": args.models,
        "groups": args.groups,
        "repeats": args.repeats,
        "device": args.device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
