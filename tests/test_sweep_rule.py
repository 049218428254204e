"""``MergeConfig.sweep_rule``: after a weight sweep that does not improve, continue from its
end (mudsc) or restart from the best matching so far (the authors' rule).  The engine's
caches (keyed on match versions) must stay exact across a restart."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_merge import _scripted, _sweep, case

import mudsc.sweeps as sweeps_module
from mudsc.errors import ConfigError
from mudsc.merge import MergeConfig, merge_models, solver_params
from mudsc.methods import METHODS
from mudsc.similarity import weight_similarity
from mudsc.solvers.match import Match, identity_match
from mudsc.spaces import MergeSpec
from mudsc.sweeps import SweepLimits


def _plain_sweeps(models, spec: MergeSpec, cfg: MergeConfig) -> tuple[dict[str, Match], str]:
    """The sweeps written plainly, every similarity from scratch, every space solved at
    every visit, with both rules (weight-only methods, no tied spaces).  Also returns a
    log: ``+`` per improving sweep, else how many spaces it had moved."""
    method = METHODS[cfg.method]
    kind = method.similarity_record.weights
    solver, params = method.solver_record, solver_params(method, cfg)
    states = [m.state_dict() for m in models]
    spaces = list(spec.mergeable)
    matches = {s.name: identity_match(s.size, 2) for s in spaces}
    best, best_score, stale, log = dict(matches), -math.inf, 0, ""
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.max_sweeps):
        for u in sweeps_module.visit_order(len(spaces), gen):
            s = weight_similarity(spec, spaces[u].name, states, matches, kind)
            group = (spaces[u],)
            matches[spaces[u].name] = sweeps_module.solve_group(group, [s], 2, solver, params)[0]
        score = sweeps_module.sweep_score(matches)
        if score > best_score + cfg.tolerance:
            best, best_score, stale, log = dict(matches), score, 0, log + "+"
            continue
        stale += 1
        log += str(sum(not torch.equal(m.unmerge, best[k].unmerge) for k, m in matches.items()))
        if cfg.sweep_rule == "restart":
            matches = dict(best)
        if stale >= cfg.patience:
            break
    return best, log


@pytest.mark.parametrize(("name", "seed"), [("mlp", 1), ("vgg11-bn", 1)])
def test_restart_is_the_plain_rule_with_cached_similarities(name: str, seed: int) -> None:
    """The engine's cached similarities and skipped solves after a restart (matches,
    versions and solve keys put back together) give exactly the plain loop's matches."""
    cfg = MergeConfig("wzip", repair="none", patience=4, sweep_rule="restart", tolerance=0.0,
                      seed=seed)  # fmt: skip
    models = [case(name).model, case(name, 2).model]
    expected, log = _plain_sweeps(models, case(name).spec, cfg)
    assert re.search(r"[1-9]\+", log), log  # a sweep that moved matches was undone, then a
    # sweep from the restored best improved: the restore mattered
    result = merge_models(models, case(name).batches, cfg, spec=case(name).spec)
    for name, m in expected.items():
        assert torch.equal(m.unmerge, result.matches[name].unmerge), name
        assert m.value == pytest.approx(result.matches[name].value, rel=1e-9), name


def test_restart_keeps_the_best_sweep_and_is_deterministic(monkeypatch) -> None:
    scores: list[float] = []
    real = sweeps_module.sweep_score
    monkeypatch.setattr(
        sweeps_module, "sweep_score", lambda m: scores.append(real(m)) or scores[-1]
    )
    runs = [_sweep("mudsc-zip", name="vgg11", sweep_rule="restart", patience=3, seed=2)
            for _ in range(2)]  # fmt: skip
    per_run = len(scores) // 2
    first = scores[:per_run]
    assert len(first) == runs[0].sweeps
    assert real(runs[0].matches) == max(first) >= first[0]  # never below the first sweep
    assert scores[per_run:] == first
    again = runs[1].matches
    assert all(torch.equal(m.unmerge, again[k].unmerge) for k, m in runs[0].matches.items())


def test_restart_counts_the_same_stale_sweeps(monkeypatch) -> None:
    """Scripted sweep values: the best (0.5) is kept; 3 sweeps without gain end it."""
    _scripted(monkeypatch, [0.1, 0.5, 0.4, 0.3, 0.45, 0.9], per_sweep=3)
    result = _sweep(patience=3, sweep_rule="restart")
    assert result.sweeps == 5
    assert set(result.space_values.values()) == {0.5}


def test_any_increase_is_progress_with_tolerance_zero(monkeypatch) -> None:
    _scripted(monkeypatch, [0.5 + 1e-12 * k for k in range(20)], per_sweep=3)
    result = _sweep(patience=2, tolerance=0.0, sweep_rule="restart", max_sweeps=7)
    assert result.sweeps == 7


def test_restart_can_change_the_result() -> None:
    """Negative control for the rule: on this pair the two rules end differently."""
    ends = {rule: _sweep("wzip", name="vgg11", sweep_rule=rule, patience=4, tolerance=0.0)
            for rule in ("continue", "restart")}  # fmt: skip
    a, b = ends["continue"], ends["restart"]
    assert a.sweeps != b.sweeps or any(
        not torch.equal(m.unmerge, b.matches[k].unmerge) for k, m in a.matches.items()
    )


def test_an_unknown_sweep_rule_is_one_line() -> None:
    line = r"^unknown sweep_rule 'again'; valid: continue, restart$"
    with pytest.raises(ConfigError, match=line):
        MergeConfig(sweep_rule="again")
    with pytest.raises(ConfigError, match="valid: continue, restart"):
        SweepLimits(10, 2, 0.0, 0, "again")
