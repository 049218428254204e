"""Every user mistake on the library's entry points ends as one MudscError subclass.

Issue 12 item 4: bad merge specs, trace and merge arguments, solver inputs, figure options
and data files each give one line of the fitting kind (config, data, spec, checkpoint),
never a raw KeyError/TypeError/RuntimeError; the library raises only the subclasses.
"""

from __future__ import annotations

import ast
import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mudsc
import mudsc.errors as errors
import mudsc.spaces.capture as capture
from mudsc.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    DataError,
    MudscError,
    ResourceError,
    SpecError,
)
from mudsc.methods import METHODS
from mudsc.plots import compute_interpolation, compute_landscape, load_landscape
from mudsc.solvers import SOLVERS, align, group_align, identity, pair_blocks, zip_match
from mudsc.solvers.match import Match
from mudsc.spaces import MergeSpec
from mudsc.stats import collect_moments

SRC = Path(__file__).resolve().parents[1] / "src" / "mudsc"
SUBCLASSES = (ConfigError, DataError, SpecError, ResourceError, CheckpointError,
              CorruptCheckpointError)  # fmt: skip


def _mlp(bn: bool = False) -> nn.Module:
    mid = [nn.BatchNorm1d(8)] if bn else []
    return nn.Sequential(nn.Linear(4, 8), *mid, nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture(scope="module")
def spec_dict() -> dict:
    torch.manual_seed(0)
    return json.loads(mudsc.trace(_mlp(), torch.randn(2, 4)).to_json())


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# -- (a) merge specs handed in as JSON ------------------------------------------------


def _set(path: tuple, value: object) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return edit


SPEC_EDITS = [
    (_set(("spaces", 1, "producers", 0, "axis"), "x"), r"spaces\[1\]\.producers\[0\]\.axis"),
    (_set(("spaces", 1, "size"), 8.5), r"spaces\[1\]\.size must be of type int"),
    (_set(("spaces", 1, "size"), True), r"spaces\[1\]\.size must be of type int"),
    (_set(("spaces", 1, "size"), 0), r"spaces\[1\]\.size must be >= 1"),
    (_set(("spaces", 1, "groups"), 3), r"multiple of groups 3"),
    (_set(("spaces", 1, "producers", 0, "start"), -1), r"producers\[0\]\.start must be >= 0"),
    (_set(("spaces", 1, "taps", 0, "side"), "in"), r"taps\[0\]\.side must be one of"),
    (_set(("spaces", 1, "block_tie"), 3), r"block_tie must be of type str"),
    (_set(("spaces", 1, "sizee"), 8), r"unknown field\(s\) \['sizee'\]"),
    (_set(("spaces", 1, "producers"), {}), r"spaces\[1\]\.producers must be a list"),
    (_set(("spaces", 1, "producers", 0), "fc.weight"), r"producers\[0\] must be an object"),
    (_set(("spaces",), "all"), r"spaces must be a list"),
    (_set(("warnings",), [1]), r"warnings\[0\] must be of type str"),
    (_set(("extra",), 1), r"unknown field\(s\) \['extra'\]"),
    (lambda d: d["spaces"][1].pop("name"), r"spaces\[1\] lacks the field 'name'"),
    (lambda d: d.pop("spaces"), r"'spaces' is missing"),
    (lambda d: d["spaces"].append(d["spaces"][1]), r"names must be unique"),
]


@pytest.mark.parametrize(("edit", "words"), SPEC_EDITS)
def test_a_malformed_spec_names_its_field(spec_dict: dict, edit, words: str) -> None:
    data = copy.deepcopy(spec_dict)
    edit(data)
    with pytest.raises(SpecError, match=words) as info:
        MergeSpec.from_json(json.dumps(data))
    _one_line(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # nesting past the recursion limit
        (b"\xff\xfe{", "not valid JSON"),
        ("[]", "expected an object"),
        ("null", "expected an object"),
        (Path("spec.json"), "takes the JSON text.*read_text"),
    ],
)
def test_spec_text_that_is_no_spec_is_refused(text: object, words: str) -> None:
    with pytest.raises(SpecError, match=words) as info:
        MergeSpec.from_json(text)  # type: ignore[arg-type]
    _one_line(info.value)


def test_a_spec_naming_an_unknown_tensor_is_refused(spec_dict: dict) -> None:
    data = copy.deepcopy(spec_dict)
    data["spaces"][1]["producers"][0]["tensor"] = "nope.weight"
    spec = MergeSpec.from_json(json.dumps(data))
    with pytest.raises(SpecError, match="no tensor 'nope.weight'.*another model"):
        spec.validate(_mlp())


def test_a_valid_spec_still_round_trips(spec_dict: dict) -> None:
    spec = MergeSpec.from_dict(spec_dict)
    assert MergeSpec.from_json(spec.to_json()) == spec


# -- (a) tracing and merging ----------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "example", "kind", "words"),
    [
        ("model", torch.randn(2, 4), ConfigError, "needs a torch.nn.Module.*got str"),
        (_mlp(), torch.randn(2, 5), SpecError, "example input failed at '0': mat1"),
        (_mlp(), torch.full((2, 4), float("nan")), DataError, "NaN or infinite"),
    ],
)
def test_trace_refuses_bad_arguments(model, example, kind, words) -> None:
    with pytest.raises(kind, match=words) as info:
        mudsc.trace(model, example)
    _one_line(info.value)


def test_an_unknown_capture_route_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown capture route 'bad'.*auto, fx, export"):
        mudsc.trace_model(_mlp(), torch.randn(2, 4), route="bad")  # type: ignore[arg-type]


def test_the_export_fallback_catches_only_trace_failures(monkeypatch) -> None:
    """route='auto' falls back to fx when torch.export cannot trace (a SpecError); any
    other mistake is the user's and must reach them."""
    monkeypatch.setattr(capture, "opaque_modules", lambda *a: ["0 (Linear)"])

    def failing(error: MudscError) -> Callable[..., None]:
        def export(*args: object, **kwargs: object) -> None:
            raise error

        return export

    monkeypatch.setattr(capture, "_export", failing(SpecError("export cannot trace")))
    assert mudsc.trace_model(_mlp(), torch.randn(2, 4), verify=False).route == "fx"
    monkeypatch.setattr(capture, "_export", failing(DataError("bad data")))
    with pytest.raises(DataError, match="bad data"):
        mudsc.trace_model(_mlp(), torch.randn(2, 4), verify=False)


@pytest.mark.parametrize(
    ("method", "bn", "words"),
    [
        ("zipit", False, r"calibration batch 1 \(model 0\) does not fit the model: mat1"),
        ("avg", True, "calibration batch 1 does not fit the model: mat1"),  # BN reset pass
        ("avg", False, "calibration batch 1 does not fit the model: mat1"),  # REPAIR pass
    ],
)
def test_a_calibration_batch_of_another_shape_is_a_data_error(method, bn, words) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(8, 4), torch.randn(8, 5)]
    with pytest.raises(DataError, match=words) as info:
        mudsc.merge([_mlp(bn), _mlp(bn)], batches, method)
    _one_line(info.value)


def test_non_finite_calibration_data_is_a_data_error() -> None:
    torch.manual_seed(0)
    with pytest.raises(DataError, match="first calibration batch.*NaN"):
        mudsc.merge([_mlp(), _mlp()], [torch.full((8, 4), float("nan"))], "zipit")
    later = [torch.randn(8, 4), torch.full((8, 4), float("nan"))]
    with pytest.raises(DataError, match="not finite"):
        mudsc.merge([_mlp(), _mlp()], later, "zipit")


@pytest.mark.parametrize(
    ("device", "words"), [("nonsense", "not a torch device"), ("meta", "'meta' device")]
)
def test_statistics_refuse_a_device_that_cannot_hold_them(device: str, words: str) -> None:
    model = _mlp()
    spec = mudsc.trace(model, torch.randn(2, 4))
    with pytest.raises(ConfigError, match=words):
        collect_moments([model, _mlp()], spec, [torch.randn(2, 4)], device=device)


# -- (a) registries and solvers -------------------------------------------------------


@pytest.mark.parametrize("name", ["nope", ["avg"], None, 3])
def test_an_unknown_registry_name_lists_the_known_ones(name: object) -> None:
    with pytest.raises(ConfigError, match="unknown method .*valid methods: avg, ") as info:
        METHODS.get(name)  # type: ignore[arg-type]
    assert all(m in str(info.value) for m in METHODS.names())


def _sim(n: int) -> torch.Tensor:
    s = torch.randn(n, n, dtype=torch.float64)
    return s + s.T


SOLVER_CASES = [
    (lambda: align(torch.randn(6, dtype=torch.float64), 2), SpecError, "square matrix"),
    (lambda: align(torch.randn(6, 4, dtype=torch.float64), 2), SpecError, "square matrix"),
    (lambda: align(_sim(5), 2), SpecError, "5 rows, which is not 2 models"),
    (lambda: align(np.zeros((6, 6)), 2), SpecError, "torch.Tensor, got ndarray"),
    (lambda: align(torch.zeros(6, 6, dtype=torch.int64), 2), SpecError, "floating-point"),
    (lambda: align(_sim(6) * float("nan"), 2), DataError, "NaN or infinite"),
    (lambda: align(_sim(6), "2"), ConfigError, "n_models must be a positive integer"),
    (lambda: zip_match(_sim(6), 2, a="x"), ConfigError, "damping a must be a number"),
    (lambda: zip_match(_sim(6), 2, b=-1.0), ConfigError, "budget factor b"),
    (lambda: group_align(_sim(6), 2, 2), SpecError, "3 units cannot be split into 2"),
    (lambda: SOLVERS["zip"].solve(_sim(6), 2, groups="3"), ConfigError, "groups must be"),
    (lambda: pair_blocks(torch.zeros(3, 3)), SpecError, r"\(N, G, G\)"),
    (lambda: identity(0, 2), ConfigError, "units per space must be a positive integer"),
    (lambda: identity(3, 0), ConfigError, "n_models must be a positive integer"),
    (lambda: Match(torch.zeros(4, 2), torch.zeros(3, 2), 0.0, 2), SpecError, r"\(N\*n, n\)"),
    (lambda: Match(torch.zeros(5, 3), torch.zeros(5, 3), 0.0, 2), SpecError, r"\(N\*n, n\)"),
]


@pytest.mark.parametrize(("call", "kind", "words"), SOLVER_CASES)
def test_solvers_refuse_bad_inputs_with_one_line(call, kind, words) -> None:
    with pytest.raises(kind, match=words) as info:
        call()
    _one_line(info.value)


# -- (a) figures: options checked before any merge, data files checked before reading --


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"resolution": 1}, "--resolution must be an integer in 2..50"),
        ({"resolution": 100_000}, "--resolution must be an integer in 2..50"),
        ({"resolution": 2.5}, "--resolution must be an integer"),
        ({"path_steps": 1}, "path_steps must be an integer in 2.."),
    ],
)
def test_landscape_options_are_checked_before_any_work(kwargs: dict, words: str) -> None:
    # No data and no evaluation set: any work at all would fail differently.
    with pytest.raises(ConfigError, match=words):
        compute_landscape(_mlp(), _mlp(), None, [], ["avg"], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("steps", [1, 0, 10**6, "3"])
def test_interpolation_steps_are_checked_before_any_work(steps: object) -> None:
    with pytest.raises(ConfigError, match="--steps must be an integer in 2..201"):
        compute_interpolation(_mlp(), _mlp(), None, [], steps=steps)  # type: ignore[arg-type]


def test_a_landscape_file_that_is_not_one_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load_landscape(fifo)  # would block on open
    junk = tmp_path / "junk.npz"
    junk.write_text("junk")
    with pytest.raises(DataError, match="not a NumPy .npz archive") as info:
        load_landscape(junk)
    assert "pickle" not in str(info.value)  # numpy's advice to unpickle is not repeated
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, meta=np.array("[1]"), center=np.zeros(2), basis=np.zeros((2, 2)),
             explained_variance_ratio=np.zeros(2))  # fmt: skip
    with pytest.raises(DataError, match="not a landscape data file"):
        load_landscape(wrong)


# -- (b) the library raises only subclasses -------------------------------------------


def _bare_raises(path: Path) -> list[int]:
    """Lines of ``path`` that raise MudscError itself (not one of its subclasses)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = exc.attr if isinstance(exc, ast.Attribute) else getattr(exc, "id", None)
            if name == "MudscError":
                lines.append(node.lineno)
    return sorted(lines)


def test_no_module_raises_the_bare_base_class() -> None:
    found = {
        str(path.relative_to(SRC)): lines
        for path in sorted(SRC.rglob("*.py"))
        if (lines := _bare_raises(path))
    }
    assert not found, f"raise a MudscError subclass instead (mudsc.errors): {found}"


def test_the_ast_check_sees_a_bare_raise(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    raise MudscError('x')\n\ndef g():\n    raise errors.MudscError\n"
        "\ndef h():\n    raise ConfigError('x')\n"
    )
    assert _bare_raises(source) == [2, 5]


# -- (c) the hierarchy ----------------------------------------------------------------


@pytest.mark.parametrize("kind", SUBCLASSES, ids=lambda k: k.__name__)
def test_every_kind_is_a_mudsc_error(kind: type[MudscError]) -> None:
    assert getattr(errors, kind.__name__) is kind
    assert getattr(mudsc, kind.__name__) is kind
    with pytest.raises(MudscError, match="one line"):
        raise kind("one line")


def test_a_corrupt_checkpoint_is_a_checkpoint_error() -> None:
    assert issubclass(CorruptCheckpointError, CheckpointError)
    assert not issubclass(CheckpointError, CorruptCheckpointError)
