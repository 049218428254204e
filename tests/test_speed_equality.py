"""Sped-up code equals the code it replaced, bit for bit, on random cases."""

from __future__ import annotations

import pytest
import torch
from test_apply import CASES, make, random_zip_match

from mudsc.apply import transform_tensor
from mudsc.similarity import WeightSimilarity
from mudsc.similarity.weight import _members_by_tensor


def concatenated_part(sim: WeightSimilarity, space, tensor, members, matches):
    """The weight-similarity share as it was computed before: reshape, then concatenate
    the members' columns and the models' rows, then centre a copy."""
    n = space.size
    rows = []
    for i, state in enumerate(sim.states):
        t = state[tensor]
        t = t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
        t = transform_tensor(
            tensor, t, sim.uses[tensor], i, matches, sim.spaces, space.name, compress=False
        )
        cols = []
        for m in members:
            axis = m.axis % t.dim()
            cols.append(t.narrow(axis, m.start, n * m.inner).movedim(axis, 0).reshape(n, -1))
        rows.append(torch.cat(cols, dim=1))
    x = torch.cat(rows, dim=0)
    if sim.kind == "inner":
        return sim._gram(x), None
    mean = x.mean(dim=1)
    return sim._gram(x - mean[:, None]), mean.to(torch.float64)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["correlation", "inner"])
@pytest.mark.parametrize("match_dtype", [torch.float32, torch.float64])
def test_weight_parts_equal_the_concatenated_parts(case, kind, match_dtype) -> None:
    (a, spec), (b, _) = make(case, 0), make(case, 1)
    sim = WeightSimilarity(spec, [a.state_dict(), b.state_dict()], kind)
    for seed in range(3):
        matches = {
            s.name: random_zip_match(s.size, 2, 10 * seed + i).to(match_dtype)
            for i, s in enumerate(spec.mergeable)
        }
        for space in spec.mergeable:
            for tensor, members in _members_by_tensor(space).items():
                part = sim._part(space, tensor, members, matches)
                gram, mean = concatenated_part(sim, space, tensor, members, matches)
                assert torch.equal(part.gram, gram), (case, space.name, tensor)
                if mean is not None:
                    assert torch.equal(part.mean, mean), (case, space.name, tensor)
