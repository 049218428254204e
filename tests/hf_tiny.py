"""Tiny random-init Hugging Face models that several test files build (never downloaded).

``transformers`` is imported inside each builder, so a test module can import these names
before it decides (with ``pytest.importorskip``) whether its Hugging Face tests run.
"""

from __future__ import annotations

from torch import nn

VOCAB = 30


def bert(cls: type) -> nn.Module:
    import transformers

    return cls(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16, num_labels=3,
    ))  # fmt: skip


def vit(cls: type) -> nn.Module:
    import transformers

    return cls(transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, num_labels=3,
    ))  # fmt: skip


def gpt2(cls: type) -> nn.Module:
    import transformers

    return cls(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    ))  # fmt: skip
