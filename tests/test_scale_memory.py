"""Issue 11, memory and precision: the estimate and `mudsc merge --dry-run`, the refusal of
a merge that would not fit, bounded sweep caches, and the opt-in reduced precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_helpers import flat, invoke
from torch import nn

import mudsc.cache
import mudsc.estimate
from mudsc.errors import ConfigError, ResourceError
from mudsc.estimate import plan_merge
from mudsc.memory import available_bytes
from mudsc.merge import MergeConfig, merge_models
from mudsc.precision import forward_precision, full_precision
from mudsc.stages import activation_similarities
from mudsc.stats import collect_moments

SRC = str(Path(__file__).resolve().parents[1] / "src")


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    ).eval()  # fmt: skip


def batches(n: int = 256, size: int = 64) -> list[torch.Tensor]:
    return list(torch.randn(n, 32, generator=torch.Generator().manual_seed(0)).split(size))


# --- the estimate -------------------------------------------------------------------------


def test_estimate_lists_spaces_memory_and_passes() -> None:
    cfg = MergeConfig(method="mudsc-zip", alpha="auto", alpha_grid=(0.3, 0.7))
    est = plan_merge([mlp(24, 1), mlp(24, 2), mlp(24, 3)], batches(), cfg)
    assert [(s.size, s.stacked, s.observed) for s in est.spaces] == [(24, 72, True)] * 2
    assert est.spaces[0].matrix_bytes == 72 * 72 * 8
    assert {"statistics", "similarity", "solve", "sweeps", "apply", "repair"} <= set(est.stages)
    assert est.peak_bytes == max(est.stages.values()) > 2 * 72 * 72 * 8
    # 3 models once over the fit set; REPAIR (no BatchNorm): 3 sources + the merged model,
    # per alpha candidate on 1 of the 4 batches, then the winner on all of them (4 x 1.5);
    # scoring: merged + 3 sources per candidate
    assert est.passes == {"statistics": 3, "repair (repair)": 6, "alpha scoring": 8}
    assert json.dumps(est.to_dict())
    every = plan_merge([mlp(24, 1), mlp(24, 2)], batches(), replace(cfg, alpha_repair_batches=0))
    assert every.passes["repair (repair)"] == 3 * 2  # each candidate repaired on every batch


SCRIPT = """
import json, resource, sys
import torch
from torch import nn
from mudsc.estimate import plan_merge
from mudsc.merge import MergeConfig, merge_models

def mlp(width, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10)).eval()

width, method = int(sys.argv[1]), sys.argv[2]
x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
cfg = MergeConfig(method=method, alpha=0.5, max_sweeps=1)
merge_models([mlp(16, 1), mlp(16, 2)], list(x[:64].split(32)), cfg)  # imports, allocator
models, data = [mlp(width, 1), mlp(width, 2)], list(x.split(128))
estimate = plan_merge(models, data, cfg).peak_bytes
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * resource.getpagesize()
merge_models(models, data, cfg)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": peak - before, "estimated": estimate}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(("width", "method"), [(1024, "zipit"), (768, "mudsc-zip")])
def test_estimate_is_within_2x_of_the_measured_peak(width: int, method: str) -> None:
    """Peak resident memory of the merge (its own process; ru_maxrss above the resident
    size before it) against the estimate; wide enough that (N*n)^2 terms dominate."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(width), method], env=env,
                         capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    row = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = row["estimated"] / row["measured"]
    assert 0.5 <= ratio <= 2.0, row


def test_a_merge_that_would_not_fit_is_refused_before_any_pass(monkeypatch) -> None:
    monkeypatch.setattr(mudsc.estimate, "available_bytes", lambda device: 1000)
    with pytest.raises(ResourceError, match="--no-memory-check") as err:
        merge_models([mlp(8, 1), mlp(8, 2)], batches(), MergeConfig(method="zipit"))
    assert "\n" not in str(err.value)
    assert "1.0 KiB free" in str(err.value) and "KiB more memory" in str(err.value)
    cfg = MergeConfig(method="zipit", memory_check=False)
    assert merge_models([mlp(8, 1), mlp(8, 2)], batches(), cfg).model is not None


def test_free_memory_is_known_on_cpu() -> None:
    free = available_bytes("cpu")
    assert free is None or free > 0


def test_dry_run_reports_and_writes_nothing(
    runs: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "never"
    result = invoke("merge", runs["a"], runs["b"], "--method", "mudsc-zip", "--dry-run",
                    "--data-dir", data_dir, "--calibration-size", "100", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "dryrun:mudsc-zip,2models" in text and "peak" in text
    assert "forwardpasses" in text and "statistics2" in text
    assert not out.exists()


# --- memory of the pipeline ------------------------------------------------------------------


def test_activation_similarities_free_the_moments_as_they_go() -> None:
    models = [mlp(8, 1), mlp(8, 2)]
    from mudsc.spaces import trace_model

    spec = trace_model(models[0], batches()[0][:2]).spec
    moments = collect_moments(models, spec, batches())
    names = list(moments)
    sims = activation_similarities(moments)
    assert list(sims) == names and not moments


def test_bounded_sweep_caches_change_nothing(monkeypatch) -> None:
    """A cache miss recomputes the same value: a tiny budget gives the same merge."""
    cfg = MergeConfig(method="mudsc-zip", max_sweeps=4)
    models, data = [mlp(12, 1), mlp(12, 2)], batches()
    free = merge_models(models, data, cfg)
    monkeypatch.setattr(mudsc.cache, "CACHE_SHARE", 1e-12)
    tight = merge_models(models, data, cfg)
    assert tight.sweeps == free.sweeps
    for key, value in free.model.state_dict().items():
        assert torch.equal(value, tight.model.state_dict()[key]), key


# --- precision -----------------------------------------------------------------------------


def test_precision_defaults_to_fp32_and_is_in_the_card() -> None:
    models, data = [mlp(12, 1), mlp(12, 2)], batches()
    default = merge_models(models, data, MergeConfig(method="zipit"))
    explicit = merge_models(models, data, MergeConfig(method="zipit", precision="fp32"))
    assert default.config.precision == "fp32" and default.card()["config"]["precision"] == "fp32"
    for key, value in default.model.state_dict().items():
        assert torch.equal(value, explicit.model.state_dict()[key]), key
    bf16 = merge_models(models, data, MergeConfig(method="zipit", precision="bf16"))
    assert bf16.card()["config"]["precision"] == "bf16"


def test_bf16_statistics_still_recover_a_permuted_copy() -> None:
    model = mlp(16, 1)
    twin = mlp(16, 1)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        twin[0].weight.copy_(model[0].weight[perm])
        twin[0].bias.copy_(model[0].bias[perm])
        twin[2].weight.copy_(model[2].weight[:, perm])
    cfg = MergeConfig(method="act-align", precision="bf16", repair="none")
    result = merge_models([model, twin], batches(), cfg)
    for key, value in model.state_dict().items():
        assert torch.allclose(result.model.state_dict()[key], value, atol=1e-6), key


def test_tf32_is_refused_off_cuda_and_restores_flags() -> None:
    with pytest.raises(ConfigError, match="tf32"):
        MergeConfig(precision="tf32")
    with pytest.raises(ConfigError, match="unknown precision"):
        MergeConfig(precision="fp8")
    saved = torch.backends.cuda.matmul.allow_tf32
    with forward_precision("tf32", "cuda"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == saved


def test_moment_products_leave_autocast() -> None:
    a = torch.randn(8, 8)
    with forward_precision("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
        with full_precision(torch.device("cpu")):
            assert (a @ a).dtype == torch.float32
