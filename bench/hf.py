"""Hugging Face benchmark: trace time by route, merge time per stage and peak memory for a
BERT-base-sized classifier and a ViT-B/16-sized image classifier (random init, CPU).

Each case runs in a fresh subprocess so that its peak resident memory is its own (it
includes the two source models, built before the clock starts).  Trace cases time
``trace_model`` with its numeric self-check on two examples, by the torch.fx route (which
may fail or see nothing on these models) and the torch.export route.  Merge cases time
``merge_models`` end to end (its own trace included) on 32 calibration examples in batches
of 16; mudsc-zip runs at most 3 weight sweeps (``--max-sweeps``) to keep a case in minutes.

    python bench/hf.py                 # BERT-base and ViT-B/16 sizes, ~25 min on 2 cores;
                                      # zipit needs ~15 GB, mudsc-zip more than 20 GB
    python bench/hf.py --quick         # tiny sizes, a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
MODELS = ("bert", "vit")
CASES = ("trace:fx", "trace:export", "avg", "zipit", "mudsc-zip")
FULL = {
    "bert": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 128},
    "vit": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "image_size": 224, "patch_size": 16},
}  # fmt: skip
QUICK = {
    "bert": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 32},
    "vit": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "image_size": 32, "patch_size": 8},
}  # fmt: skip


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(model: str, quick: bool, seed: int) -> torch.nn.Module:
    import transformers

    sizes = (QUICK if quick else FULL)[model]
    torch.manual_seed(seed)
    if model == "bert":
        config = transformers.BertConfig(num_labels=2, **sizes)
        return transformers.BertForSequenceClassification(config).eval()
    config = transformers.ViTConfig(num_labels=10, **sizes)
    return transformers.ViTForImageClassification(config).eval()


def _inputs(model: str, quick: bool, count: int, gen: torch.Generator) -> torch.Tensor:
    sizes = (QUICK if quick else FULL)[model]
    if model == "bert":
        shape = (count, sizes["max_position_embeddings"])
        return torch.randint(0, sizes["vocab_size"], shape, generator=gen)
    side = sizes["image_size"]
    return torch.randn(count, 3, side, side, generator=gen)


def run_trace(model_key: str, route: str, quick: bool) -> dict[str, Any]:
    """Time one capture route on one model; a route that fails is a row with its error."""
    from mudsc.spaces import trace_model

    model = _build(model_key, quick, seed=1)
    x = _inputs(model_key, quick, 2, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    try:
        traced = trace_model(model, x, route=route)  # type: ignore[arg-type]
    except Exception as error:  # noqa: BLE001 - a failing route is a result, not a crash
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return {"error": first[:160], "total_s": time.perf_counter() - start}
    total = time.perf_counter() - start
    return {
        "total_s": total,
        "route": traced.route,
        "mergeable_spaces": len(traced.spec.mergeable),
        "warnings": len(traced.spec.warnings),
    }


def run_merge(model_key: str, method: str, quick: bool, args: argparse.Namespace) -> dict:
    """Time one merge of two random inits, stage by stage."""
    from mudsc.merge import MergeConfig, merge_models

    models = [_build(model_key, quick, seed) for seed in (1, 2)]
    gen = torch.Generator().manual_seed(0)
    data = _inputs(model_key, quick, args.examples, gen)
    batches = list(data.split(args.batch))
    rss_models = _rss_mib()
    cfg = MergeConfig(method=method, alpha=0.5, max_sweeps=args.max_sweeps)
    start = time.perf_counter()
    result = merge_models(models, batches, cfg)
    total = time.perf_counter() - start
    return {
        "total_s": total,
        "stages": result.timings,
        "sweeps": result.sweeps,
        "max_sweeps": args.max_sweeps,
        "rss_models_mib": rss_models,
    }


def run_one(model_key: str, case: str, quick: bool, args: argparse.Namespace) -> dict:
    sys.path.insert(0, SRC)
    if case.startswith("trace:"):
        row = run_trace(model_key, case.split(":")[1], quick)
    else:
        row = run_merge(model_key, case, quick, args)
    params = sum(p.numel() for p in _build(model_key, quick, seed=0).parameters())
    return {"model": model_key, "case": case, "params_m": params / 1e6, **row,
            "peak_mib": _rss_mib()}  # fmt: skip


def _line(row: dict) -> str:
    head = f"{row['model']:<5} {row['case']:<13}"
    if "error" in row:
        return f"{head} FAILED after {row['total_s']:.1f} s: {row['error']}"
    st = row.get("stages", {})
    detail = (
        f"route {row['route']}, {row['mergeable_spaces']} spaces, {row['warnings']} warnings"
        if "route" in row
        else f"sweeps {row['sweeps']}"
    )
    stages = " ".join(
        f"{st.get(k, 0):7.1f}"
        for k in ("trace", "statistics", "solve", "sweeps", "apply", "repair")
    )
    return f"{head} {row['total_s']:8.1f} {stages} {row['peak_mib']:9.0f}  {detail}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-sweeps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per case")
    parser.add_argument("--out", default="bench/results/hf.json")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        sys.stdout.write(json.dumps(run_one(a.one[0], a.one[1], a.quick, a)) + "\n")
        return
    print(
        f"{'model':<5} {'case':<13} {'total s':>8} {'trace':>7} {'stats':>7} {'solve':>7} "
        f"{'sweeps':>7} {'apply':>7} {'repair':>7} {'peak MiB':>9}"
    )
    rows = []
    for model in a.models.split(","):
        for case in a.cases.split(","):
            cmd = [sys.executable, __file__, "--one", model, case, "--examples", str(a.examples),
                   "--batch", str(a.batch), "--max-sweeps", str(a.max_sweeps)]  # fmt: skip
            cmd += ["--quick"] if a.quick else []
            try:
                out = subprocess.run(
                    cmd, capture_output=True, text=True, check=False, timeout=a.timeout
                )
            except subprocess.TimeoutExpired:
                print(f"{model:<5} {case:<13} TIMED OUT after {a.timeout:.0f} s", flush=True)
                continue
            if out.returncode != 0:
                print(f"{model:<5} {case:<13} CRASHED: {out.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(_line(row), flush=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": a.quick,
        "examples": a.examples,
        "batch": a.batch,
        "max_sweeps_mudsc_zip": a.max_sweeps,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
