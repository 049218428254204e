"""Applying merge matrices to weights (docs/ALGORITHM.md section 6).

One transform serves two callers: the weight similarity (re-expressing a model's
neighbour axes in the merged basis, Git Re-Basin's trick) and the final merge.  Keeping a
single implementation guarantees that the basis the solver compares weights in is exactly
the basis the merged weights end up in.

Rule per tensor axis of model i that belongs to a matched space p (one rule, the
final-merge rule, everywhere):

* producer or ignored axis: new unit k = sum_u (N * M_i^p)[u, k] * unit u
* consumer axis:            new unit k = sum_u U_i^p[u, k] * unit u

A unit is a slice of the axis (``Member.start``/``inner``); several spaces may share one
axis as disjoint slices (fused qkv rows, channel ``cat``), each slice is transformed with
its own matrix and the rest of the axis is left in place.  A ``per_group`` axis (the input
axis of a grouped convolution holds only the g units of the group chosen by the output
axis) is expanded to a block-diagonal full axis first, transformed, and compressed back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mudsc.errors import ConfigError, SpecError
from mudsc.solvers.match import Match
from mudsc.spaces.spec import AxisUse, MergeSpec, Space

logger = logging.getLogger(__name__)


# -- the shared per-axis contraction --------------------------------------------------


def contract_axis(t: Tensor, axis: int, mat: Tensor, start: int = 0, inner: int = 1) -> Tensor:
    """Re-express one slice of ``axis`` in a new basis: unit k <- sum_u mat[u, k] * unit u.

    The slice ``start ... start + n*inner`` (n = ``mat.shape[0]``) is read as n units of
    ``inner`` consecutive positions; positions outside it are kept.  Computed in the
    floating dtype of ``t`` (float64 for integer tensors), on ``t``'s device.
    """
    n, n_new = mat.shape
    axis = axis % t.dim()
    length = t.shape[axis]
    stop = start + n * inner
    if start < 0 or stop > length:
        raise SpecError(
            f"cannot transform positions {start}..{stop - 1} of an axis of length {length}; "
            "the merge spec does not fit this tensor (check it with MergeSpec.validate)"
        )
    dtype = t.dtype if t.dtype.is_floating_point else torch.float64
    x = t.narrow(axis, start, n * inner).to(dtype).movedim(axis, 0)
    rest = x.shape[1:]
    flat = x.reshape(n, -1)
    mat = mat.to(device=t.device, dtype=dtype)
    target, weight = _one_per_row(mat)
    if target is not None:
        # every solver's M and U send each source unit to one merged unit: a weighted
        # scatter is exact and O(n) instead of a dense O(n^2) product
        y = flat.new_zeros(n_new, flat.shape[1]).index_add_(0, target, flat * weight[:, None])
    else:
        y = mat.T @ flat
    y = y.reshape(n_new * inner, *rest).movedim(0, axis)
    if start == 0 and stop == length:
        return y
    head = t.narrow(axis, 0, start).to(dtype)
    tail = t.narrow(axis, stop, length - stop).to(dtype)
    return torch.cat([head, y, tail], dim=axis)


def _one_per_row(mat: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(column, value) of each row's single non-zero, or (None, None) if some row has more."""
    nonzero = mat != 0
    if bool((nonzero.sum(dim=1) > 1).any()):
        return None, None
    target = nonzero.to(torch.uint8).argmax(dim=1)
    return target, mat.gather(1, target[:, None]).squeeze(1)


def axis_matrix(match: Match, model_index: int, role: str) -> Tensor:
    """The matrix that maps model i's units of one space to merged units for ``role``."""
    if role == "consumer":
        return match.unmerge_of(model_index)
    return match.n_models * match.merge_of(model_index)


# -- grouped-convolution axes ---------------------------------------------------------


def _group_axes(axis: int, ndim: int) -> int:
    """The axis that decides which group a per-group axis holds (the output channels)."""
    if ndim < 2:
        raise SpecError("a per_group member needs a tensor with at least two axes")
    return 0 if axis != 0 else 1


def _expand_groups(t: Tensor, axis: int, start: int, width: int, groups: int) -> Tensor:
    """Per-group axis (width = g*inner positions) -> block-diagonal full axis (G*width)."""
    decide = _group_axes(axis, t.dim())
    x = t.movedim((decide, axis), (0, 1))
    rows, length = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    if rows % groups:
        raise SpecError(
            f"a per_group axis needs {rows} output channels divisible by {groups} groups"
        )
    part = x[:, start : start + width].reshape(groups, rows // groups, width, *rest)
    full = part.new_zeros(groups, rows // groups, groups, width, *rest)
    idx = torch.arange(groups, device=t.device)
    full[idx, :, idx] = part
    full = full.reshape(rows, groups * width, *rest)
    x = torch.cat([x[:, :start], full, x[:, start + width : length]], dim=1)
    return x.movedim((0, 1), (decide, axis))


def _compress_groups(t: Tensor, axis: int, start: int, width: int, groups: int) -> Tensor:
    """Inverse of ``_expand_groups``: keep, for each row, the block of its own group."""
    decide = _group_axes(axis, t.dim())
    x = t.movedim((decide, axis), (0, 1))
    rows, length = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    full = x[:, start : start + groups * width]
    full = full.reshape(groups, rows // groups, groups, width, *rest)
    idx = torch.arange(groups, device=t.device)
    part = full[idx, :, idx].reshape(rows, width, *rest)
    x = torch.cat([x[:, :start], part, x[:, start + groups * width : length]], dim=1)
    return x.movedim((0, 1), (decide, axis))


# -- one tensor, one model ------------------------------------------------------------


def _check_axis_slices(name: str, t: Tensor, uses: Sequence[AxisUse], spaces: Mapping) -> None:
    """Slices of one axis must fit and must not overlap; per-group axes stand alone."""
    by_axis: dict[int, list[tuple[int, int, AxisUse]]] = {}
    for use in uses:
        m = use.member
        if not -t.dim() <= m.axis < t.dim():
            raise SpecError(
                f"space {use.space!r}: tensor {name!r} has no axis {m.axis} (shape "
                f"{tuple(t.shape)}); fix the merge spec"
            )
        space: Space = spaces[use.space]
        units = space.group_size if m.per_group else space.size
        stop = m.stop(units)
        if m.start < 0 or stop > t.shape[m.axis]:
            raise SpecError(
                f"space {use.space!r}: tensor {name!r} axis {m.axis} has length "
                f"{t.shape[m.axis]} but the spec needs positions {m.start}..{stop - 1}"
            )
        by_axis.setdefault(m.axis % t.dim(), []).append((m.start, stop, use))
    for axis, slices in by_axis.items():
        slices.sort(key=lambda s: s[0])
        for (_, stop_a, a), (start_b, _, b) in zip(slices, slices[1:], strict=False):
            if start_b < stop_a:
                raise SpecError(
                    f"tensor {name!r} axis {axis}: spaces {a.space!r} and {b.space!r} "
                    "claim overlapping positions; fix the merge spec"
                )
        if len(slices) > 1 and any(s[2].member.per_group for s in slices):
            raise SpecError(
                f"tensor {name!r} axis {axis}: a per_group member must be the only member "
                "of its axis (not supported otherwise)"
            )


def transform_tensor(
    name: str,
    t: Tensor,
    uses: Sequence[AxisUse],
    model_index: int,
    matches: Mapping[str, Match],
    spaces: Mapping[str, Space],
    skip_space: str | None = None,
    compress: bool = True,
) -> Tensor:
    """Re-express every matched axis of one tensor of model i in the merged basis.

    Axes whose space is ``skip_space`` or has no entry in ``matches`` are left as they are.
    Returns a new floating tensor in the promoted dtype of the tensor and the matrices, or
    ``t`` itself when nothing is transformed and nothing is expanded.  With
    ``compress=False`` per-group axes are returned in their expanded, block-diagonal form
    (``space.size`` units), which is what the weight similarity reads.
    """
    _check_axis_slices(name, t, uses, spaces)
    active = [u for u in uses if u.space != skip_space and u.space in matches]
    grouped = [u for u in uses if u.member.per_group]
    if not active and (compress or not grouped):
        return t
    out = t
    for use in grouped:
        space = spaces[use.space]
        m = use.member
        out = _expand_groups(out, m.axis, m.start, space.group_size * m.inner, space.groups)
    for use in active:
        m = use.member
        mat = axis_matrix(matches[use.space], model_index, use.role)
        out = contract_axis(out, m.axis, mat, m.start, m.inner)
    if compress:
        for use in grouped:
            space = spaces[use.space]
            m = use.member
            out = _compress_groups(out, m.axis, m.start, space.group_size * m.inner, space.groups)
    return out


# -- whole state dicts ----------------------------------------------------------------


def check_matches(
    spec: MergeSpec, matches: Mapping[str, Match], n_models: int | None = None
) -> None:
    """Every match must name a mergeable space of the spec and fit its size and N.

    ``n_models=None`` only requires all matches to agree on N.
    """
    mergeable = {s.name: s for s in spec.mergeable}
    if n_models is None and matches:
        n_models = next(iter(matches.values())).n_models
    for name, match in matches.items():
        if name not in mergeable:
            raise SpecError(
                f"a match is given for {name!r}, which is not a mergeable space of the spec; "
                f"mergeable spaces: {sorted(mergeable)}"
            )
        n = mergeable[name].size
        if match.n_models != n_models or tuple(match.merge.shape) != (n_models * n, n):
            raise SpecError(
                f"the match of space {name!r} has merge shape {tuple(match.merge.shape)} for "
                f"{match.n_models} models, expected ({n_models * n}, {n}) for {n_models} models"
            )
        if match.unmerge.shape != match.merge.shape:
            raise SpecError(
                f"the match of space {name!r} has merge and unmerge of different shapes"
            )


def _uses_in(spec: MergeSpec, state: Mapping[str, Tensor]) -> dict[str, list[AxisUse]]:
    uses = spec.tensor_uses()
    missing = sorted(k for k in uses if k not in state)
    if missing:
        raise SpecError(
            f"the merge spec names tensors the model does not have: {missing[:5]}; the spec "
            "was made for another architecture (check it with MergeSpec.validate)"
        )
    return uses


def _cast_like(x: Tensor, ref: Tensor) -> Tensor:
    """Back to the reference dtype; integers (BN num_batches_tracked) are rounded."""
    if not ref.is_floating_point() and x.is_floating_point():
        x = x.round()
    return x.to(ref.dtype)


def transform_state(
    spec: MergeSpec,
    state: Mapping[str, Tensor],
    model_index: int,
    matches: Mapping[str, Match],
    skip_space: str | None = None,
) -> dict[str, Tensor]:
    """Model i's state dict with every matched space re-expressed in the merged basis.

    Tensors in no matched space are returned as they are (the same objects); transformed
    tensors keep their input dtype.  ``skip_space`` leaves one space in model i's basis.
    """
    if model_index < 0:
        raise ConfigError(f"model_index must be >= 0, got {model_index}")
    for name, match in matches.items():
        if model_index >= match.n_models:
            raise SpecError(
                f"the match of space {name!r} covers {match.n_models} models; "
                f"there is no model {model_index}"
            )
    check_matches(spec, matches)
    uses = _uses_in(spec, state)
    spaces = {s.name: s for s in spec.mergeable}
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if key in uses:
            new = transform_tensor(key, t, uses[key], model_index, matches, spaces, skip_space)
            out[key] = new if new is t else _cast_like(new, t)
        else:
            out[key] = t
    return out


def apply_matches(
    spec: MergeSpec, states: Sequence[Mapping[str, Tensor]], matches: Mapping[str, Match]
) -> dict[str, Tensor]:
    """The merged state dict: mean over models of each model's transformed state.

    Spaces without a match are averaged as they are (identity).  Tensors in no space are
    averaged; integer tensors get the rounded mean in their own dtype; bool tensors are
    taken from model 0.  Every result has its input dtype and is a new tensor.
    """
    n_models = len(states)
    if n_models < 1:
        raise ConfigError("apply_matches needs at least one model state")
    check_matches(spec, matches, n_models)
    keys = list(states[0].keys())
    for i, state in enumerate(states[1:], start=1):
        if set(state.keys()) != set(keys):
            diff = sorted(set(state.keys()) ^ set(keys))
            raise SpecError(
                f"model {i} has different tensors than model 0 (e.g. {diff[:5]}); merging "
                "needs models of one architecture"
            )
    uses = _uses_in(spec, states[0])
    spaces = {s.name: s for s in spec.mergeable}
    merged: dict[str, Tensor] = {}
    for key in keys:
        ref = states[0][key]
        for i, state in enumerate(states):
            if state[key].shape != ref.shape:
                raise SpecError(
                    f"tensor {key!r} has shape {tuple(state[key].shape)} in model {i} but "
                    f"{tuple(ref.shape)} in model 0; merging needs equal widths"
                )
        if ref.dtype == torch.bool:
            merged[key] = ref.clone()
            continue
        total = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for i, state in enumerate(states):
            t = state[key].to(device=ref.device)
            if key in uses:
                t = transform_tensor(key, t, uses[key], i, matches, spaces)
            total += t
        merged[key] = _cast_like(total / n_models, ref)
    logger.debug("merged %d tensors of %d models", len(merged), n_models)
    return merged
