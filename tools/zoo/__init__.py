"""Model zoo: reference PyTorch models for testing and benchmarking optc.

Modules: :mod:`.registry` (the registry, loading, example inputs), :mod:`.cnn` (the MLP and
the CNNs), :mod:`.transformer` (BERT, GPT-2, ViT written in ``torch.nn``), :mod:`.hf` (Hugging
Face ``transformers`` models behind adapters). Importing this package registers every model, in
that order (the order of :func:`names`).

Every model is written in plain ``torch.nn`` (no torchvision), is built in ``eval()``
mode in fp32 with deterministic, seeded random weights (nothing is ever downloaded)
and can be captured with ``torch.export.export(model, inputs, strict=False)``.

Usage::

    from optc.tools import zoo

    zoo.names()                                   # ['mlp', 'small_cnn', 'resnet18', ...]
    model, inputs = zoo.load("resnet50")          # full size, batch 1
    model, inputs = zoo.load("bert", batch=4, attention="sdpa", num_layers=2)
    model, inputs = zoo.load("vit", **zoo.tiny_config("vit"))   # unit-test size
    out = model(*inputs)

Models
------
``mlp``
    3-layer MLP (ReLU, dropout), input ``(B, 64)``.
``small_cnn``
    conv-bn-relu x3 CNN for 8x8 grayscale digits (sklearn's digits), 10 classes;
    example inputs are in ``[0, 1)`` like digits scaled by 1/16.
``resnet18``, ``resnet50``
    torchvision's ResNet (BasicBlock / Bottleneck v1.5, same module names), with a
    ``width`` multiplier of the base width 64, ``image_size`` and ``num_classes``.
``mobilenet_v2``
    torchvision's MobileNetV2 (inverted residuals, depthwise convs, ReLU6),
    ``width_mult``, ``image_size``, ``num_classes``.
``bert``
    BERT encoder (BERT-base by default, post-LN), inputs ``input_ids`` and
    ``attention_mask`` (both int64 ``(B, seq_len)``); returns the last hidden state,
    or ``(hidden, pooled)`` with ``pooler=True``.
``gpt``
    GPT-2 decoder (GPT-2 small by default, pre-LN, causal mask from ``torch.tril``,
    tied LM head), input ``input_ids``; returns logits ``(B, seq_len, vocab_size)``.
``vit``
    ViT-B/16 (conv patch embedding, cls token, learned position embeddings, pre-LN);
    returns logits ``(B, num_classes)``.
``hf_bert``, ``hf_gpt2``, ``hf_resnet50``, ``hf_mobilenet_v2``, ``hf_vit``
    Hugging Face ``transformers`` models built from config objects with random
    weights (never ``from_pretrained``), wrapped to return a plain tensor. They need
    the optional ``hf`` extra; without it they are hidden from :func:`names` and
    building them raises :class:`ZooUnavailableError`.

The transformer models share three options selecting how the same computation is
written, so that rewrite passes have both forms to match; all variants of a model
built with the same config have identical weights (same ``state_dict``):

``attention``
    ``"explicit"``: ``softmax(q @ k.transpose(-1, -2) / sqrt(d) + mask) @ v`` with an
    (eval-mode) dropout on the probabilities, as Hugging Face BERT writes it;
    ``"sdpa"``: ``F.scaled_dot_product_attention``. q, k and v are always separate
    ``nn.Linear`` projections.
``norm``
    ``"module"``: ``nn.LayerNorm``; ``"decomposed"``: mean, sub, pow, mean, add eps,
    rsqrt, mul, mul weight, add bias written out.
``gelu``
    ``"module"``: ``nn.GELU()``; ``"module_tanh"``: ``nn.GELU(approximate="tanh")``;
    ``"erf"``: ``0.5 * x * (1 + erf(x / sqrt(2)))``; ``"tanh"``:
    ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`` (GPT-2's default).

Initialisation keeps activations finite and O(1) at any depth: convolutions use
Kaiming fan-in init; BatchNorm affine parameters and running statistics are random
and non-trivial (so BN folding is really tested), with the last BN of each residual
branch scaled down to gamma in ``[0.2, 0.5]``; linear layers use std ``1/sqrt(fan_in)``
(GPT-2 style ``1/sqrt(2 * num_layers)`` extra scaling on residual projections of
pre-LN models) and LayerNorm affine parameters are random too.
"""

# isort: off
# Importing a family registers its models; names() lists them in this order.
from optc.tools.zoo.registry import (UnknownModelError, ZooEntry, ZooUnavailableError, get, is_available, load,
                                     names, tiny_config)
from optc.tools.zoo import cnn  # noqa: F401
from optc.tools.zoo import transformer  # noqa: F401
from optc.tools.zoo import hf  # noqa: F401
# isort: on

__all__ = [
    "ZooEntry",
    "UnknownModelError",
    "ZooUnavailableError",
    "names",
    "get",
    "load",
    "tiny_config",
    "is_available",
]
