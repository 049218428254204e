"""Failures found by trying models the project had not seen (issue 10), one test each."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect

import archs
import pytest
import torch
from invariance import randomise_

import mudsc
from mudsc.errors import MudscError
from mudsc.merge import MergeConfig, merge_models
from mudsc.models import create
from mudsc.renorm import apply_repair, repair_layers
from mudsc.spaces import MergeSpec, permute_state, random_permutations, trace
from mudsc.stats import shuffled_spaces

# -- public functions stay callable -------------------------------------------------------


@pytest.mark.parametrize("name", ["merge", "evaluate", "train"])
def test_public_functions_stay_callable_after_their_module_is_imported(name: str) -> None:
    function = getattr(importlib.import_module(f"mudsc.{name}"), name)
    for _ in range(2):
        module = importlib.import_module(f"mudsc.{name}")
        exec(f"import mudsc.{name}")  # the import statement sets the package attribute
        assert callable(mudsc.__dict__.get(name, getattr(mudsc, name)))
        assert callable(getattr(mudsc, name))
        assert inspect.signature(getattr(mudsc, name)) == inspect.signature(function)
        assert getattr(module, name) is function  # the module is still the module
    with pytest.raises(TypeError):  # the call reaches the function (missing arguments)
        getattr(mudsc, name)()


def test_public_merge_runs_after_import_of_its_module() -> None:
    import mudsc.merge as merge_module  # noqa: F401  (the import that used to shadow it)

    model = _mlp(1)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    for _ in range(2):
        result = mudsc.merge([model, model], [x], method="avg", repair="none")
        assert isinstance(result, torch.nn.Module)


# -- hand specs are checked like traced ones ----------------------------------------------


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create("mlp", in_channels=1, image_size=8, embed_dim=6, width=0.03).double()


def _edit(spec: MergeSpec, name: str, **changes) -> MergeSpec:
    return dataclasses.replace(
        spec,
        spaces=tuple(
            dataclasses.replace(s, **changes) if s.name == name else s for s in spec.spaces
        ),
    )


def _hand_merge(spec: MergeSpec) -> None:
    a, b = _mlp(1), _mlp(2)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    merge_models([a, b], [x], MergeConfig(method="rebasin", repair="none"), spec=spec)


def test_a_correct_hand_spec_is_accepted() -> None:
    model = _mlp(1)
    spec = trace(model, torch.randn(2, 1, 8, 8, dtype=torch.float64))
    _hand_merge(spec)


def test_hand_spec_with_a_free_output_space_is_refused_by_name() -> None:
    spec = trace(_mlp(1), torch.randn(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(MudscError, match="space.*output.*mark them fixed"):
        _hand_merge(_edit(spec, "output", fixed=False))


def test_hand_spec_missing_a_consumer_is_refused_by_name() -> None:
    spec = trace(_mlp(1), torch.randn(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(MudscError, match="features.2.*missing"):
        _hand_merge(_edit(spec, "features.2", consumers=()))


# -- permuted copies of architectures the zoo lacks ----------------------------------------


def _arch(cls: type, seed: int = 1, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(**kwargs).double()
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


def _data(channels: int = 3, side: int = 8, count: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100)
    return [
        torch.randn(16, channels, side, side, generator=gen, dtype=torch.float64)
        for _ in range(count)
    ]


def _permuted_copy(model: torch.nn.Module, spec: MergeSpec, seed: int = 7):
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), spec, perms))
    return other, perms


def _recovered(result, spec: MergeSpec, perms) -> list[str]:
    """The spaces whose permutation the merge did not find (empty: exact recovery)."""
    wrong = []
    for space in spec.mergeable:
        match = result.matches[space.name]
        together = match.unmerge_of(1) @ match.unmerge_of(0).T
        want = torch.nn.functional.one_hot(perms[space.name], space.size).double()
        if not torch.equal(together, want):
            wrong.append(space.name)
    return wrong


@torch.no_grad()
def _rel_err(model: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> float:
    want = ref.eval()(x)
    return float((model.eval()(x) - want).abs().max() / want.abs().max())


def test_multihead_attention_merges_with_default_repair() -> None:
    """``out_proj``'s own forward never runs inside nn.MultiheadAttention; REPAIR measures
    it at the attention module's output instead.  (One batch: REPAIR is exact on one.)"""
    model = _arch(archs.MHANet)
    data = _data(count=1)
    spec = trace(model, data[0][:2])
    other, perms = _permuted_copy(model, spec)
    result = merge_models([model, other], data, MergeConfig(), spec=spec)
    layers = repair_layers(result.model, spec)
    assert "attn.out_proj" in layers
    again = copy.deepcopy(result.model)
    assert apply_repair(again, [model, other], spec, result.matches, data, "cpu") == len(layers)
    assert _recovered(result, spec, perms) == []
    assert _rel_err(result.model, model, data[0]) < 1e-6


@pytest.mark.parametrize("method", ["act-align", "zipit"])
def test_token_mixing_space_is_matched_on_weights_and_recovered(method: str, caplog) -> None:
    """The token-MLP's hidden units are observed over batch x channels, and the channel
    axis is itself a merge space: rows do not pair across models, so that space is matched
    on weights (with a warning naming it) and the permuted copy is still recovered."""
    model = _arch(archs.Mixer)
    data = _data()
    spec = trace(model, data[0][:2])
    assert shuffled_spaces(model, spec, data[0][:2]) == ["token_fc1"]
    other, perms = _permuted_copy(model, spec)
    with caplog.at_level("WARNING", logger="mudsc.stages"):
        result = merge_models([model, other], data, MergeConfig(method, repair="none"), spec=spec)
    assert "token_fc1" in caplog.text
    assert _recovered(result, spec, perms) == []
    assert _rel_err(result.model, model, data[0]) < 1e-9


# -- dead units are paired by their weights --------------------------------------------------


@torch.no_grad()
def _kill_(model: torch.nn.Module, layer: str, units: list[int], norm: str | None = None):
    """Units that are 0 on every input: no incoming weight, a negative bias (or BN shift)
    before a ReLU."""
    conv = model.get_submodule(layer)
    conv.weight[units] = 0.0
    conv.bias[units] = -1.0
    if norm is not None:
        model.get_submodule(norm).bias[units] = -10.0
    return model


DEAD = {
    "mlp": (lambda: create("mlp", in_channels=3, image_size=8, embed_dim=6, width=0.03),
            [("features.0", [1, 4, 7], None), ("features.2", [0, 2], None)]),
    "densenet": (archs.DenseNetish, [("stem", [0, 3], None), ("conv_a", [1, 2], "bn_a")]),
    "mobilenet": (archs.MobileNetish, [("stem.0", [2, 5, 6], "stem.1")]),
    "squeeze-excite": (archs.SqueezeExcite, [("conv", [1, 2, 3], None)]),
}  # fmt: skip


@pytest.mark.parametrize("method", ["act-align", "zipit"])
@pytest.mark.parametrize("name", sorted(DEAD))
def test_dead_units_are_paired_by_weights(name: str, method: str) -> None:
    build, kills = DEAD[name]
    model = _arch(build)
    for layer, units, norm in kills:
        _kill_(model, layer, units, norm)
    data = _data()
    spec = trace(model, data[0][:2])
    other, perms = _permuted_copy(model, spec)
    result = merge_models([model, other], data, MergeConfig(method, repair="none"), spec=spec)
    assert _recovered(result, spec, perms) == []
    assert _rel_err(result.model, model, data[0]) < 1e-9
