"""Merge spaces: the :class:`MergeSpec` contract and its automatic derivation by tracing."""

from mudsc.spaces.rules import (
    Rules,
    register_function_rule,
    register_method_rule,
    register_module_rule,
)
from mudsc.spaces.spec import AxisUse, Member, MergeSpec, Space, Tap
from mudsc.spaces.trace import TracedModel, trace, trace_model
from mudsc.spaces.verify import permute_state, random_permutations

__all__ = [
    "AxisUse",
    "MergeSpec",
    "Member",
    "Rules",
    "Space",
    "Tap",
    "TracedModel",
    "permute_state",
    "random_permutations",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
    "trace",
    "trace_model",
]
