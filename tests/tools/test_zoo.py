"""Tests of optc.tools.zoo at tiny configs: build, run, determinism, torch.export, variants."""

from __future__ import annotations

import sys

import pytest
import torch

from optc.tools import zoo

NATIVE = ["mlp", "small_cnn", "resnet18", "resnet50", "mobilenet_v2", "bert", "gpt", "vit"]
HF = ["hf_bert", "hf_gpt2", "hf_resnet50", "hf_mobilenet_v2", "hf_vit"]
TRANSFORMERS = ["bert", "gpt", "vit"]


def _load(name: str, batch: int = 2, **overrides):
    return zoo.load(name, batch=batch, **{**zoo.tiny_config(name), **overrides})


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _scale(outs: tuple[torch.Tensor, ...]) -> float:
    return max(o.abs().max().item() for o in outs)


# --------------------------------------------------------------------------- registry


def test_registry_lists_all_models():
    assert zoo.names(include_unavailable=True) == NATIVE + HF
    assert zoo.names()[: len(NATIVE)] == NATIVE
    for name in zoo.names(include_unavailable=True):
        entry = zoo.get(name)
        assert isinstance(entry, zoo.ZooEntry)
        assert entry.name == name and entry.description
        assert isinstance(entry.heavy, bool)
        assert set(zoo.tiny_config(name)) == set(entry.default_config)


def test_heavy_flags():
    heavy = {n for n in NATIVE if zoo.get(n).heavy}
    assert heavy == {"resnet50", "bert", "gpt", "vit"}


def test_unknown_name_lists_valid_names():
    with pytest.raises(zoo.UnknownModelError) as info:
        zoo.get("resnet51")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "resnet51" in message
    assert all(name in message for name in NATIVE + HF)
    with pytest.raises(KeyError):
        zoo.load("resnet51")
    with pytest.raises(KeyError):
        zoo.tiny_config("resnet51")


def test_unknown_config_key_and_bad_option():
    with pytest.raises(TypeError, match="valid keys"):
        zoo.load("mlp", hiden=3)
    with pytest.raises(ValueError, match="attention"):
        zoo.get("bert").build(**{**zoo.tiny_config("bert"), "attention": "flash"})


def test_hf_models_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # find_spec -> None
    assert zoo.names() == NATIVE
    assert not zoo.is_available("hf_bert")
    with pytest.raises(zoo.ZooUnavailableError, match=r"hf_bert needs the 'hf' extra: pip install optc\[hf\]"):
        zoo.load("hf_bert", **zoo.tiny_config("hf_bert"))


def test_example_input_shapes_at_default_config():
    batch = 3
    expected = {
        "mlp": [((batch, 64), torch.float32)],
        "small_cnn": [((batch, 1, 8, 8), torch.float32)],
        "resnet18": [((batch, 3, 224, 224), torch.float32)],
        "resnet50": [((batch, 3, 224, 224), torch.float32)],
        "mobilenet_v2": [((batch, 3, 224, 224), torch.float32)],
        "bert": [((batch, 128), torch.int64)] * 2,
        "gpt": [((batch, 128), torch.int64)],
        "vit": [((batch, 3, 224, 224), torch.float32)],
    }
    for name, specs in expected.items():
        inputs = zoo.get(name).example_inputs(batch)
        assert isinstance(inputs, tuple)
        assert [(tuple(x.shape), x.dtype) for x in inputs] == specs, name
    ids, mask = zoo.get("bert").example_inputs(batch)
    assert mask[0].all() and not mask[1].all()  # later samples are padded


def test_build_leaves_global_rng_alone():
    state = torch.get_rng_state()
    _load("mlp")
    assert torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", zoo.names())
def test_tiny_model_runs_is_deterministic_and_exports(name):
    model, inputs = _load(name)
    assert not model.training
    with torch.no_grad():
        outs = _outputs(model(*inputs))
    assert all(torch.isfinite(o).all() for o in outs)
    scale = _scale(outs)
    assert 1e-2 < scale < 100, f"output scale {scale} is not O(1)"

    # A second build has bit-identical weights and inputs, hence the same outputs (up
    # to BLAS summation order, which may depend on threading and alignment).
    model2, inputs2 = _load(name)
    state, state2 = model.state_dict(), model2.state_dict()
    assert list(state) == list(state2)
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs2))
    with torch.no_grad():
        outs2 = _outputs(model2(*inputs2))
    assert all((a - b).abs().max().item() <= 1e-6 * scale for a, b in zip(outs, outs2))

    exported = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        got = _outputs(exported.module()(*inputs))
    assert len(got) == len(outs)
    for g, o in zip(got, outs):
        assert (g - o).abs().max().item() <= 1e-5 * scale


# --------------------------------------------------------------------------- transformer variants

VARIANTS = [
    # (option overrides, reference overrides): same math written two ways
    ({"attention": "sdpa"}, {"attention": "explicit"}),
    ({"norm": "decomposed"}, {"norm": "module"}),
    ({"gelu": "erf"}, {"gelu": "module"}),
    ({"gelu": "tanh"}, {"gelu": "module_tanh"}),
]


@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize("variant, reference", VARIANTS, ids=lambda d: "-".join(d.values()))
def test_transformer_variants_agree(name, variant, reference):
    model, inputs = _load(name, **variant)
    ref_model, _ = _load(name, **reference)
    ref_state = ref_model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        out, ref = model(*inputs), ref_model(*inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_rewritten_transformer_exports(name):
    extra = {"pooler": True} if name == "bert" else {}
    model, inputs = _load(name, attention="sdpa", norm="decomposed", gelu="tanh", **extra)
    exported = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        got, expected = _outputs(exported.module()(*inputs)), _outputs(model(*inputs))
    assert len(got) == len(expected) == (2 if extra else 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_bert_attention_mask_is_applied(attention):
    model, (ids, mask) = _load("bert", attention=attention)
    assert not mask[1].all()
    with torch.no_grad():
        masked = model(ids, mask)
        unmasked = model(ids, torch.ones_like(mask))
        # Changing a padded token leaves the unpadded positions unchanged.
        last = mask[1].sum()
        ids2 = ids.clone()
        ids2[1, last:] = (ids2[1, last:] + 1) % zoo.tiny_config("bert")["vocab_size"]
        masked2 = model(ids2, mask)
    torch.testing.assert_close(masked[0], unmasked[0])
    assert not torch.allclose(masked[1], unmasked[1])
    torch.testing.assert_close(masked2[1, :last], masked[1, :last], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_gpt_is_causal(attention):
    model, (ids,) = _load("gpt", attention=attention)
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % zoo.tiny_config("gpt")["vocab_size"]
    with torch.no_grad():
        out, out2 = model(ids), model(ids2)
    torch.testing.assert_close(out2[:, :-1], out[:, :-1], rtol=0, atol=1e-5)
    assert not torch.allclose(out2[:, -1], out[:, -1])


def test_bert_pooler_returns_hidden_and_pooled():
    model, inputs = _load("bert", pooler=True)
    plain, _ = _load("bert")
    with torch.no_grad():
        hidden, pooled = model(*inputs)
        expected_hidden = plain(*inputs)
    cfg = zoo.tiny_config("bert")
    assert pooled.shape == (2, cfg["hidden_size"]) and pooled.abs().max() <= 1
    torch.testing.assert_close(hidden, expected_hidden, rtol=0, atol=0)
