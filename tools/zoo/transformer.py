"""The zoo's transformers in plain ``torch.nn``: ``bert`` (post-LN encoder), ``gpt`` (GPT-2
decoder, pre-LN, causal) and ``vit`` (ViT-B/16), with the ``attention``, ``norm`` and ``gelu``
options that write the same computation in the forms rewrite passes match (see the package).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optc.tools.zoo.registry import _image_inputs, _register, _token_and_mask_inputs, _token_inputs


# --------------------------------------------------------------------------- transformer parts

_ATTENTION = ("explicit", "sdpa")
_NORM = ("module", "decomposed")
_GELU = ("module", "module_tanh", "erf", "tanh")


def _check_options(attention: str, norm: str, gelu: str, hidden_size: int, num_heads: int) -> None:
    for key, value, valid in (("attention", attention, _ATTENTION), ("norm", norm, _NORM),
                              ("gelu", gelu, _GELU)):
        if value not in valid:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(map(repr, valid))}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")


class DecomposedLayerNorm(nn.Module):
    """LayerNorm over the last dim written as primitive ops (same parameters as nn.LayerNorm)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        super().__init__()
        self.normalized_shape = (normalized_shape,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        centered = x - mean
        var = centered.pow(2).mean(-1, keepdim=True)
        x = centered * torch.rsqrt(var + self.eps)
        return x * self.weight + self.bias


class ErfGELU(nn.Module):
    """Exact GELU written with erf, as Hugging Face BERT does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class TanhGELU(nn.Module):
    """Tanh-approximated GELU written out, as GPT-2 (Hugging Face ``NewGELUActivation``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "module" else DecomposedLayerNorm(dim, eps)


def _make_gelu(kind: str) -> nn.Module:
    if kind == "module":
        return nn.GELU()
    if kind == "module_tanh":
        return nn.GELU(approximate="tanh")
    return ErfGELU() if kind == "erf" else TanhGELU()


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections.

    ``mask`` is either an additive float mask broadcastable to (B, heads, T, T), or a
    bool mask where True means "may attend".
    """

    def __init__(self, hidden_size: int, num_heads: int, attention: str, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention = attention
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if self.attention == "explicit":
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                if mask.dtype == torch.bool:
                    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
                else:
                    scores = scores + mask
            probs = self.attn_dropout(torch.softmax(scores, dim=-1))
            ctx = torch.matmul(probs, v)
        else:
            p = self.attn_dropout.p if self.training else 0.0
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(ctx.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    """Linear, GELU, linear."""

    def __init__(self, hidden_size: int, intermediate_size: int, gelu: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = _make_gelu(gelu)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PostLNBlock(nn.Module):
    """BERT encoder layer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float,
                 eps: float, attention: str, norm: str, gelu: str):
        super().__init__()
        self.attn = SelfAttention(hidden_size, num_heads, attention, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_norm = _make_norm(norm, hidden_size, eps)
        self.ffn = FeedForward(hidden_size, intermediate_size, gelu)
        self.ffn_dropout = nn.Dropout(dropout)
        self.ffn_norm = _make_norm(norm, hidden_size, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, mask)))
        return self.ffn_norm(x + self.ffn_dropout(self.ffn(x)))


class PreLNBlock(nn.Module):
    """GPT-2 / ViT layer: x = x + attn(LN(x)); x = x + ffn(LN(x))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float,
                 eps: float, attention: str, norm: str, gelu: str):
        super().__init__()
        self.ln_1 = _make_norm(norm, hidden_size, eps)
        self.attn = SelfAttention(hidden_size, num_heads, attention, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.ln_2 = _make_norm(norm, hidden_size, eps)
        self.ffn = FeedForward(hidden_size, intermediate_size, gelu)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn_dropout(self.attn(self.ln_1(x), mask))
        return x + self.ffn_dropout(self.ffn(self.ln_2(x)))


def _init_transformer(model: nn.Module, residual_scale: float = 1.0) -> nn.Module:
    """1/sqrt(fan_in) linears and convs, 1/sqrt(dim) embeddings, random LayerNorm affine.

    ``residual_scale`` multiplies the output projections of attention and FFN (GPT-2's
    1/sqrt(2 * num_layers) for pre-LN models).
    """
    torch.manual_seed(0)  # weights must not depend on RNG use during construction
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, m.in_features**-0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.02)
        elif isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, 0.0, fan_in**-0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, m.embedding_dim**-0.5)
        elif isinstance(m, (nn.LayerNorm, DecomposedLayerNorm)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SelfAttention):
                m.out.weight.mul_(residual_scale)
            elif isinstance(m, FeedForward):
                m.fc2.weight.mul_(residual_scale)
    return model


# --------------------------------------------------------------------------- bert


class BertEmbeddings(nn.Module):
    """Word + position + token-type (all type 0) embeddings, LayerNorm, dropout."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, type_vocab_size: int,
                 dropout: float, eps: float, norm: str):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = _make_norm(norm, hidden_size, eps)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions)[None, :], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = self.position_ids[:, : input_ids.shape[1]]
        token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.dropout(self.norm(x))


class Bert(nn.Module):
    """BERT encoder; forward(input_ids, attention_mask) -> hidden or (hidden, pooled)."""

    def __init__(self, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_positions: int, type_vocab_size: int,
                 dropout: float, layer_norm_eps: float, attention: str, norm: str, gelu: str,
                 pooler: bool):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_positions, type_vocab_size,
                                         dropout, layer_norm_eps, norm)
        self.layers = nn.ModuleList(
            PostLNBlock(hidden_size, num_heads, intermediate_size, dropout, layer_norm_eps,
                        attention, norm, gelu)
            for _ in range(num_layers)
        )
        self.pooler = nn.Linear(hidden_size, hidden_size) if pooler else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        x = self.embeddings(input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        if self.pooler is None:
            return x
        return x, torch.tanh(self.pooler(x[:, 0]))


def _build_bert(*, seq_len: int, **cfg: Any) -> nn.Module:
    _check_options(cfg["attention"], cfg["norm"], cfg["gelu"], cfg["hidden_size"], cfg["num_heads"])
    if seq_len > cfg["max_positions"]:
        raise ValueError(f"seq_len {seq_len} > max_positions {cfg['max_positions']}")
    return _init_transformer(Bert(**cfg))


# --------------------------------------------------------------------------- gpt


class GPT(nn.Module):
    """GPT-2 decoder; forward(input_ids) -> logits (B, T, vocab_size); tied LM head."""

    def __init__(self, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_positions: int, dropout: float,
                 layer_norm_eps: float, attention: str, norm: str, gelu: str):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden_size)
        self.wpe = nn.Embedding(max_positions, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PreLNBlock(hidden_size, num_heads, intermediate_size, dropout, layer_norm_eps,
                       attention, norm, gelu)
            for _ in range(num_layers)
        )
        self.ln_f = _make_norm(norm, hidden_size, layer_norm_eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.register_buffer("position_ids", torch.arange(max_positions), persistent=False)
        causal = torch.tril(torch.ones(max_positions, max_positions, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.drop(self.wte(input_ids) + self.wpe(self.position_ids[:t]))
        mask = self.causal_mask[:t, :t]
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))


def _build_gpt(*, seq_len: int, **cfg: Any) -> nn.Module:
    _check_options(cfg["attention"], cfg["norm"], cfg["gelu"], cfg["hidden_size"], cfg["num_heads"])
    if seq_len > cfg["max_positions"]:
        raise ValueError(f"seq_len {seq_len} > max_positions {cfg['max_positions']}")
    model = GPT(**cfg)
    return _init_transformer(model, residual_scale=(2 * cfg["num_layers"]) ** -0.5)


# --------------------------------------------------------------------------- vit


class ViT(nn.Module):
    """Vision Transformer; forward(images) -> logits (B, num_classes) from the cls token."""

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int, num_classes: int,
                 hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                 dropout: float, layer_norm_eps: float, attention: str, norm: str, gelu: str):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, hidden_size))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PreLNBlock(hidden_size, num_heads, intermediate_size, dropout, layer_norm_eps,
                       attention, norm, gelu)
            for _ in range(num_layers)
        )
        self.norm = _make_norm(norm, hidden_size, layer_norm_eps)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def _build_vit(**cfg: Any) -> nn.Module:
    _check_options(cfg["attention"], cfg["norm"], cfg["gelu"], cfg["hidden_size"], cfg["num_heads"])
    model = _init_transformer(ViT(**cfg), residual_scale=(2 * cfg["num_layers"]) ** -0.5)
    with torch.no_grad():
        model.cls_token.normal_(0.0, cfg["hidden_size"] ** -0.5)
        model.pos_embed.normal_(0.0, cfg["hidden_size"] ** -0.5)
    return model


_TRANSFORMER_TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
                     "seq_len": 16}


_register(
    "bert", "BERT-base encoder, inputs input_ids and attention_mask (B, 128) int64",
    _build_bert, _token_and_mask_inputs,
    {"vocab_size": 30522, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
     "intermediate_size": 3072, "seq_len": 128, "max_positions": 512, "type_vocab_size": 2,
     "dropout": 0.1, "layer_norm_eps": 1e-12, "attention": "explicit", "norm": "module",
     "gelu": "module", "pooler": False},
    {**_TRANSFORMER_TINY, "vocab_size": 1000, "max_positions": 64}, heavy=True,
)
_register(
    "gpt", "GPT-2 small decoder (pre-LN, causal), input input_ids (B, 128) int64 -> logits",
    _build_gpt, _token_inputs,
    {"vocab_size": 50257, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
     "intermediate_size": 3072, "seq_len": 128, "max_positions": 1024, "dropout": 0.1,
     "layer_norm_eps": 1e-5, "attention": "explicit", "norm": "module", "gelu": "tanh"},
    {**_TRANSFORMER_TINY, "vocab_size": 1000, "max_positions": 64}, heavy=True,
)
_register(
    "vit", "ViT-B/16 (pre-LN, cls token), input (B, 3, 224, 224) -> logits",
    _build_vit, _image_inputs,
    {"image_size": 224, "patch_size": 16, "in_channels": 3, "num_classes": 1000,
     "hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
     "dropout": 0.1, "layer_norm_eps": 1e-6, "attention": "explicit", "norm": "module",
     "gelu": "module"},
    {"image_size": 32, "patch_size": 8, "num_classes": 10, "hidden_size": 64, "num_layers": 2,
     "num_heads": 4, "intermediate_size": 128}, heavy=True,
)
