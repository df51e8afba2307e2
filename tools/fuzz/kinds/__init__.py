"""The op kinds of the generator (:data:`KINDS`), one module per family.

Each kind is a pair (gen, emit) registered with :func:`~optc.tools.fuzz.kinds.base.kind`
(:mod:`.base`); importing this package registers them all, in the order below (the order a
seed's choices are read in, so it is part of what a campaign seed means).

Op kinds (:data:`KINDS`), each with forms that exercise optc's rewrites:

- elementwise: ``act`` (relu, gelu erf/tanh, silu, sigmoid, ...), ``gelu_manual`` (both
  hand-written forms, for fuse-gelu), ``clip``, ``scalar`` (x*c, x/c, c-x, ...),
  ``channel_const`` (per-channel constants, for fold-binary), ``dropout`` (eval mode),
  ``noop`` (clone, contiguous, no-op views: canonicalize), ``dup`` (a repeated subexpression:
  cse), ``const_expr`` (arithmetic on weights: constant-fold), ``residual`` (add/mul with an
  earlier value), ``center`` (reductions broadcast back), ``softmax``;
- shape: ``concat``, ``split``, ``permute``, ``reshape``, ``to2``/``to3``/``to4`` (flatten,
  unsqueeze, factorise a dim);
- image (N, C, H, W): ``conv2d`` (grouped, depthwise, strided, dilated, padded, padding
  modes), ``conv_transpose2d``, ``batchnorm2d``, ``pool2d`` (max, avg, adaptive);
- sequence (N, A, B) and vector (N, D): ``linear``, ``parallel_linear`` (for
  merge-parallel-linear), ``matmul_weight`` (x @ W + b: addmm), ``bmm_self``,
  ``layernorm``, ``layernorm_manual`` (for fuse-layer-norm), ``attention`` (hand-written
  attention, self or cross, masks, scales, heads: fuse-attention), ``batchnorm1d``,
  ``conv1d``, ``pool1d``;
- idioms of HF transformers models: ``rmsnorm`` (llama with its float32 upcast, gemma's
  ``1 + w``, t5 without upcast, and a near miss with eps outside the sqrt), ``rotary`` (cos/sin
  from an ``inv_freq`` buffer and ``arange`` in forward; rotate_half, interleaved, partial, and
  partial over the whole head: a zero-width pass-through slice), ``gqa_attention`` (fewer
  key/value heads repeated by ``repeat_kv`` or SDPA ``enable_gqa``; causal, sliding-window and
  padding masks built from ``arange`` comparisons and the input, applied by ``where``,
  ``masked_fill`` or an additive ``finfo.min`` mask; float32 softmax; ALiBi slopes),
  ``inplace`` (writes on a fresh tensor: ``copy_`` into a slice, ``fill_``, ``masked_fill_``,
  ``index_put_``, ``div_``/``mul_``/``add_``), ``embed`` (embedding gathers with indices
  computed in the model: argmax/topk of an lm-head projection, ``arange`` positions, ``cumsum``
  position ids, ``positions // 2``, negative list indices), ``moe`` (router softmax, topk,
  renormalise; experts combined by ``one_hot``/``scatter``/``idx == e`` masks, or sorted by
  expert with ``histc`` counts, ``cumsum`` offsets and an inverse permutation or ``index_add_``),
  ``dtype_roundtrip`` (``.float()``, ``.to(torch.float32)``, ``.type_as(y)``,
  ``softmax(dtype=torch.float32).to(x.dtype)``: real casts in the float64 reference, each undone
  before its value meets a float64 weight), ``empty`` (``torch.cat`` with a 1-d
  ``torch.tensor([])`` buffer, zero-width slices and caches, a sum over zero elements).
"""

# isort: off
# Importing a family registers its kinds; KINDS keeps that order, and drawing a spec reads it:
# another order would change the model every campaign seed stands for.
from optc.tools.fuzz.kinds import elementwise  # noqa: F401
from optc.tools.fuzz.kinds import shape  # noqa: F401
from optc.tools.fuzz.kinds import image  # noqa: F401
from optc.tools.fuzz.kinds import sequence  # noqa: F401
from optc.tools.fuzz.kinds import transformer  # noqa: F401
# isort: on
from optc.tools.fuzz.kinds.base import ANY, KINDS, Emit, Gen, Kind, kind

__all__ = ["ANY", "KINDS", "Emit", "Gen", "Kind", "kind"]
