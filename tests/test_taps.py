"""``MergeConfig.taps``: a residual stream observed at every consumer or once, where it is
read last (the authors' choice); the statistics pass and the estimate read the same taps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_merge import case
from torch import Tensor, nn

import mudsc.merge
from mudsc.errors import ConfigError
from mudsc.estimate import estimate_merge
from mudsc.merge import MergeConfig, merge_models
from mudsc.models import create
from mudsc.spaces import MergeSpec, trace
from mudsc.spaces.taps import select_taps
from mudsc.stats import collect_moments


def _resnet20() -> tuple[nn.Module, MergeSpec, Tensor]:
    torch.manual_seed(0)
    model = create("resnet20", in_channels=1, image_size=8, embed_dim=6, width=1).eval()
    x = torch.randn(2, 1, 8, 8)
    return model, trace(model, x), x


def _call_order(model: nn.Module, x: Tensor) -> list[str]:
    """Module paths in the order their forward starts."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n))
               for n, m in model.named_modules() if n]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return order


def _seen(model: nn.Module, x: Tensor, outputs: list[str], inputs: list[str]) -> dict[str, Tensor]:
    """The output of each module of ``outputs`` and the input of each of ``inputs``."""
    seen: dict[str, Tensor] = {}

    def keep(name: str, value: Tensor) -> None:
        seen[name] = value

    hooks = [model.get_submodule(n).register_forward_hook(
                 lambda _m, _a, out, n=n: keep(n, out)) for n in outputs]  # fmt: skip
    hooks += [model.get_submodule(n).register_forward_pre_hook(
                  lambda _m, args, n=n: keep(n, args[0])) for n in inputs]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_taps_are_listed_in_graph_order() -> None:
    model, spec, x = _resnet20()
    order = _call_order(model, x)
    for space in spec.mergeable:
        modules = [t.module for t in space.taps]
        assert modules == sorted(modules, key=order.index), space.name


def test_last_keeps_one_tap_the_stream_after_the_stage_last_addition() -> None:
    model, spec, x = _resnet20()
    last = select_taps(spec, "last")
    taps = {s.name: [(t.module, t.side) for t in s.taps] for s in last.mergeable}
    assert all(len(t) == 1 for t in taps.values()), taps
    # conv1 and the shortcut of the next stage read one tensor: the later read is kept
    assert taps["layer1.res"] == [("layer2.0.shortcut.0", "input")]
    assert taps["layer2.res"] == [("layer3.0.shortcut.0", "input")]
    assert taps["layer3.res"] == [("head", "input")]
    seen = _seen(model, x, outputs=["layer1", "layer2", "layer3"], inputs=[m for m, _ in
                 taps["layer1.res"] + taps["layer2.res"] + taps["layer3.res"]])  # fmt: skip
    assert torch.equal(seen["layer2.0.shortcut.0"], seen["layer1"])  # after layer1.2's add
    assert torch.equal(seen["layer3.0.shortcut.0"], seen["layer2"])
    assert torch.allclose(seen["head"], seen["layer3"].mean((2, 3)))  # pooled


def test_single_tap_spaces_and_the_all_rule_are_unchanged() -> None:
    _, spec, _ = _resnet20()
    assert select_taps(spec, "all") is spec
    last = select_taps(spec, "last")
    for before, after in zip(spec.spaces, last.spaces, strict=True):
        if len(before.taps) < 2:
            assert after == before
        else:
            assert after == replace(before, taps=before.taps[-1:])


def test_taps_of_one_call_are_kept_together() -> None:
    """q and k are two slices of one qkv output: one read, two features, both kept."""
    spec = case("vit").spec
    last = select_taps(spec, "last")
    qk = [s for s in last.mergeable if s.name.endswith("attn.qk")]
    assert qk and all(s == spec.space(s.name) and len(s.taps) == 2 for s in qk)
    assert [t.module for t in last.space("blocks.res").taps] == ["head"]


def test_last_changes_the_residual_statistics_only() -> None:
    models = [case("resnet20").model, case("resnet20", 2).model]
    spec, batches = case("resnet20").spec, case("resnet20").batches
    every = collect_moments(models, spec, batches)
    once = collect_moments(models, select_taps(spec, "last"), batches)
    for space in spec.mergeable:
        a, b = every[space.name].correlation(), once[space.name].correlation()
        if len(space.taps) > 1:
            assert once[space.name].count < every[space.name].count, space.name
            assert not torch.allclose(a, b, atol=1e-3), space.name
        else:
            assert torch.equal(a, b), space.name


def test_merge_and_estimate_read_the_configured_taps(monkeypatch) -> None:
    c = case("resnet20")
    models = [c.model, case("resnet20", 2).model]
    seen: list[MergeSpec] = []
    real = mudsc.merge.statistics_stage
    monkeypatch.setattr(
        mudsc.merge, "statistics_stage", lambda m, spec, *a: seen.append(spec) or real(m, spec, *a)
    )
    cfg = MergeConfig("zipit", taps="last", repair="none")
    merge_models(models, c.batches, cfg, spec=c.spec)
    assert all(len(s.taps) <= 1 for s in seen[0].mergeable)
    est = {t: estimate_merge(models, c.spec, list(c.batches), replace(cfg, taps=t))
           for t in ("all", "last")}  # fmt: skip
    assert est["last"].stages["statistics"] < est["all"].stages["statistics"]


def test_an_unknown_taps_rule_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^unknown taps 'first'; valid: all, last$"):
        MergeConfig(taps="first")
    with pytest.raises(ConfigError, match="valid: all, last"):
        select_taps(case("mlp").spec, "first")
