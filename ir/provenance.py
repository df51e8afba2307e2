"""Provenance: which captured nodes each node derives from, and which pass and rule made it.

Three ``node.meta`` keys, kept through the target pipeline and the backend stage:

- ``optc_origin``: the names of the nodes of the *captured* graph this node derives from, sorted
  (capture stamps every node with its own name);
- ``optc_pass``: the pass that created the node (absent on nodes captured as they are);
- ``optc_rule``: the rewrite rule inside that pass, where the pass has rules (legalizations, the
  rules of the pattern layer);
- ``optc_value_of``: for a new node that took the place of exactly one node, the captured node
  whose value it computes (a fused ``scaled_dot_product_attention`` computes the value of the
  second matmul it replaced): ``optc compare --locate`` compares the two.

The PassManager calls :func:`record` after every pass that modified the graph, with the graph as it
was before (its rollback snapshot) and after. A node that did not exist before is new; its origin
is the union of

1. the origin it was given when created (``carry_meta`` copies the anchor's), and
2. the origins of the erased nodes it replaced: where a surviving user reads the new node (directly
   or through other new nodes), the erased node it read at that argument before, and every erased
   node between that one and the new node's surviving inputs (found by walking the old graph over
   erased nodes only, backward from the replaced node and forward from the inputs).

So a fused ``scaled_dot_product_attention`` derives from the matmuls, scale, mask add and softmax
it replaced, and a merged projection from the linears it merged. The rule is structural, not
told by each pass: a pass cannot forget to record it. Where it cannot tell two regions apart (a
user whose arguments changed shape), a new node gets the origins of both (a superset, never a
miss).
"""

from __future__ import annotations

import torch
import torch.fx as fx

ORIGIN = "optc_origin"
PASS = "optc_pass"
RULE = "optc_rule"
VALUE_OF = "optc_value_of"


def stamp(gm: fx.GraphModule) -> None:
    """Every node of a freshly captured graph derives from itself."""
    for node in gm.graph.nodes:
        if node.op != "output":
            node.meta[ORIGIN] = (node.name,)


def origin(node: fx.Node) -> tuple[str, ...]:
    return tuple(node.meta.get(ORIGIN, ()))


def record(old: fx.GraphModule, new: fx.GraphModule, pass_name: str) -> int:
    """Give each node of ``new`` absent from ``old`` its origin and ``pass_name`` (see the module
    doc). Returns the number of new nodes."""
    old_nodes = {n.name: n for n in old.graph.nodes}
    new_nodes = list(new.graph.nodes)
    fresh = [n for n in new_nodes if n.name not in old_nodes and n.op != "output"]
    present = {n.name for n in new_nodes}
    erased = {name for name in old_nodes if name not in present}
    if erased:
        _took_the_place(old_nodes, new_nodes, erased, pass_name)
    if not fresh:
        return 0
    fresh_set = set(fresh)

    # the surviving (old) inputs of each new node, through other new nodes, in topological order
    ins: dict[fx.Node, frozenset[str]] = {}
    for n in fresh:
        acc: set[str] = set()
        for a in n.all_input_nodes:
            acc |= ins[a] if a in fresh_set else {a.name}
        ins[n] = frozenset(acc)
    # ... and the erased nodes each one took the place of: where a surviving user now reads the
    # new node (directly or through other new nodes), the node it read at that argument before
    def replaced(user: fx.Node, n: fx.Node) -> set[str]:
        before = old_nodes.get(user.name)
        if before is None:
            return set()
        hit = {w.name for w, x in _aligned(before, user) if x is n and isinstance(w, fx.Node) and w.name in erased}
        if hit:
            return hit
        return {a.name for a in before.all_input_nodes if a.name in erased}

    outs: dict[fx.Node, frozenset[str]] = {}
    for n in reversed(fresh):
        acc = set()
        for u in n.users:
            acc |= outs[u] if u in fresh_set else replaced(u, n)
        outs[n] = frozenset(acc)

    def walker(step):
        """Erased old nodes reachable from a name through erased nodes, along ``step`` (users or
        inputs), cached per start."""
        cache: dict[str, frozenset[str]] = {}

        def reach(name: str) -> frozenset[str]:
            if name not in cache:
                seen: set[str] = set()
                stack = [x.name for x in step(old_nodes[name]) if x.name in erased] if name in old_nodes else []
                while stack:
                    x = stack.pop()
                    if x not in seen:
                        seen.add(x)
                        stack.extend(y.name for y in step(old_nodes[x]) if y.name in erased)
                cache[name] = frozenset(seen)
            return cache[name]
        return reach

    forward = walker(lambda n: n.users)
    backward = walker(lambda n: n.all_input_nodes)

    for n in fresh:
        region: set[str] = set()
        if erased:
            down: set[str] = set()
            for i in ins[n]:
                down |= forward(i)
            if down:
                up: set[str] = set(outs[n])
                for a in outs[n]:
                    up |= backward(a)
                region = down & up
        acc = set(origin(n))
        for name in region:
            acc.update(origin(old_nodes[name]))
        n.meta[ORIGIN] = tuple(sorted(acc))
        n.meta[PASS] = pass_name
        n.meta.pop(VALUE_OF, None)
        direct = set()
        for u in n.users:
            direct |= replaced(u, n) if u not in fresh_set else {"<new>"}
        if len(direct) == 1 and "<new>" not in direct:
            anchor = old_nodes[next(iter(direct))]
            if VALUE_OF in anchor.meta:
                n.meta[VALUE_OF] = anchor.meta[VALUE_OF]
            elif origin(anchor) == (anchor.name,):
                n.meta[VALUE_OF] = anchor.name
    return len(fresh)


def _took_the_place(old_nodes: dict, new_nodes: list, erased: set, pass_name: str) -> None:
    """A node that survived a pass but now stands where an erased node was read (``x * 2`` folded
    into the linear that computed ``x``: the linear, its weights changed, now computes the product)
    computes the erased node's value: it gets that node's ``optc_value_of`` and origin, and the pass."""
    for n in new_nodes:
        before = old_nodes.get(n.name)
        if before is None or n.op in ("placeholder", "get_attr", "output"):
            continue
        took: set[str] = set()
        for u in n.users:
            u_before = old_nodes.get(u.name)
            if u_before is None:
                continue
            took |= {w.name for w, x in _aligned(u_before, u)
                     if x is n and isinstance(w, fx.Node) and w.name in erased}
        if not took:
            continue
        n.meta[PASS] = pass_name
        acc = set(origin(n))
        for name in took:
            acc.update(origin(old_nodes[name]))
        n.meta[ORIGIN] = tuple(sorted(acc))
        if len(took) == 1:
            anchor = old_nodes[next(iter(took))]
            if VALUE_OF in anchor.meta:
                n.meta[VALUE_OF] = anchor.meta[VALUE_OF]
            elif origin(anchor) == (anchor.name,):
                n.meta[VALUE_OF] = anchor.name
            else:
                n.meta.pop(VALUE_OF, None)
        else:   # it stands for several values at once: nothing to compare it with
            n.meta[VALUE_OF] = None


def _aligned(before: fx.Node, after: fx.Node):
    """``(old, new)`` argument pairs of one node before and after a pass, position by position (and
    keyword by keyword), so an argument added or dropped elsewhere (a bias that became a node)
    does not shift the others."""
    def pairs(a, b):
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            if len(a) == len(b):
                for x, y in zip(a, b):
                    yield from pairs(x, y)
        else:
            yield a, b
    yield from pairs(tuple(before.args), tuple(after.args)[:len(before.args)])
    for k, v in before.kwargs.items():
        if k in after.kwargs:
            yield from pairs(v, after.kwargs[k])


def describe(node: fx.Node) -> str:
    """``from %a, %b by PASS (rule R)``, or "" for a node captured as it is."""
    parts = []
    org = origin(node)
    if org and org != (node.name,):
        parts.append("from " + ", ".join(f"%{o}" for o in org))
    if node.meta.get(PASS):
        rule = node.meta.get(RULE)
        parts.append(f"by {node.meta[PASS]}" + (f" (rule {rule})" if rule and rule != node.meta[PASS] else ""))
    return " ".join(parts)


__all__ = ["ORIGIN", "PASS", "RULE", "VALUE_OF", "stamp", "origin", "record", "describe"]
