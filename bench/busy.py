"""Merge on a busy machine: one merge, idle and under a synthetic load, per thread policy.

The load is ``--load-procs`` Python processes, each busy ``--duty`` of the time (spinning
in short slices with sleeps between), e.g. 2 x 65 % of a 2-core machine.  Each policy
runs the same merge in a fresh process:

* ``old``: torch's defaults (one thread per core, libgomp spinning at barriers);
* ``new``: ``mudsc.threads``: a short OpenMP spin (GOMP_SPINCOUNT) set before torch loads, and
  the intra-op thread count from the process's affinity (or MUDSC_THREADS);
* ``one``: the new policy with MUDSC_THREADS=1 (what a user can choose on a loaded box);
* ``passive``, ``spin10k``: the new policy with OMP_WAIT_POLICY=PASSIVE (no spinning) or
  GOMP_SPINCOUNT=10000 instead of its 1,000.

    python bench/busy.py                                 # resnet20x4, wzip, all policies
    python bench/busy.py --arch resnet20x1 --method zipit --duty 0.75
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
STAGES = ("trace", "statistics", "solve", "sweeps", "apply", "repair")
POLICIES = {
    "old": {},
    "new": {},
    "one": {"MUDSC_THREADS": "1"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
}
_OMP_VARIABLES = (
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "OMP_NUM_THREADS",
    "MUDSC_THREADS",
)


def spin(duty: float, kind: str, period: float = 0.01) -> None:
    """Busy ``duty`` of every ``period`` seconds, forever (a load generator process):
    a Python loop (``spin``), or small multi-threaded torch matmuls (``torch``: another
    torch job with default threads, as on a shared development machine)."""
    step = _torch_step() if kind == "torch" else (lambda: None)
    while True:
        end = time.perf_counter() + duty * period
        while time.perf_counter() < end:
            step()
        time.sleep((1 - duty) * period)


def _torch_step() -> Callable[[], object]:
    import torch

    x = torch.randn(96, 96)
    return lambda: torch.mm(x, x)


def run_one(policy: str, arch: str, method: str, images: int, batch: int) -> dict:
    """One merge in this process under ``policy``; returns its stage timings."""
    sys.path.insert(0, SRC)
    if policy != "old":
        from mudsc.threads import prepare_environment

        prepare_environment()
    import torch

    if policy != "old":
        from mudsc.threads import configure_threads

        configure_threads()
    from mudsc.merge import MergeConfig, merge_models
    from mudsc.models import create

    width = int(arch.removeprefix("resnet20x"))
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(create("resnet20", in_channels=1, image_size=28, width=width).eval())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, 1, 28, 28, generator=gen) for _ in range(images // batch)]
    start = time.perf_counter()
    result = merge_models(models, batches, MergeConfig(method=method, alpha=0.5))
    total = time.perf_counter() - start
    return {
        "policy": policy,
        "threads": torch.get_num_threads(),
        "total_s": total,
        "stages": {k: result.timings.get(k, 0.0) for k in STAGES},
    }


def measure(policy: str, a: argparse.Namespace, loaded: bool) -> dict:
    """Run one policy in a fresh process, with the load running when ``loaded``."""
    env = {k: v for k, v in os.environ.items() if k not in _OMP_VARIABLES}
    env.update(POLICIES[policy])
    cmd = [
        sys.executable,
        __file__,
        "--one",
        policy,
        "--arch",
        a.arch,
        "--method",
        a.method,
        "--images",
        str(a.images),
        "--batch",
        str(a.batch),
    ]
    load = []
    if loaded:
        load = [
            multiprocessing.Process(target=spin, args=(a.duty, a.load_kind), daemon=True)
            for _ in range(a.load_procs)
        ]
        for p in load:
            p.start()
        time.sleep(1.0)
    before = os.getloadavg()[0]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    finally:
        for p in load:
            p.terminate()
            p.join()
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(loaded=loaded, load_before=before, load_after=os.getloadavg()[0])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--arch", default="resnet20x4")
    parser.add_argument("--method", default="wzip")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--load-procs", type=int, default=2)
    parser.add_argument("--duty", type=float, default=0.65)
    parser.add_argument("--load-kind", choices=["spin", "torch"], default="torch")
    parser.add_argument("--out", default="bench/results/busy.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        row = run_one(a.one, a.arch, a.method, a.images, a.batch)
        sys.stdout.write(json.dumps(row) + "\n")
        return
    print(
        f"{'policy':<7} {'load':<16} {'thr':>3} {'total s':>8} "
        + " ".join(f"{s:>10}" for s in STAGES)
        + "  loadavg"
    )
    rows = []
    for policy in a.policies.split(","):
        for loaded in (False, True):
            row = measure(policy, a, loaded)
            rows.append(row)
            label = f"{a.load_procs}x{a.duty:.0%} {a.load_kind}" if loaded else "idle"
            print(
                f"{policy:<7} {label:<16} {row['threads']:>3} {row['total_s']:8.2f} "
                + " ".join(f"{row['stages'][s]:10.2f}" for s in STAGES)
                + f"  {row['load_before']:.1f}-{row['load_after']:.1f}",
                flush=True,
            )
    meta = {
        "machine": platform.processor() or platform.machine(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "arch": a.arch,
        "method": a.method,
        "images": a.images,
        "load_procs": a.load_procs,
        "duty": a.duty,
        "load_kind": a.load_kind,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
