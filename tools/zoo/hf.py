"""Hugging Face ``transformers`` models in the zoo: ``hf_bert``, ``hf_gpt2``, ``hf_resnet50``,
``hf_mobilenet_v2``, ``hf_vit``, built from config objects with random weights (never
``from_pretrained``) and wrapped to return a plain tensor. They need the optional ``hf`` extra;
``transformers`` is imported only when one is built.
"""

from __future__ import annotations

import torch
from torch import nn

from optc.tools.zoo.cnn import _init_fan_in
from optc.tools.zoo.registry import _image_inputs, _register, _token_and_mask_inputs, _token_inputs


# --------------------------------------------------------------------------- hugging face


class _HFAdapter(nn.Module):
    """Wraps a transformers model: keyword call, plain tensor output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class _HFBert(_HFAdapter):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state


class _HFGPT2(_HFAdapter):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


class _HFImageClassifier(_HFAdapter):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).logits


def _hf_attention_kwargs(attention: str) -> dict:
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"attention={attention!r} is not one of 'eager', 'sdpa'")
    return {"attn_implementation": attention}


def _build_hf_bert(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                   intermediate_size: int, max_positions: int, seq_len: int,
                   attention: str) -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_positions, **_hf_attention_kwargs(attention),
    )
    return _HFBert(transformers.BertModel(config, add_pooling_layer=False))


def _build_hf_gpt2(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                   max_positions: int, seq_len: int, attention: str) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
        n_positions=max_positions, use_cache=False, bos_token_id=min(50256, vocab_size - 1),
        eos_token_id=min(50256, vocab_size - 1), **_hf_attention_kwargs(attention),
    )
    return _HFGPT2(transformers.GPT2LMHeadModel(config))


def _build_hf_resnet50(*, width: float, image_size: int, num_classes: int) -> nn.Module:
    import transformers

    base = max(1, int(round(64 * width)))
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=base, hidden_sizes=[base * 4, base * 8, base * 16, base * 32],
        depths=[3, 4, 6, 3], layer_type="bottleneck", hidden_act="relu",
        downsample_in_first_stage=False, num_labels=num_classes,
    )
    model = transformers.ResNetForImageClassification(config)
    # Same init as the native resnet; HF's fan-out init with identity BN grows
    # activations block after block. Each block's branch is ``layer`` (a Sequential
    # of ResNetConvLayer: convolution, normalization, activation).
    blocks = [m for m in model.modules()
              if type(m).__name__ in ("ResNetBottleNeckLayer", "ResNetBasicLayer")]
    linear = [b.layer[-1].convolution for b in blocks]
    linear += [m.convolution for m in model.modules() if type(m).__name__ == "ResNetShortCut"]
    _init_fan_in(model, [b.layer[-1].normalization for b in blocks], linear)
    return _HFImageClassifier(model)


def _build_hf_mobilenet_v2(*, width_mult: float, image_size: int, num_classes: int) -> nn.Module:
    import transformers

    config = transformers.MobileNetV2Config(
        num_channels=3, image_size=image_size, depth_multiplier=width_mult, num_labels=num_classes,
    )
    model = transformers.MobileNetV2ForImageClassification(config)
    # HF's default init drives activations to denormals; use the native model's init.
    blocks = [m for m in model.modules() if type(m).__name__ == "MobileNetV2InvertedResidual"]
    residual_bns = [b.reduce_1x1.normalization for b in blocks if b.use_residual]
    _init_fan_in(model, residual_bns, [b.reduce_1x1.convolution for b in blocks])
    return _HFImageClassifier(model)


def _build_hf_vit(*, image_size: int, patch_size: int, num_classes: int, hidden_size: int,
                  num_layers: int, num_heads: int, intermediate_size: int,
                  attention: str) -> nn.Module:
    import transformers

    config = transformers.ViTConfig(
        image_size=image_size, patch_size=patch_size, num_channels=3, hidden_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, num_labels=num_classes,
        **_hf_attention_kwargs(attention),
    )
    return _HFImageClassifier(transformers.ViTForImageClassification(config))


_HF = ("transformers",)
_HF_TEXT_TINY = {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                 "max_positions": 64, "seq_len": 16}

_register(
    "hf_bert", "transformers BertModel (BERT-base config, random weights) -> last_hidden_state",
    _build_hf_bert, _token_and_mask_inputs,
    {"vocab_size": 30522, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
     "intermediate_size": 3072, "max_positions": 512, "seq_len": 128, "attention": "eager"},
    {**_HF_TEXT_TINY, "intermediate_size": 128}, heavy=True, requires=_HF,
)
_register(
    "hf_gpt2", "transformers GPT2LMHeadModel (GPT-2 small config, use_cache=False) -> logits",
    _build_hf_gpt2, _token_inputs,
    {"vocab_size": 50257, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
     "max_positions": 1024, "seq_len": 128, "attention": "eager"},
    _HF_TEXT_TINY, heavy=True, requires=_HF,
)
_register(
    "hf_resnet50", "transformers ResNetForImageClassification (ResNet-50 config) -> logits",
    _build_hf_resnet50, _image_inputs,
    {"width": 1.0, "image_size": 224, "num_classes": 1000},
    {"width": 0.125, "image_size": 32, "num_classes": 10}, heavy=True, requires=_HF,
)
_register(
    "hf_mobilenet_v2", "transformers MobileNetV2ForImageClassification -> logits",
    _build_hf_mobilenet_v2, _image_inputs,
    {"width_mult": 1.0, "image_size": 224, "num_classes": 1000},
    {"width_mult": 0.35, "image_size": 32, "num_classes": 10}, heavy=False, requires=_HF,
)
_register(
    "hf_vit", "transformers ViTForImageClassification (ViT-B/16 config) -> logits",
    _build_hf_vit, _image_inputs,
    {"image_size": 224, "patch_size": 16, "num_classes": 1000, "hidden_size": 768,
     "num_layers": 12, "num_heads": 12, "intermediate_size": 3072, "attention": "eager"},
    {"image_size": 32, "patch_size": 8, "num_classes": 10, "hidden_size": 64, "num_layers": 2,
     "num_heads": 4, "intermediate_size": 128}, heavy=True, requires=_HF,
)
