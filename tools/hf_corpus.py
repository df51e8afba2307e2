"""A corpus of real model code: HF transformers architectures built from small configs.

The models users bring are written with idioms optc's own zoo never uses (float32 softmax
upcasts, RMSNorm, rotary embeddings, grouped-query attention, run-time masks, in-place cache
writes, MoE routing). Every entry here builds a transformers model from a small config (random
weights, nothing downloaded), in eval mode, with eager attention (the code as written; transformers'
default SDPA hides it), and gives its norms non-trivial statistics (scale ``1 + 0.2 N(0,1)``,
shift ``0.1 N(0,1)``, Gemma's zero-centred weights ``0.2 N(0,1)``) so that a norm computed wrongly
changes the output.

    from optc.tools import hf_corpus
    model, inputs = hf_corpus.build("llama")          # nn.Module, tuple of example inputs
    hf_corpus.names()                                 # every entry; hf_corpus.ENTRIES[name] for its facts

From the command line an entry is ``optc.tools.hf_corpus:llama`` (``package.module:factory``).
Each call builds the model with the same seed, so two builds are identical. Needs the ``hf`` extra
(``pip install optc[hf]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["Entry", "ENTRIES", "names", "build", "is_available"]

SEQ = 16
VOCAB = 512
_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str                    # encoder | decoder | encoder-decoder | vision | audio
    make: Callable[[], tuple[nn.Module, tuple]]
    softmax_attention: bool = True    # has hand-written softmax attention (eager)
    rms_norm: bool = False            # normalises with RMSNorm
    idioms: tuple[str, ...] = ()      # what it exercises, for test names and docs
    #: why fuse-attention must refuse this architecture's attention, a phrase of the refusal
    #: (Gemma-2's logit soft-capping has no SDPA form); None: every softmax attention fuses
    attention_refusal: str | None = None
    rotary: bool = False              # applies rotary position embeddings


class _Out(nn.Module):
    """Calls a transformers model the way a user does and returns one tensor."""

    def __init__(self, model: nn.Module, key: str = "last_hidden_state", **call_kwargs: Any):
        super().__init__()
        self.model, self.key, self.call_kwargs = model, key, call_kwargs

    def forward(self, *inputs):
        out = self.model(*inputs, **self.call_kwargs)
        return out[self.key] if isinstance(out, dict) or hasattr(out, "keys") else out[0]


class _EncDec(nn.Module):
    def __init__(self, model: nn.Module, first: str = "input_ids"):
        super().__init__()
        self.model, self.first = model, first

    def forward(self, x, decoder_input_ids):
        return self.model(**{self.first: x}, decoder_input_ids=decoder_input_ids).last_hidden_state


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        from optc.errors import OptcError
        raise OptcError(f"the HF corpus needs transformers: pip install optc[hf] ({e})") from None
    return transformers


def is_available() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


# transformers' attn_implementation the builders use (build(name, attention=...) sets it)
_ATTENTION = ["eager"]


def _ids(batch: int = 1, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _pixels(size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))


def realistic_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every norm non-trivial statistics (in place; the model is ours, freshly built)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            cls = type(module).__name__
            if not ("Norm" in cls or isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))):
                continue
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and w.is_floating_point():
                centred = bool(torch.all(w == 0))     # Gemma-style (1 + w) weights start at 0
                w.copy_((0.0 if centred else 1.0) + 0.2 * torch.randn(w.shape, generator=gen))
            b = getattr(module, "bias", None)
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
    return model


def _finish(model: nn.Module, wrapper: nn.Module, inputs: tuple) -> tuple[nn.Module, tuple]:
    realistic_norms(model)
    model.eval()
    return wrapper.eval(), inputs


def _text(model_cls: str, config_cls: str, *, call: dict | None = None, **config: Any) -> Callable:
    def make():
        T = _transformers()
        torch.manual_seed(0)
        cfg = getattr(T, config_cls)(**{"vocab_size": VOCAB, "attn_implementation": _ATTENTION[0], **config})
        model = getattr(T, model_cls)(cfg)
        return _finish(model, _Out(model, **(call or {})), (_ids(),))
    return make


def _decoder(model_cls: str, config_cls: str, **config: Any) -> Callable:
    return _text(model_cls, config_cls, **{**_TEXT, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **config})


def _encdec(model_cls: str, config_cls: str, **config: Any) -> Callable:
    def make():
        T = _transformers()
        torch.manual_seed(0)
        cfg = getattr(T, config_cls)(**{"vocab_size": VOCAB, "attn_implementation": _ATTENTION[0], "pad_token_id": 0,
                                        "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2, **config})
        model = getattr(T, model_cls)(cfg)
        return _finish(model, _EncDec(model), (_ids(), _ids(seq=8, seed=1)))
    return make


def _vision(model_cls: str, config_cls: str, size: int = 32, **config: Any) -> Callable:
    def make():
        T = _transformers()
        torch.manual_seed(0)
        cfg = getattr(T, config_cls)(**config)
        if hasattr(cfg, "_attn_implementation") and "attn_implementation" not in config:
            cfg._attn_implementation = _ATTENTION[0]
        model = getattr(T, model_cls)(cfg)
        return _finish(model, _Out(model), (_pixels(size, config.get("num_channels", 3)),))
    return make


def _whisper():
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_source_positions=16, max_target_positions=32,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                          attn_implementation=_ATTENTION[0])
    model = T.WhisperModel(cfg)
    feats = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    return _finish(model, _EncDec(model, first="input_features"), (feats, _ids(seq=8, seed=1)))


def _wav2vec2():
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=4, attn_implementation=_ATTENTION[0])
    model = T.Wav2Vec2Model(cfg)
    audio = torch.randn(1, 400, generator=torch.Generator().manual_seed(0))
    return _finish(model, _Out(model), (audio,))


def _clip_text():
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=32, attn_implementation=_ATTENTION[0])
    model = T.CLIPTextModel(cfg)
    return _finish(model, _Out(model), (_ids(),))


_LLAMA = dict(num_key_value_heads=2)


def _rope(partial: float) -> dict:
    return {"rope_theta": 10000.0, "partial_rotary_factor": partial, "rope_type": "default"}


ENTRIES: dict[str, Entry] = {e.name: e for e in [
    # encoders
    Entry("bert", "encoder", _text("BertModel", "BertConfig", **_TEXT, max_position_embeddings=64),
          idioms=("softmax attention", "additive padding mask")),
    Entry("roberta", "encoder", _text("RobertaModel", "RobertaConfig", **_TEXT, max_position_embeddings=64,
                                      pad_token_id=1), idioms=("cumsum position ids",)),
    Entry("distilbert", "encoder", _text("DistilBertModel", "DistilBertConfig", dim=64, n_layers=2, n_heads=4,
                                         hidden_dim=128, max_position_embeddings=64), idioms=("masked_fill mask",)),
    Entry("albert", "encoder", _text("AlbertModel", "AlbertConfig", **_TEXT, embedding_size=32,
                                     max_position_embeddings=64), idioms=("shared layers",)),
    Entry("electra", "encoder", _text("ElectraModel", "ElectraConfig", **_TEXT, embedding_size=32,
                                      max_position_embeddings=64)),
    Entry("deberta_v2", "encoder", _text("DebertaV2Model", "DebertaV2Config", **_TEXT, max_position_embeddings=64,
                                         relative_attention=True, position_buckets=16, max_relative_positions=32),
          idioms=("disentangled relative attention",)),
    Entry("mpnet", "encoder", _text("MPNetModel", "MPNetConfig", **_TEXT, max_position_embeddings=64),
          idioms=("relative position bias",)),
    # decoder LLM families
    Entry("gpt2", "decoder", _text("GPT2Model", "GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=64),
          idioms=("Conv1D projections", "causal mask buffer")),
    Entry("gpt_neo", "decoder", _text("GPTNeoModel", "GPTNeoConfig", hidden_size=64, num_layers=2, num_heads=4,
                                      attention_types=[[["global", "local"], 1]], window_size=8,
                                      max_position_embeddings=64), idioms=("local attention window", "no scaling")),
    Entry("gpt_neox", "decoder", _decoder("GPTNeoXModel", "GPTNeoXConfig", rope_parameters=_rope(0.5)),
          idioms=("partial rotary", "parallel residual"), rotary=True),
    Entry("gptj", "decoder", _text("GPTJModel", "GPTJConfig", n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                   n_positions=64), idioms=("rotate_every_two (interleaved) rotary",), rotary=True),
    Entry("opt", "decoder", _decoder("OPTModel", "OPTConfig", ffn_dim=128, max_position_embeddings=64,
                                     word_embed_proj_dim=64), idioms=("scale on q",)),
    Entry("bloom", "decoder", _text("BloomModel", "BloomConfig", hidden_size=64, n_layer=2, n_head=4),
          idioms=("ALiBi", "baddbmm")),
    Entry("falcon", "decoder", _text("FalconModel", "FalconConfig", hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4), idioms=("multi-query attention", "negative index",
                                                                     "empty cache cat"), rotary=True),
    Entry("llama", "decoder", _decoder("LlamaModel", "LlamaConfig", **_LLAMA), rms_norm=True,
          idioms=("RMSNorm", "rotate_half rotary", "GQA expand+reshape", "SwiGLU"), rotary=True),
    Entry("mistral", "decoder", _decoder("MistralModel", "MistralConfig", **_LLAMA, sliding_window=8), rms_norm=True,
          idioms=("sliding-window mask",), rotary=True),
    Entry("qwen2", "decoder", _decoder("Qwen2Model", "Qwen2Config", **_LLAMA), rms_norm=True,
          idioms=("qkv bias",), rotary=True),
    Entry("qwen3", "decoder", _decoder("Qwen3Model", "Qwen3Config", **_LLAMA, head_dim=16), rms_norm=True,
          idioms=("q/k RMSNorm",), rotary=True),
    Entry("gemma", "decoder", _decoder("GemmaModel", "GemmaConfig", **_LLAMA, head_dim=16), rms_norm=True,
          idioms=("(1 + w) RMSNorm", "GeGLU", "embedding scale"), rotary=True),
    Entry("gemma2", "decoder", _decoder("Gemma2Model", "Gemma2Config", **_LLAMA, head_dim=16, sliding_window=8),
          rms_norm=True, idioms=("logit soft-capping", "alternating sliding window"),
          attention_refusal="soft-caps the scores", rotary=True),
    Entry("phi", "decoder", _decoder("PhiModel", "PhiConfig", num_key_value_heads=4, rope_parameters=_rope(0.5)),
          idioms=("partial rotary", "parallel attention/MLP"), rotary=True),
    Entry("phi3", "decoder", _decoder("Phi3Model", "Phi3Config", **_LLAMA), rms_norm=True,
          idioms=("fused qkv", "fused gate_up", "zero-width rotary pass-through"), rotary=True),
    Entry("olmo", "decoder", _decoder("OlmoModel", "OlmoConfig"), idioms=("non-parametric layer norm",), rotary=True),
    Entry("stablelm", "decoder", _decoder("StableLmModel", "StableLmConfig", num_key_value_heads=4,
                                                rope_parameters=_rope(0.25)),
          idioms=("partial rotary",), rotary=True),
    Entry("gpt_bigcode", "decoder", _text("GPTBigCodeModel", "GPTBigCodeConfig", n_embd=64, n_layer=2, n_head=4,
                                          n_positions=64, multi_query=True), idioms=("multi-query attention",)),
    Entry("mixtral", "decoder", _decoder("MixtralModel", "MixtralConfig", **_LLAMA, num_local_experts=4,
                                         num_experts_per_tok=2), rms_norm=True,
          idioms=("MoE top-k routing", "grouped_mm_fallback", "histc", "index_put"), rotary=True),
    # encoder-decoders
    Entry("t5", "encoder-decoder", _encdec("T5Model", "T5Config", d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8), rms_norm=True,
          idioms=("relative position bias", "no scaling", "float() round trips")),
    Entry("bart", "encoder-decoder", _encdec("BartModel", "BartConfig", d_model=64, encoder_layers=2, decoder_layers=2,
                                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                             decoder_ffn_dim=128, max_position_embeddings=64),
          idioms=("shift_tokens_right copy_", "bmm attention")),
    Entry("mbart", "encoder-decoder", _encdec("MBartModel", "MBartConfig", d_model=64, encoder_layers=2,
                                              decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                              encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64),
          idioms=("pre-LN", "bmm attention")),
    Entry("whisper", "audio", _whisper, idioms=("conv1d front end", "encoder-decoder")),
    # vision
    Entry("vit", "vision", _vision("ViTModel", "ViTConfig", image_size=32, patch_size=8, **_TEXT)),
    Entry("deit", "vision", _vision("DeiTModel", "DeiTConfig", image_size=32, patch_size=8, **_TEXT),
          idioms=("distillation token",)),
    Entry("beit", "vision", _vision("BeitModel", "BeitConfig", image_size=32, patch_size=8, **_TEXT,
                                    use_relative_position_bias=True), idioms=("relative position bias",)),
    Entry("swin", "vision", _vision("SwinModel", "SwinConfig", size=64, image_size=64, embed_dim=16, depths=[1, 1],
                                    num_heads=[2, 4], window_size=4), idioms=("window attention", "shifted windows")),
    Entry("clip_vision", "vision", _vision("CLIPVisionModel", "CLIPVisionConfig", image_size=32, patch_size=8, **_TEXT),
          idioms=("quick GELU", "pre-LN")),
    Entry("clip_text", "encoder", _clip_text, idioms=("causal mask", "quick GELU")),
    Entry("siglip_vision", "vision", _vision("SiglipVisionModel", "SiglipVisionConfig", image_size=32, patch_size=8,
                                             **_TEXT), idioms=("attention pooling head",)),
    Entry("segformer", "vision", _vision("SegformerModel", "SegformerConfig", size=64, num_encoder_blocks=2,
                                         depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                         num_attention_heads=[1, 2], mlp_ratios=[2, 2], patch_sizes=[7, 3],
                                         strides=[4, 2], decoder_hidden_size=32),
          idioms=("spatial-reduction attention", "depthwise conv MLP")),
    Entry("dinov2", "vision", _vision("Dinov2Model", "Dinov2Config", image_size=32, patch_size=8, **_TEXT),
          idioms=("layer scale", "interpolated position embeddings")),
    Entry("convnext", "vision", _vision("ConvNextModel", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32],
                                        depths=[1, 1]), softmax_attention=False,
          idioms=("channels-last layer norm", "depthwise 7x7")),
    Entry("wav2vec2", "audio", _wav2vec2, idioms=("conv feature extractor", "weight-normed positional conv")),
]}


class LlamaDecodeStep(nn.Module):
    """One decode step of a Llama-family decoder with its key/value cache as tensors: the new
    token(s) ``ids`` ``[B, S]`` and the cache of the ``past`` earlier ones, ``past_k`` / ``past_v``
    ``[layers, B, kv_heads, past, head_dim]``; returns the hidden state of the new tokens and the
    grown cache (``past + S`` positions). transformers' ``DynamicCache`` is built inside, so the
    captured graph takes and returns plain tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, past_k, past_v):
        T = _transformers()
        cache = T.DynamicCache(config=self.model.config)
        for i in range(past_k.shape[0]):
            cache.update(past_k[i], past_v[i], i)
        past = past_k.shape[3]
        pos = torch.arange(past, past + ids.shape[1], device=ids.device).unsqueeze(0)
        out = self.model(input_ids=ids, cache=cache, use_cache=True, position_ids=pos)
        layers = out.past_key_values.layers
        return (out.last_hidden_state, torch.stack([c.keys for c in layers]),
                torch.stack([c.values for c in layers]))


def llama_decode(past: int = 7) -> tuple[nn.Module, tuple, tuple]:
    """``(LlamaDecodeStep, (ids, past_k, past_v), dynamic_shapes)`` of the corpus's Llama, with
    one new token and a dynamic past length (``Dim.DYNAMIC``: torch.export cannot prove a guard
    that HF's cache code makes over a named range)."""
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{"vocab_size": VOCAB, "attn_implementation": _ATTENTION[0], **_TEXT, **_LLAMA})
    model = T.LlamaModel(cfg)
    realistic_norms(model)
    step = LlamaDecodeStep(model.eval()).eval()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, past, head_dim)
    g = torch.Generator().manual_seed(1)
    inputs = (_ids(seq=1), torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    d = torch.export.Dim.DYNAMIC
    return step, inputs, (None, {3: d}, {3: d})


def names(kind: str | None = None) -> list[str]:
    return [n for n, e in ENTRIES.items() if kind is None or e.kind == kind]


def build(name: str, attention: str = "eager") -> tuple[nn.Module, tuple]:
    """``(model, example_inputs)`` of corpus entry ``name``. ``attention``: transformers'
    ``attn_implementation`` -- ``"eager"`` (the attention written out, what the fusions are
    tested on) or ``"sdpa"`` (transformers' default: ``scaled_dot_product_attention`` calls)."""
    from optc.errors import OptcError
    if name not in ENTRIES:
        raise OptcError(f"unknown HF corpus entry '{name}' (valid: {', '.join(ENTRIES)})")
    if attention not in ("eager", "sdpa"):
        raise OptcError(f"attention must be 'eager' or 'sdpa', got {attention!r}")
    _ATTENTION[0] = attention
    try:
        return ENTRIES[name].make()
    finally:
        _ATTENTION[0] = "eager"


def __getattr__(name: str):
    """``optc.tools.hf_corpus:llama`` on the command line: a factory per entry."""
    if name in ENTRIES:
        return lambda: build(name)
    raise AttributeError(name)
