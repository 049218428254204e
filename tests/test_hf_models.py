"""Exact recovery of a permuted copy on Hugging Face models and nn.TransformerEncoder
(traced by the export route), and finite merges of two independent random inits.

A permuted copy of a model merges back to the model under every method but avg: with no
repair, and with the default repair on one calibration batch (REPAIR is the identity on
one batch; BatchNorm reset is compared with the original's own reset on that batch)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
from archs import TorchEncoder
from hf_tiny import VOCAB, bert, gpt2, vit
from invariance import _tensors, permute_model, randomise_
from torch import Tensor, nn

from mudsc.errors import MudscError
from mudsc.layers import has_batchnorm
from mudsc.merge import MergeConfig, merge_models
from mudsc.methods import METHODS
from mudsc.renorm import reset_batchnorm
from mudsc.spaces import MergeSpec, trace
from mudsc.stages import output_features

transformers = pytest.importorskip("transformers")

NOT_AVG = [m for m in METHODS if m != "avg"]


def _resnet() -> nn.Module:
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], layer_type="basic", num_labels=3,
    ))  # fmt: skip


def _convnext() -> nn.Module:
    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[4, 8], depths=[1, 1], num_labels=3,
    ))  # fmt: skip


def _tokens(gen: torch.Generator) -> Tensor:
    return torch.randint(0, VOCAB, (8, 5), generator=gen)


def _images(gen: torch.Generator) -> Tensor:
    return torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64)


def _sequences(gen: torch.Generator) -> Tensor:
    return torch.randn(8, 5, 4, generator=gen, dtype=torch.float64)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Tensor]]] = {
    "BertModel": (lambda: bert(transformers.BertModel), _tokens),
    "BertForSequenceClassification": (
        lambda: bert(transformers.BertForSequenceClassification),
        _tokens,
    ),
    "ViTModel": (lambda: vit(transformers.ViTModel), _images),
    "ViTForImageClassification": (lambda: vit(transformers.ViTForImageClassification), _images),
    "GPT2Model": (lambda: gpt2(transformers.GPT2Model), _tokens),
    "GPT2LMHeadModel": (lambda: gpt2(transformers.GPT2LMHeadModel), _tokens),
    "ResNetForImageClassification": (_resnet, _images),
    "ConvNextForImageClassification": (_convnext, _images),
    "TransformerEncoder": (TorchEncoder, _sequences),
}


def _model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name][0]().double().eval()
    return randomise_(model, torch.Generator().manual_seed(seed))


@functools.cache
def _case(name: str) -> tuple[nn.Module, MergeSpec, Tensor, Tensor, nn.Module]:
    """Cached (never modified): the model, its spec, a calibration batch, fresh inputs and
    a permuted copy."""
    gen = torch.Generator().manual_seed(100)
    model = _model(name, 1)
    batch, x = MODELS[name][1](gen), MODELS[name][1](gen)
    spec = trace(model, batch)
    other = copy.deepcopy(model)
    other.load_state_dict(permute_model(model, spec, torch.Generator().manual_seed(3)))
    return model, spec, batch, x, other


@torch.no_grad()
def _rel_err(model: nn.Module, ref: nn.Module, x: Tensor) -> float:
    model.eval()
    outs, refs = _tensors(model(x)), _tensors(ref(x))
    assert refs and len(outs) == len(refs)
    return max(float((o - r).abs().max() / r.abs().max()) for o, r in zip(outs, refs, strict=True))


@pytest.mark.parametrize("repair", ["none", "auto"])
@pytest.mark.parametrize("method", NOT_AVG)
@pytest.mark.parametrize("name", list(MODELS))
def test_permuted_copy_merges_back(name: str, method: str, repair: str) -> None:
    model, spec, batch, x, other = _case(name)
    cfg = MergeConfig(method=method, repair=repair, patience=1)
    result = merge_models([model, other], [batch], cfg, spec=spec)
    ref = model
    if repair != "none" and has_batchnorm(model):
        ref = copy.deepcopy(model)
        reset_batchnorm(ref, [batch], "cpu")
    assert _rel_err(result.model, ref, x) <= 1e-6


@pytest.mark.parametrize("name", list(MODELS))
def test_avg_does_not_recover_a_permuted_copy(name: str) -> None:
    """Negative control: the recovery test can fail."""
    model, spec, batch, x, other = _case(name)
    result = merge_models([model, other], [batch], MergeConfig("avg", repair="none"), spec=spec)
    assert _rel_err(result.model, model, x) > 1e-3


@pytest.mark.parametrize("method", ["mudsc-zip", "zipit"])
@pytest.mark.parametrize("name", list(MODELS))
def test_independent_inits_merge_to_finite_outputs(name: str, method: str) -> None:
    model, spec, batch, x, _ = _case(name)
    cfg = MergeConfig(method=method, patience=1, max_sweeps=2)
    result = merge_models([model, _model(name, 2)], [batch], cfg, spec=spec)
    with torch.no_grad():
        outs = _tensors(result.model.eval()(x))
    assert outs and all(torch.isfinite(o).all() for o in outs)


# -- alpha="auto" scores the model's output tensors ---------------------------------------


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "GPT2Model"])
def test_alpha_auto_scores_model_outputs_without_a_score_function(name: str) -> None:
    """The default score compares ``logits`` (else ``last_hidden_state``) of a ModelOutput."""
    model, spec, batch, _, _ = _case(name)
    models = [model, _model(name, 2)]
    held = MODELS[name][1](torch.Generator().manual_seed(7))
    grid = (0.2, 0.8)
    cfg = MergeConfig("mudsc-zip", alpha="auto", alpha_grid=grid, holdout=0.5, max_sweeps=2)
    result = merge_models(models, [batch, held], cfg, spec=spec)
    assert set(result.alpha_scores) == set(grid) and result.calibration_batches == 1
    key = "logits" if "logits" in model(held) else "last_hidden_state"
    with torch.no_grad():
        out = result.model(held)[key].flatten(1)
        cos = [nn.functional.cosine_similarity(out, m(held)[key].flatten(1)) for m in models]
    assert result.alpha_scores[result.alpha] == pytest.approx(float(torch.cat(cos).mean()))


def test_output_features_of_tuples_dicts_and_model_outputs() -> None:
    a, b = torch.randn(2, 3), torch.randn(2, 2, 2)
    ints = torch.ones(2, 4, dtype=torch.long)
    assert torch.equal(output_features(a), a)
    assert torch.equal(output_features((a, ints, [b])), torch.cat([a, b.flatten(1)], 1))
    assert torch.equal(output_features({"x": b, "logits": a}), a)
    hf_out = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=b, hidden_states=(a,))
    assert torch.equal(output_features(hf_out), b.flatten(1))
    with pytest.raises(MudscError, match="score_fn"):
        output_features((ints,))


def test_partial_merge_of_a_batch_bound_export_graph_is_refused_up_front() -> None:
    """BERT's exported graph reshapes to the example's batch size: one clear line, no work."""
    torch.manual_seed(0)
    models = [bert(transformers.BertForSequenceClassification).eval() for _ in range(2)]
    batches = [torch.randint(0, VOCAB, (4, 6))]
    cfg = MergeConfig(method="zipit", repair="none", stop_at="bert.encoder.layer.0")
    with pytest.raises(MudscError, match="only runs at the example's batch size"):
        merge_models(models, batches, cfg)
