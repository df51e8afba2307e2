"""Drawing a valid :class:`~optc.tools.fuzz.spec.ModelSpec` from a source of choices.

Shapes are tracked while a spec is drawn, so every spec is valid by construction: each op's
parameters are chosen from the ones its input shapes allow (a convolution's padding and stride
give an output of at least one pixel, heads divide the width, a concatenation's operands agree
off its axis), and no intermediate holds more than :data:`~optc.tools.fuzz.spec.MAX_NUMEL`
elements. :func:`random_spec` draws from a seed (the campaign), :func:`model_specs` is a
hypothesis strategy (the test suite), :func:`spec_from_choices` replays a choice sequence (the
shrinker).
"""

from __future__ import annotations

from typing import Sequence

from optc.tools.fuzz.choosers import Chooser, GeneChooser, RandomChooser, ReplayChooser
from optc.tools.fuzz.kinds import KINDS
from optc.tools.fuzz.kinds.base import _ok
from optc.tools.fuzz.spec import MAX_OPS, ModelSpec, Op


# After a layer, the ops that fold into it are more likely (so fold-* passes see their patterns).
_FOLLOW = {
    "conv2d": {"batchnorm2d": 8, "channel_const": 3, "scalar": 2, "act": 1.5},
    "conv_transpose2d": {"batchnorm2d": 6, "channel_const": 3, "scalar": 2},
    "conv1d": {"batchnorm1d": 6, "channel_const": 3, "scalar": 2},
    "linear": {"batchnorm1d": 6, "channel_const": 3, "scalar": 2, "act": 1.5},
    "matmul_weight": {"channel_const": 2, "scalar": 2},
    "attention": {"residual": 3, "layernorm": 2, "layernorm_manual": 2},
    "to2": {"linear": 2, "batchnorm1d": 2},
    # a decoder block: norm, attention (or experts), residual
    "embed": {"rmsnorm": 2, "layernorm": 1.5},
    "rmsnorm": {"gqa_attention": 2, "moe": 2, "rotary": 1.5},
    "gqa_attention": {"residual": 3, "rmsnorm": 2},
    "moe": {"residual": 3, "rmsnorm": 1.5},
}


class _Builder:
    def __init__(self, c: Chooser, inputs: list[tuple[int, ...]]):
        self.c = c
        self.shapes: list[tuple[int, ...]] = list(inputs)
        self.ops: list[Op] = []

    @property
    def n_values(self) -> int:
        return len(self.shapes)

    def shape(self, vid: int) -> tuple[int, ...]:
        return self.shapes[vid]

    def add(self, kind_: str, inputs, params: dict, shape) -> int:
        self.ops.append(Op(kind_, tuple(inputs), tuple(params.items()), tuple(int(d) for d in shape)))
        self.shapes.append(tuple(shape))
        return self.n_values - 1


def _input_shape(c: Chooser, rank: int) -> tuple[int, ...]:
    n = c.pick([1, 2])
    if rank == 2:
        return (n, c.integer(1, 32))
    if rank == 3:
        return (n, c.integer(1, 8), c.integer(1, 24))
    return (n, c.integer(1, 8), c.integer(1, 10), c.integer(1, 10))


def draw_spec(c: Chooser, max_ops: int = MAX_OPS, kinds: Sequence[str] | None = None) -> ModelSpec:
    """Draw one valid spec from ``c``. ``kinds`` restricts the op kinds (shape changes to
    reach a rank they need are still drawn from all kinds only if the set has none)."""
    allowed = [k for k in KINDS if kinds is None or k in kinds]
    if not allowed:
        raise ValueError(f"no known kinds among {kinds} (valid: {', '.join(KINDS)})")
    seed = c.integer(0, 2 ** 16 - 1)
    ranks_needed = sorted({r for k in allowed for r in KINDS[k].ranks})
    rank = c.weighted([(r, w) for r, w in ((2, 1.0), (3, 1.5), (4, 2.0)) if r in ranks_needed] or [(2, 1.0)])
    shape = _input_shape(c, rank)
    n_inputs = 2 if c.flag(15) else 1
    b = _Builder(c, [shape] * n_inputs)
    cur = 0
    last_kind = None
    refused = 0
    while len(b.ops) < max_ops:
        c.mark()                                  # one block of choices per op, its flag first
        if not c.more_ops(first=not b.ops):       # (drawn for the first op too: blocks align)
            break
        x = cur
        if len(b.ops) >= 2 and c.flag(15):        # branch from an earlier value
            x = c.pick(list(range(b.n_values - 1, -1, -1)))
        r = len(b.shape(x))
        options = []
        for name in allowed:
            k = KINDS[name]
            if r in k.ranks:
                options.append((name, k.weight * _FOLLOW.get(last_kind, {}).get(name, 1.0)))
        if not options:
            break
        name = c.weighted(options)
        res = KINDS[name].gen(b, x)
        if res is None or not _ok(res[2]):
            # the first op is drawn whatever more_ops says: with kinds that all refuse this input
            # (rotary on an odd width) the loop must stop
            refused += 1
            if refused >= 100:
                break
            continue
        inputs, params, out_shape = res
        refused = 0
        cur = b.add(name, inputs, params, out_shape)
        last_kind = name
    if not b.ops:       # every draw refused: a relu keeps the spec valid
        cur = b.add("act", (0,), {"fn": "relu"}, b.shape(0))
    c.mark()            # the outputs' choices (a GeneChooser reads them from its tail)
    outputs = [cur]
    extra = [v for v in range(n_inputs, b.n_values - 1)]
    if extra and c.flag(15):
        outputs.append(c.pick(extra[::-1]))
    return ModelSpec(tuple(b.shapes[:n_inputs]), tuple(b.ops), tuple(outputs), seed)


def random_spec(seed: int | str, max_ops: int = MAX_OPS, kinds: Sequence[str] | None = None) -> ModelSpec:
    """The spec drawn from ``random.Random(seed)`` (deterministic)."""
    return draw_spec(RandomChooser(seed), max_ops, kinds)


def random_spec_choices(seed: int | str, max_ops: int = MAX_OPS,
                        kinds: Sequence[str] | None = None) -> tuple[ModelSpec, list[int]]:
    """:func:`random_spec` and its choice sequence (for :func:`shrink_choices`)."""
    c = RandomChooser(seed)
    return draw_spec(c, max_ops, kinds), c.record


def spec_from_choices(choices: Sequence[int], max_ops: int = MAX_OPS,
                      kinds: Sequence[str] | None = None) -> tuple[ModelSpec, list[int], list[int]]:
    """Replay ``choices``: the spec, the choices actually used and the op marks."""
    c = ReplayChooser(choices)
    spec = draw_spec(c, max_ops, kinds)
    return spec, c.record, c.marks


GENE = 24      # ints per op in model_specs (the largest op, attention, reads about 20)


def model_specs(max_ops: int = MAX_OPS, kinds: Sequence[str] | None = None):
    """A hypothesis strategy of :class:`ModelSpec` (hypothesis is imported here, lazily).

    Drawn as a header, a list of genes (one per op) and a tail (:class:`GeneChooser`), so
    hypothesis shrinks a failing model by deleting ops, then simplifying each op and the shapes."""
    from hypothesis import strategies as st

    ints = st.integers(0, 2 ** 16 - 1)
    return st.builds(lambda h, g, t: draw_spec(GeneChooser(h, g, t), max_ops, kinds),
                     st.lists(ints, min_size=8, max_size=8),
                     st.lists(st.lists(ints, min_size=GENE, max_size=GENE), min_size=1, max_size=max_ops),
                     st.lists(ints, min_size=2, max_size=2))
