"""Op kinds of HF transformers models' idioms: rmsnorm, rotary, gqa_attention, inplace, embed,
moe, dtype_roundtrip, empty."""

from __future__ import annotations

import math

from optc.tools.fuzz.kinds.base import _divisors, _f, _numel, kind
from optc.tools.fuzz.spec import MAX_NUMEL


# Written the way transformers writes them (RMSNorm with a float32 upcast, rotary embeddings from
# an inv_freq buffer, grouped-query attention with run-time masks, in-place writes on fresh
# tensors, MoE routing, dtype round trips, empty cache tensors). The oracle's reference runs the
# model in float64 (``.double()``): every ``.float()`` / ``.to(torch.float32)`` below is undone by
# a ``.to(x.dtype)`` / ``.type_as(x)`` before its value meets a float64 weight, and integer
# indices are computed so that float32 and float64 agree on them (an arange, a cumsum of a
# comparison with an input-scale threshold, the argmax of a biased projection), never by
# rounding a float (``(x * 10).long()``).
_RMS_FORMS = ("llama", "gemma", "t5", "near_miss")


def _gen_rmsnorm(b, x):
    form = b.c.pick(_RMS_FORMS)
    # the near miss (eps outside the sqrt) differs from RMSNorm by about eps / rms: a large eps
    # makes a wrong fusion an error of order 1e-2, far above the oracle's floor
    eps = b.c.pick([1e-6, 1e-5, 1e-2]) if form != "near_miss" else b.c.pick([0.1, 1e-2])
    return (x,), {"form": form, "eps": eps}, b.shape(x)


def _emit_rmsnorm(op, i, a, shapes, out):
    p, x, D = op.p, a[0], shapes[0][-1]
    eps, f = repr(p["eps"]), p["form"]
    if f == "llama":      # LlamaRMSNorm (also Mistral, Qwen2, Phi-3, ...)
        return ([f"self.w{i} = nn.Parameter(_normal(g, ({D},), 0.2, 1.0))"],
                [f"t{i}h = {x}.to(torch.float32)",
                 f"t{i}v = t{i}h.pow(2).mean(-1, keepdim=True)",
                 f"t{i}h = t{i}h * torch.rsqrt(t{i}v + {eps})",
                 f"{out} = self.w{i} * t{i}h.to({x}.dtype)"])
    if f == "gemma":      # GemmaRMSNorm: zero-centred weight, (1 + w), computed in float32
        return ([f"self.w{i} = nn.Parameter(_normal(g, ({D},), 0.2))"],
                [f"t{i}h = {x}.float()",
                 f"t{i}h = t{i}h * torch.rsqrt(t{i}h.pow(2).mean(-1, keepdim=True) + {eps})",
                 f"t{i}h = t{i}h * (1.0 + self.w{i}.float())",
                 f"{out} = t{i}h.type_as({x})"])
    if f == "t5":         # T5LayerNorm without the upcast
        return ([f"self.w{i} = nn.Parameter(_normal(g, ({D},), 0.2, 1.0))"],
                [f"{out} = self.w{i} * {x} * torch.rsqrt({x}.pow(2).mean(-1, keepdim=True) + {eps})"])
    return ([f"self.w{i} = nn.Parameter(_normal(g, ({D},), 0.2, 1.0))"],       # NOT RMSNorm: eps outside
            [f"t{i}v = {x}.pow(2).mean(-1, keepdim=True)",
             f"{out} = self.w{i} * ({x} / (torch.sqrt(t{i}v) + {eps}))"])


kind("rmsnorm", ranks=(2, 3, 4), weight=1.0, doc="RMSNorm as HF writes it (llama, gemma, t5) and a near miss")(
    (_gen_rmsnorm, _emit_rmsnorm))


def _gen_rotary(b, x):
    s = b.shape(x)
    if len(s) == 3:          # (N, L, D) viewed as heads (N, h, L, d)
        N, L, D = s
        heads = [h for h in _divisors(D) if (D // h) % 2 == 0]
        if not heads:
            return None
        h = b.c.pick(heads)
        d = D // h
    else:                    # (N, h, L, d): already split into heads
        N, h, L, d = s
        if d % 2:
            return None
    form = b.c.pick(["rotate_half", "interleaved"])
    rot = b.c.pick(["full", "partial", "partial_all"])
    partial = list(range(2, d, 2))
    if rot == "partial" and not partial:
        rot = "partial_all"
    r = b.c.pick(partial) if rot == "partial" else d     # partial_all: r == d, x[..., d:] is zero-width (Phi-3)
    return (x,), {"heads": h, "form": form, "rot": rot, "r": r,
                  "freqs": b.c.pick(["matmul", "einsum"])}, s


def _emit_rotary(op, i, a, shapes, out):
    p, x, s = op.p, a[0], shapes[0]
    h, r = p["heads"], p["r"]
    if len(s) == 3:
        N, L, D = s
        d = D // h
    else:
        N, _, L, d = s
    init = [f'self.register_buffer("inv_freq{i}", 1.0 / (10000 ** (torch.arange(0, {r}, 2, dtype=torch.int64)'
            f'.float() / {r})), persistent=False)']
    fwd = [f"t{i}q = {x}.reshape({N}, {L}, {h}, {d}).transpose(1, 2)" if len(s) == 3 else f"t{i}q = {x}",
           f"t{i}pos = torch.arange({L}, device={x}.device)[None, :]"]
    if p["freqs"] == "matmul":   # LlamaRotaryEmbedding.forward
        fwd += [f"t{i}if = self.inv_freq{i}[None, :, None].float().expand(t{i}pos.shape[0], -1, 1)",
                f"t{i}f = (t{i}if.float() @ t{i}pos[:, None, :].float()).transpose(1, 2)"]
    else:                        # the older einsum form
        fwd += [f't{i}f = torch.einsum("i,j->ij", t{i}pos[0].float(), self.inv_freq{i}.float())[None]']
    if p["form"] == "rotate_half":
        fwd += [f"t{i}e = torch.cat((t{i}f, t{i}f), dim=-1)",
                f"t{i}cos = t{i}e.cos().to(dtype={x}.dtype).unsqueeze(1)",
                f"t{i}sin = t{i}e.sin().to(dtype={x}.dtype).unsqueeze(1)"]
    else:                        # GPT-J / GLM: every two channels rotate together
        fwd += [f"t{i}cos = t{i}f.cos().repeat_interleave(2, dim=-1).to({x}.dtype).unsqueeze(1)",
                f"t{i}sin = t{i}f.sin().repeat_interleave(2, dim=-1).to({x}.dtype).unsqueeze(1)"]
    if p["rot"] == "full":
        fwd.append(f"t{i}r = t{i}q")
    else:
        fwd.append(f"t{i}r, t{i}p = t{i}q[..., :{r}], t{i}q[..., {r}:]")
    if p["form"] == "rotate_half":
        fwd += [f"t{i}x1 = t{i}r[..., : t{i}r.shape[-1] // 2]", f"t{i}x2 = t{i}r[..., t{i}r.shape[-1] // 2 :]",
                f"t{i}h = torch.cat((-t{i}x2, t{i}x1), dim=-1)"]
    else:
        fwd.append(f"t{i}h = torch.stack((-t{i}r[..., 1::2], t{i}r[..., ::2]), dim=-1).flatten(-2)")
    fwd.append(f"t{i}y = (t{i}r * t{i}cos) + (t{i}h * t{i}sin)")
    if p["rot"] != "full":
        fwd.append(f"t{i}y = torch.cat((t{i}y, t{i}p), dim=-1)")
    fwd.append(f"{out} = t{i}y.transpose(1, 2).reshape({N}, {L}, {h * d})" if len(s) == 3 else f"{out} = t{i}y")
    return init, fwd


kind("rotary", ranks=(3, 4), weight=1.5, doc="rotary position embeddings (rotate_half, interleaved, partial)")(
    (_gen_rotary, _emit_rotary))

_GQA_MASKS = ("causal", "none", "sliding", "padding", "causal_padding")


def _gen_gqa_attention(b, x):
    N, L, D = b.shape(x)
    heads = [h for h in _divisors(D) if h >= 2]
    if not heads:
        return None
    h = b.c.pick(heads)
    kv = b.c.pick([k for k in _divisors(h) if k < h][::-1])     # fewer key/value heads (1: multi-query)
    form = b.c.pick(["eager", "sdpa"])
    mask = b.c.pick(_GQA_MASKS)
    window = b.c.pick([2, 3, 1])
    alibi = b.c.flag(25)
    if mask == "none":
        apply = "none"
    elif form == "eager":
        apply = b.c.pick(["where", "additive", "masked_fill"])
    else:
        apply = b.c.pick(["bool", "additive"] + (["is_causal"] if mask == "causal" else []))
        if alibi and apply != "additive":
            apply = "additive"             # a float bias and a bool mask: SDPA takes one float mask
    if N * h * L * L > MAX_NUMEL:
        return None
    return (x,), {"heads": h, "kv": kv, "form": form, "mask": mask, "window": window, "apply": apply,
                  "alibi": alibi, "upcast": not b.c.flag(30), "scale": b.c.pick(["mul", "div"]),
                  "bias": not b.c.flag(40)}, (N, L, D)


def _emit_gqa_attention(op, i, a, shapes, out):
    p, x = op.p, a[0]
    N, L, D = shapes[0]
    h, kv = p["heads"], p["kv"]
    d, n_rep = D // h, h // kv
    init = [f"self.m{i}_q = nn.Linear({D}, {h * d}, bias={p['bias']})",
            f"self.m{i}_k = nn.Linear({D}, {kv * d}, bias={p['bias']})",
            f"self.m{i}_v = nn.Linear({D}, {kv * d}, bias={p['bias']})",
            f"self.m{i}_o = nn.Linear({h * d}, {D}, bias=False)"]
    fwd = [f"t{i}q = self.m{i}_q({x}).view({N}, {L}, -1, {d}).transpose(1, 2)",
           f"t{i}k = self.m{i}_k({x}).view({N}, {L}, -1, {d}).transpose(1, 2)",
           f"t{i}v = self.m{i}_v({x}).view({N}, {L}, -1, {d}).transpose(1, 2)",
           f"t{i}ar = torch.arange({L}, device={x}.device)"]
    scaling = d ** -0.5
    m = p["mask"]
    if m in ("causal", "causal_padding"):
        fwd.append(f"t{i}m = t{i}ar[None, :] <= t{i}ar[:, None]")
    elif m == "sliding":
        fwd.append(f"t{i}m = (t{i}ar[None, :] <= t{i}ar[:, None]) & (t{i}ar[:, None] - t{i}ar[None, :] < {p['window']})")
    if m in ("padding", "causal_padding"):
        # padding derived in the model; key 0 always attends, so no row is fully masked (a float32
        # softmax of a float64 finfo.min row is NaN in the float64 reference)
        fwd.append(f"t{i}pad = ({x}[..., 0] > -1.5) | (t{i}ar == 0)[None, :]")
        fwd.append(f"t{i}m = t{i}pad[:, None, None, :]" if m == "padding"
                   else f"t{i}m = t{i}m[None, None, :, :] & t{i}pad[:, None, None, :]")
    if p["alibi"]:
        slopes = [2.0 ** (-8.0 * (j + 1) / h) for j in range(h)]
        init.append(f'self.register_buffer("slopes{i}", torch.tensor({slopes!r}))')
        fwd.append(f"t{i}al = self.slopes{i}[:, None, None] * (t{i}ar[None, :] - t{i}ar[:, None]).to(t{i}q.dtype)")
    if p["form"] == "eager":
        fwd += [f"t{i}k = t{i}k[:, :, None, :, :].expand({N}, {kv}, {n_rep}, {L}, {d}).reshape({N}, {kv * n_rep}, {L}, {d})",
                f"t{i}v = t{i}v[:, :, None, :, :].expand({N}, {kv}, {n_rep}, {L}, {d}).reshape({N}, {kv * n_rep}, {L}, {d})"]
        fwd.append(f"t{i}s = torch.matmul(t{i}q, t{i}k.transpose(2, 3)) * {_f(scaling)}" if p["scale"] == "mul"
                   else f"t{i}s = torch.matmul(t{i}q, t{i}k.transpose(2, 3)) / math.sqrt({d})")
        if p["alibi"]:
            fwd.append(f"t{i}s = t{i}s + t{i}al")
        if p["apply"] == "where":
            fwd.append(f"t{i}s = torch.where(t{i}m, t{i}s, torch.finfo(t{i}s.dtype).min)")
        elif p["apply"] == "masked_fill":
            fwd.append(f"t{i}s = t{i}s.masked_fill(~t{i}m, torch.finfo(t{i}s.dtype).min)")
        elif p["apply"] == "additive":
            fwd += [f"t{i}am = t{i}s.new_zeros(t{i}m.shape).masked_fill(~t{i}m, torch.finfo(t{i}s.dtype).min)",
                    f"t{i}s = t{i}s + t{i}am"]
        fwd.append(f"t{i}p = torch.softmax(t{i}s, dim=-1, dtype=torch.float32).to(t{i}q.dtype)" if p["upcast"]
                   else f"t{i}p = torch.softmax(t{i}s, dim=-1)")
        fwd.append(f"t{i}o = torch.matmul(t{i}p, t{i}v)")
    else:
        extra = ""
        if p["apply"] == "bool":
            extra = f", attn_mask=t{i}m"
        elif p["apply"] == "is_causal":
            extra = ", is_causal=True"
        elif p["apply"] == "additive":
            fwd.append(f"t{i}am = t{i}q.new_zeros(t{i}m.shape).masked_fill(~t{i}m, torch.finfo(t{i}q.dtype).min)")
            if p["alibi"]:
                fwd.append(f"t{i}am = t{i}am + t{i}al")
            extra = f", attn_mask=t{i}am"
        elif p["alibi"]:
            extra = f", attn_mask=t{i}al"
        scale = "" if p["scale"] == "div" else f", scale={_f(scaling)}"
        fwd.append(f"t{i}o = F.scaled_dot_product_attention(t{i}q, t{i}k, t{i}v{extra}{scale}, enable_gqa=True)")
    fwd += [f"t{i}o = t{i}o.transpose(1, 2).contiguous()",
            f"{out} = self.m{i}_o(t{i}o.reshape({N}, {L}, -1))"]
    return init, fwd


kind("gqa_attention", ranks=(3,), weight=1.8,
     doc="grouped-query attention: repeat_kv or SDPA enable_gqa, run-time masks, float32 softmax, ALiBi")(
    (_gen_gqa_attention, _emit_gqa_attention))

_INPLACE_FORMS = ("shift", "fill", "masked_fill", "index_put", "index_put_method", "div_", "mul_", "add_")


def _gen_inplace(b, x):
    s = b.shape(x)
    form = b.c.pick(_INPLACE_FORMS)
    if form == "shift" and s[1] < 2:
        form = "fill"
    return (x,), {"form": form, "c": b.c.pick([2.0, -1.0, 0.5, 3.0]), "t": b.c.pick([0.5, 1.0, -0.5]),
                  "step": b.c.pick([2, 1, 3])}, s


def _emit_inplace(op, i, a, shapes, out):
    p, x, s = op.p, a[0], shapes[0]
    f, c, t, step = p["form"], _f(p["c"]), _f(p["t"]), p["step"]
    if f == "shift":          # BART's shift_tokens_right: copy_ into a slice, fill_ of an element
        return [], [f"t{i}y = {x}.new_zeros({x}.shape)", f"t{i}y[:, 1:] = {x}[:, :-1].clone()",
                    f"t{i}y[:, 0] = {c}", f"{out} = t{i}y"]
    if f == "fill":
        return [], [f"t{i}y = {x}.clone()", f"t{i}y[:, -1] = {c}", f"{out} = t{i}y"]
    if f == "masked_fill":    # filled with the threshold itself: continuous (a value at the threshold
        # rounded differently in float32 and float64 moves the output by a rounding error only)
        return [], [f"t{i}y = {x}.clone()", f"t{i}y.masked_fill_(t{i}y > {t}, {t})", f"{out} = t{i}y"]
    if f == "index_put":      # y[:, idx] = vals, idx built in the model
        return [], [f"t{i}idx = torch.arange(0, {s[1]}, {step}, device={x}.device)", f"t{i}y = {x}.clone()",
                    f"t{i}y[:, t{i}idx] = torch.tanh({x}[:, t{i}idx]) * {c}", f"{out} = t{i}y"]
    if f == "index_put_method":
        n = _numel(s)
        return [], [f"t{i}y = {x}.reshape(-1).clone()",
                    f"t{i}idx = torch.arange({n - 1}, -1, -{step}, device={x}.device)",
                    f"t{i}y.index_put_((t{i}idx,), t{i}y[t{i}idx] * {c} + 1.0)",
                    f"{out} = t{i}y.reshape({list(s)})"]
    if f == "div_":
        return [], [f"{out} = {x}.clone().div_({c})"]
    if f == "mul_":
        return ([f'self.register_buffer("c{i}", _away_from_zero(g, ({s[-1]},)))'],
                [f"t{i}y = {x}.clone()", f"t{i}y.mul_(self.c{i})", f"{out} = t{i}y"])
    return [], [f"t{i}y = {x}.clone()", f"t{i}y.add_(torch.tanh({x}), alpha={c})", f"{out} = t{i}y"]


kind("inplace", ranks=(2, 3, 4), weight=1.0,
     doc="in-place writes on a fresh tensor: copy_ into a slice, fill_, masked_fill_, index_put_, div_/mul_/add_")(
    (_gen_inplace, _emit_inplace))


def _gen_embed(b, x):
    s = b.shape(x)
    r = len(s)
    # positions along dim -2 (tokens) of a rank 3 or 4 value, features on dim -1
    forms = [("argmax", 1), ("topk", 1), ("neg_index", 1)] + (
        [("positions", 1.5), ("positions_offset", 1.5), ("floordiv", 1.5), ("cumsum", 2)] if r >= 3 else [])
    form = b.c.weighted(forms)
    V, E = b.c.integer(2, 16), b.c.integer(1, 12)
    fn = b.c.pick(["module", "functional"])
    if form == "argmax":
        return (x,), {"form": form, "vocab": V, "dim": E, "fn": fn}, (*s[:-1], E)
    if form == "topk":
        k = b.c.integer(1, min(V, 3))
        return (x,), {"form": form, "vocab": V, "dim": E, "k": k, "fn": fn}, (*s[:-1], k * E)
    if form == "neg_index":
        dim = b.c.pick([1, r - 1])
        n = s[dim]
        index = b.c.pick([[-1, 0], [-1], [0, -1, -n], [-n, n - 1]])
        shape = list(s)
        shape[dim] = len(index)
        return (x,), {"form": form, "dim": dim, "index": tuple(index)}, tuple(shape)
    return (x,), {"form": form, "fn": fn}, s


def _embedding(i, V, E, fn, std=1.0):
    if fn == "module":
        return [f"self.e{i} = nn.Embedding({V}, {E}, _weight=_normal(g, ({V}, {E}), {std!r}))"], f"self.e{i}({{}})"
    return [f"self.e{i} = nn.Parameter(_normal(g, ({V}, {E}), {std!r}))"], f"F.embedding({{}}, self.e{i})"


def _emit_embed(op, i, a, shapes, out):
    p, x, s = op.p, a[0], shapes[0]
    f = p["form"]
    if f in ("argmax", "topk"):
        # an lm_head, then the next token's embedding: ids from a biased projection, so a row of
        # equal values (relu of a negative row) has no ties
        init, call = _embedding(i, p["vocab"], p["dim"], p["fn"])
        init.append(f"self.m{i} = nn.Linear({s[-1]}, {p['vocab']})")
        if f == "argmax":
            return init, [f"t{i}ids = torch.argmax(self.m{i}({x}), dim=-1)", f"{out} = {call.format(f't{i}ids')}"]
        return init, [f"t{i}ids = torch.topk(self.m{i}({x}), {p['k']}, dim=-1).indices",
                      f"{out} = {call.format(f't{i}ids')}.flatten(-2)"]
    if f == "neg_index":      # Falcon's multi-query split: qkv[..., [-2], :]
        index = list(p["index"])
        return [], [f"{out} = {x}[:, {index}]" if p["dim"] == 1 else f"{out} = {x}[..., {index}]"]
    L, D = s[-2:]
    if f == "positions":      # GPT-2: wpe(arange(L))
        init, call = _embedding(i, L, D, p["fn"], 0.5)
        return init, [f"t{i}pos = torch.arange(0, {L}, dtype=torch.long, device={x}.device).unsqueeze(0)",
                      f"{out} = {x} + {call.format(f't{i}pos')}"]
    if f == "positions_offset":   # OPT's learned positions: offset 2
        init, call = _embedding(i, L + 2, D, p["fn"], 0.5)
        return init, [f"t{i}pos = torch.arange({L}, device={x}.device)[None, :]",
                      f"{out} = {x} + {call.format(f't{i}pos + 2')}"]
    if f == "floordiv":       # int64 // int: positions shared by pairs
        init, call = _embedding(i, (L - 1) // 2 + 1, D, p["fn"], 0.5)
        return init, [f"t{i}pos = torch.arange({L}, device={x}.device) // 2",
                      f"{out} = {x} + {call.format(f't{i}pos')}[None]"]
    init, call = _embedding(i, L + 1, D, p["fn"], 0.5)       # cumsum position ids of the valid tokens
    return init, [f"t{i}m = ({x}[..., 0] > -0.5).long()", f"t{i}pos = t{i}m.cumsum(-1) * t{i}m",
                  f"{out} = {x} + {call.format(f't{i}pos')}"]


kind("embed", ranks=(2, 3, 4), weight=1.0,
     doc="embedding gathers with indices computed in the model (argmax/topk, positions, cumsum, //, negative lists)")(
    (_gen_embed, _emit_embed))


def _gen_moe(b, x):
    s = b.shape(x)
    D = s[-1]
    T = _numel(s) // D
    E = b.c.pick([2, 3, 4])
    k = b.c.pick([2, 1])
    form = b.c.pick(["one_hot", "eq", "scatter", "sorted"])
    hidden = b.c.integer(1, 8)
    if T * k * max(D, hidden, E) > MAX_NUMEL:
        return None
    params = {"form": form, "experts": E, "k": k, "hidden": hidden, "renorm": not b.c.flag(30),
              "expert_form": b.c.pick(["fused", "modules"]), "gated": b.c.flag(50)}
    if form == "sorted":
        params.update(restore=b.c.pick(["inv_perm", "index_add"]), sort=b.c.pick(["sort", "argsort", "sort_stable"]))
    return (x,), params, s


def _emit_moe(op, i, a, shapes, out):
    p, x, s = op.p, a[0], shapes[0]
    D = s[-1]
    T = _numel(s) // D
    E, k, H = p["experts"], p["k"], p["hidden"]
    # the router has a bias (as GPT-OSS's): Mixtral's has none, but then a row of zeros (relu of a
    # negative row) gives equal logits, and which experts topk picks among ties is up to the backend
    init = [f"self.m{i}_r = nn.Linear({D}, {E})"]
    if p["expert_form"] == "fused":      # transformers' fused experts: one weight per projection
        init += [f"self.w{i}_up = nn.Parameter(_normal(g, ({E}, {D}, {H}), {1 / math.sqrt(D)!r}))",
                 f"self.w{i}_down = nn.Parameter(_normal(g, ({E}, {H}, {D}), {1 / math.sqrt(H)!r}))"]
        if p["gated"]:
            init.append(f"self.w{i}_gate = nn.Parameter(_normal(g, ({E}, {D}, {H}), {1 / math.sqrt(D)!r}))")
    else:                                # Mixtral's ModuleList of experts
        init += [f"self.m{i}_up = nn.ModuleList([nn.Linear({D}, {H}, bias=False) for _ in range({E})])",
                 f"self.m{i}_down = nn.ModuleList([nn.Linear({H}, {D}, bias=False) for _ in range({E})])"]
        if p["gated"]:
            init.append(f"self.m{i}_gate = nn.ModuleList([nn.Linear({D}, {H}, bias=False) for _ in range({E})])")

    def expert(e, v):
        if p["expert_form"] == "fused":
            up, down = f"{v} @ self.w{i}_up[{e}]", f"self.w{i}_down[{e}]"
            hid = f"F.silu({v} @ self.w{i}_gate[{e}]) * ({up})" if p["gated"] else f"F.silu({up})"
            return f"({hid}) @ {down}"
        up = f"self.m{i}_up[{e}]({v})"
        hid = f"F.silu(self.m{i}_gate[{e}]({v})) * {up}" if p["gated"] else f"F.silu({up})"
        return f"self.m{i}_down[{e}]({hid})"

    fwd = [f"t{i}h = {x}.reshape(-1, {D})",
           f"t{i}l = self.m{i}_r(t{i}h)",
           f"t{i}p = F.softmax(t{i}l, dim=1, dtype=torch.float)",
           f"t{i}w, t{i}e = torch.topk(t{i}p, {k}, dim=-1)"]
    if p["renorm"]:
        fwd.append(f"t{i}w = t{i}w / t{i}w.sum(dim=-1, keepdim=True)")
    fwd.append(f"t{i}w = t{i}w.to(t{i}h.dtype)")
    f = p["form"]
    if f != "sorted":
        fwd.append(f"t{i}o = torch.zeros_like(t{i}h)")
        if f == "one_hot":
            fwd.append(f"t{i}oh = F.one_hot(t{i}e, num_classes={E})")
        elif f == "scatter":
            fwd.append(f"t{i}gates = torch.zeros({T}, {E}, dtype=t{i}w.dtype, device={x}.device).scatter(1, t{i}e, t{i}w)")
        for e in range(E):
            gate = {"one_hot": f"(t{i}w * t{i}oh[:, :, {e}]).sum(-1, keepdim=True)",
                    "eq": f"(t{i}w * (t{i}e == {e})).sum(-1, keepdim=True)",
                    "scatter": f"t{i}gates[:, {e}:{e + 1}]"}[f]
            fwd.append(f"t{i}o = t{i}o + {gate} * {expert(e, f't{i}h')}")
    else:   # transformers' grouped experts: pairs sorted by expert, counted, offsets, order restored
        n = T * k
        fwd.append(f"t{i}fe = t{i}e.reshape(-1)")
        # any order of the pairs of one expert gives the same result: a sort need not be stable
        fwd.append({"sort": f"t{i}se, t{i}perm = torch.sort(t{i}fe)", "argsort": f"t{i}perm = torch.argsort(t{i}fe)",
                    "sort_stable": f"t{i}se, t{i}perm = torch.sort(t{i}fe, stable=True)"}[p["sort"]])
        fwd += [f"t{i}tok = t{i}perm // {k}",
                f"t{i}cnt = torch.histc(t{i}fe.float(), bins={E}, min=0, max={E - 1})",
                f"t{i}off = torch.cumsum(t{i}cnt, dim=0).long()",
                f"t{i}row = torch.arange({n}, device={x}.device)",
                f"t{i}seg = (t{i}row[:, None] >= t{i}off[None, :]).sum(-1)",
                f"t{i}xs = t{i}h[t{i}tok]",
                f"t{i}ys = torch.zeros_like(t{i}xs)"]
        for e in range(E):
            fwd.append(f"t{i}ys = torch.where((t{i}seg == {e})[:, None], {expert(e, f't{i}xs')}, t{i}ys)")
        fwd.append(f"t{i}ys = t{i}ys * t{i}w.reshape(-1)[t{i}perm][:, None]")
        if p["restore"] == "inv_perm":
            fwd += [f"t{i}inv = torch.empty_like(t{i}perm)",
                    f"t{i}inv[t{i}perm] = torch.arange({n}, device={x}.device)",
                    f"t{i}o = t{i}ys[t{i}inv].reshape({T}, {k}, {D}).sum(1)"]
        else:
            fwd.append(f"t{i}o = torch.zeros_like(t{i}h).index_add_(0, t{i}tok, t{i}ys)")
    fwd.append(f"{out} = t{i}o.reshape({list(s)})")
    return init, fwd


kind("moe", ranks=(2, 3), weight=1.0,
     doc="MoE routing: softmax, topk, renormalise, experts combined by one_hot/eq/scatter, or sorted (histc, cumsum)")(
    (_gen_moe, _emit_moe))

_ROUNDTRIPS = ("float_type_as", "to_float32", "type_as_other", "softmax_fp32", "float_to_dtype")
_ROUNDTRIP_FNS = {"none": "{x}", "silu": "F.silu({x})", "tanh": "torch.tanh({x})", "square": "{x} * {x}"}


def _gen_dtype_roundtrip(b, x):
    form = b.c.pick(_ROUNDTRIPS)
    other = b.c.pick(list(range(b.n_values))[::-1]) if form == "type_as_other" else x
    return (x, other), {"form": form, "fn": b.c.pick(list(_ROUNDTRIP_FNS))}, b.shape(x)


def _emit_dtype_roundtrip(op, i, a, shapes, out):
    # no-ops in float32; in the float64 reference real casts, each undone before the value meets
    # a float64 weight (the computation between them runs in float32 there, as it does here)
    p, (x, y) = op.p, a
    fn = _ROUNDTRIP_FNS[p["fn"]].format(x=f"t{i}h")
    f = p["form"]
    if f == "float_type_as":
        return [], [f"t{i}h = {x}.float()", f"{out} = ({fn}).type_as({x})"]
    if f == "to_float32":
        return [], [f"t{i}dt = {x}.dtype", f"t{i}h = {x}.to(torch.float32)", f"{out} = ({fn}).to(t{i}dt)"]
    if f == "type_as_other":
        return [], [f"t{i}h = {x}.float()", f"{out} = ({fn}).type_as({y})"]
    if f == "softmax_fp32":
        return [], [f"{out} = F.softmax({x}, dim=-1, dtype=torch.float32).to({x}.dtype)"]
    return [], [f"t{i}h = {x}.float()", f"{out} = ({fn}).to(dtype={x}.dtype)"]


kind("dtype_roundtrip", ranks=(2, 3, 4), weight=0.8,
     doc=".float(), .to(torch.float32), .type_as(y), softmax(dtype=float32).to(x.dtype)")(
    (_gen_dtype_roundtrip, _emit_dtype_roundtrip))

_EMPTY_FORMS = ("legacy_cache", "zero_slice_end", "zero_slice_front", "new_zeros", "empty_sum")


def _gen_empty(b, x):
    return (x,), {"form": b.c.pick(_EMPTY_FORMS)}, b.shape(x)


def _emit_empty(op, i, a, shapes, out):
    x, s, f = a[0], shapes[0], op.p["form"]
    if f == "legacy_cache":     # transformers' first cache update: a 1-d empty tensor concatenated
        return ([f'self.register_buffer("cache{i}", torch.tensor([]), persistent=False)'],
                [f"{out} = torch.cat([self.cache{i}, {x}], dim=-2)"])
    if f == "zero_slice_end":   # Phi-3's rotary over the whole head: x[..., d:] has width 0
        D = s[-1]
        return [], [f"t{i}a, t{i}b = {x}[..., :{D}], {x}[..., {D}:]",
                    f"{out} = torch.cat([torch.tanh(t{i}a), t{i}b * 2.0], dim=-1)"]
    if f == "zero_slice_front":
        return [], [f"{out} = torch.cat([{x}[:, :0], {x}], dim=1)"]
    if f == "new_zeros":        # an empty cache of the right rank
        return [], [f"t{i}c = {x}.new_zeros(({s[0]}, 0{''.join(f', {d}' for d in s[2:])}))",
                    f"{out} = torch.cat([t{i}c, {x}], dim=1)"]
    return [], [f"{out} = {x} + {x}[..., {s[-1]}:].sum(-1, keepdim=True)"]    # a sum over zero elements


kind("empty", ranks=(2, 3, 4), weight=0.8,
     doc="empty tensors as caches produce them: cat with torch.tensor([]), zero-width slices")(
    (_gen_empty, _emit_empty))
