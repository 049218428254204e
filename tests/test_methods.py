"""Methods, similarities and solvers as registrations: adding one touches one registration.

The registries are objects: a test registers an entry and takes it out again (the
``registered`` fixture), so nothing leaks into other tests.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_merge import assert_pairs_recovered, case, permuted, rel_err

from mudsc.errors import MudscError
from mudsc.merge import MergeConfig, merge_models
from mudsc.methods import METHODS, Method, method_names, methods_help
from mudsc.similarity import SIMILARITIES, Similarity, WeightOf, dual_similarity
from mudsc.solvers import SOLVERS, Param, Registry, align, group_align, group_zip, zip_match

PAPER = ["avg", "rebasin", "act-align", "zipit", "wzip", "mudsc-align", "mudsc-zip"]


@pytest.fixture
def registered():
    """``register(registry, entry)`` for the test; every entry is taken out afterwards."""
    added: list[tuple[Registry, str]] = []

    def register(registry: Registry, entry):
        registry.register(entry)
        added.append((registry, entry.name))
        return entry

    yield register
    for registry, name in reversed(added):
        registry.unregister(name)


def test_the_papers_methods_are_registered_and_nothing_else() -> None:
    assert method_names() == PAPER == list(METHODS)
    assert all(name in METHODS for name in PAPER) and "mudsc" not in METHODS
    assert {m: METHODS[m].uses_alpha for m in PAPER} == {m: m.startswith("mudsc") for m in PAPER}
    assert METHODS["rebasin"].reference.startswith("Ainsworth et al.")
    assert "CVPR 2024" in METHODS["mudsc-zip"].reference
    assert "ICLR 2024" in METHODS["zipit"].reference


def test_help_lists_every_method_with_its_reference_and_parameters() -> None:
    text = methods_help()
    for name in METHODS:
        method = METHODS[name]
        assert f"{name}: {method.description} ({method.reference})" in text
    assert [p.name for p in METHODS["mudsc-zip"].params] == ["alpha", "zip_a", "zip_b"]
    assert [p.name for p in METHODS["rebasin"].params] == []
    assert "zip_a (default 0.5)" in METHODS["zipit"].help


def test_a_new_method_is_one_registration(registered) -> None:
    """Alignment on weight correlation (rebasin's solver, wzip's similarity): one record,
    and it merges a permuted copy back end to end."""
    registered(
        METHODS,
        Method("weight-align", "weight-correlation alignment", "this test", "weight", "align"),
    )
    assert "weight-align" in methods_help()
    c = case("vgg11")
    other, perm = permuted(c, seed=3)
    cfg = MergeConfig("weight-align", repair="none", patience=1)
    result = merge_models([c.model, other], c.batches, cfg, spec=c.spec)
    assert result.sweeps > 1  # a weight method: it swept
    assert rel_err(result.model, c.model, c.x) <= 1e-4
    assert_pairs_recovered(result, c.spec, [perm])


def _dual_inner(act: torch.Tensor | None, weight: WeightOf, alpha: float) -> torch.Tensor:
    """MuDSC's blend with Git Re-Basin's raw inner products instead of correlations."""
    return weight("inner") if act is None else dual_similarity(weight("inner"), act, alpha)


def test_a_new_similarity_is_one_registration_and_its_method_another(registered) -> None:
    alpha = SIMILARITIES["dual"].params
    registered(
        SIMILARITIES,
        Similarity("dual-inner", "alpha * inner + (1 - alpha) * activation", _dual_inner,
                   activations=True, weights="inner", params=alpha),
    )  # fmt: skip
    method = registered(
        METHODS, Method("mudsc-align-inner", "MuDSC on inner products", "test", "dual-inner",
                        "align"),
    )  # fmt: skip
    assert method.uses_alpha and method.needs_activations
    c = case("mlp")
    other, perm = permuted(c, seed=3)
    cfg = MergeConfig("mudsc-align-inner", alpha=0.5, repair="none", patience=1)
    result = merge_models([c.model, other], c.batches, cfg, spec=c.spec)
    assert "statistics" in result.timings and result.sweeps > 1
    assert rel_err(result.model, c.model, c.x) <= 1e-4
    assert_pairs_recovered(result, c.spec, [perm])


def test_registries_name_the_valid_entries() -> None:
    for registry, name in ((METHODS, "method"), (SOLVERS, "solver"), (SIMILARITIES, "similarity")):
        with pytest.raises(MudscError, match=f"unknown {name} 'nope'") as info:
            registry.get("nope")
        assert all(valid in str(info.value) for valid in registry.names())
    with pytest.raises(MudscError, match="already registered"):
        METHODS.register(METHODS["avg"])
    copy = METHODS.copy()
    copy.unregister("avg")
    assert "avg" not in copy and "avg" in METHODS


def test_a_method_names_existing_parts() -> None:
    with pytest.raises(MudscError, match="unknown solver 'hungarian'"):
        Method("m", "", "", "weight", "hungarian")
    with pytest.raises(MudscError, match="unknown similarity 'cosine'"):
        Method("m", "", "", "cosine", "align")
    with pytest.raises(MudscError, match="needs a similarity"):
        Method("m", "", "", None, "zip")


def test_similarities_declare_what_they_need() -> None:
    needs = {
        name: (s.activations, s.weights, s.uses_alpha)
        for name, s in ((n, SIMILARITIES[n]) for n in SIMILARITIES)
    }
    assert needs == {
        "activation": (True, None, False),
        "weight": (False, "correlation", False),
        "weight-inner": (False, "inner", False),
        "dual": (True, "correlation", True),
    }


def _similarity(n_models: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_models * n, 5, generator=gen, dtype=torch.float64)
    return torch.corrcoef(x)


@pytest.mark.parametrize("groups", [1, 2])
def test_solvers_share_one_signature_and_dispatch_on_groups(groups: int) -> None:
    s = _similarity(2, 6, seed=groups)
    by_name = {
        "align": align(s, 2) if groups == 1 else group_align(s, 2, groups),
        "zip": zip_match(s, 2, 0.3, 0.5) if groups == 1 else group_zip(s, 2, groups, 0.3, 0.5),
    }
    for name, want in by_name.items():
        params = {"zip_a": 0.3, "zip_b": 0.5} if name == "zip" else {}
        got = SOLVERS[name].solve(s, 2, groups=groups, block_order=None, **params)
        assert torch.equal(got.unmerge, want.unmerge) and got.value == want.value
    identity = SOLVERS["identity"].solve(s, 2, groups=groups)
    assert torch.equal(identity.unmerge, torch.cat([torch.eye(6)] * 2).double())
    assert [p.name for p in SOLVERS["zip"].params] == ["zip_a", "zip_b"]


def test_every_config_field_has_one_line_of_help() -> None:
    for f in dataclasses.fields(MergeConfig):
        text = f.metadata.get("help", "")
        assert text and "\n" not in text, f.name
    defaults = {f.name: f.default for f in dataclasses.fields(MergeConfig)}
    declared: list[Param] = [*SOLVERS["zip"].params, *SIMILARITIES["dual"].params]
    assert all(defaults[p.name] == p.default for p in declared)
