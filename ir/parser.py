"""Read the canonical printer's text back into a Program, so a dump or a reproducer replays.

    graph(%x : f32[1,3,224,224]):
      %conv1_weight : f32[64,3,7,7] = get_attr conv1.weight
      %conv2d : f32[1,64,112,112] = aten.conv2d(%x, %conv1_weight, None, [2, 2], [3, 3])  # model.py:41
      return (%conv2d)

:func:`parse_program` is the inverse of :func:`optc.ir.printer.format_text`: for every Program
``p`` with weights ``w``, ``format_text(parse_program(format_text(p), w)) == format_text(p)``, and the
parsed Program computes what ``p`` computes. What it rebuilds:

- the nodes, with the names, targets and arguments the text gives them: ``aten.add.Tensor`` is
  ``torch.ops.aten.add.Tensor``, ``aten.conv2d`` the ``.default`` overload, ``optc.*`` optc's own
  op library, ``getitem`` and the other bare names the Python callables of :data:`_PY_CALLABLES`;
- ``meta["val"]``: FakeTensors, by running each op under one FakeTensorMode from the inputs' types
  and the weights, then checked against the type the text declares (a disagreement is an error);
  symbolic dims of the inputs (``s72``) become symbols of that name in a ShapeEnv, so the derived
  dims (``16*s72``) print back the same;
- ``meta["optc_source"]`` from the ``# file.py:LINE`` note, and provenance (``optc_origin``,
  ``optc_pass``, ``optc_rule``) from a ``from %a, %b by PASS (rule R)`` note where the text has one
  (``format_text(with_provenance=True)``); without one a node derives from itself, as after capture.

Tensors are not in the text: ``get_attr`` nodes read ``weights[target]``, and an input ``%x`` takes
its example value from ``weights["%x"]`` when present (random values of its type otherwise). A
syntax error, an unknown op or an undefined value is a :class:`~optc.errors.ParseError` whose
message starts ``file:line:column``; a missing weight, or one whose shape or dtype is not the
type the text declares, is a :class:`~optc.errors.WeightsError` naming the tensor.

On disk a program is two files: ``X.optc`` (the text) and ``X.optc.weights`` (``torch.save`` of a
dict, read back with ``weights_only=True``: each get_attr target to its tensor, and ``%NAME`` to the
example value of input ``%NAME``). :func:`save_program_text` writes both, :func:`load_program`
reads them.
"""

from __future__ import annotations

import ast
import math
import operator
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from optc.errors import OptcError, ParseError, WeightsError
from optc.ir import provenance
from optc.ir.program import InputLeaf, Program, attr_tensors, dtype_from_short, dtype_short

WEIGHTS_SUFFIX = ".weights"
"""``X.optc`` keeps its tensors in ``X.optc.weights``."""

# the modules that register the ``optc::`` ops (imported when the text names one)
_OP_LIBRARIES = ("optc.ir.ops", "optc.ir.quant_ops", "optc.ir.layout_ops", "optc.backends.onnx_contrib")

# bare op names: the Python callables fx graphs call (``op_name`` prints their ``__name__``)
_PY_CALLABLES: dict[str, Callable] = {
    **{name: getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")},
    **{name: getattr(torch, name) for name in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum")
       if hasattr(torch, name)},
}

_CONSTANTS: dict[str, Any] = {
    "True": True, "False": False, "None": None, "inf": math.inf, "nan": math.nan,
    **{name: getattr(torch, name) for name in (
        "contiguous_format", "channels_last", "channels_last_3d", "preserve_format",
        "strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged")
       if hasattr(torch, name)},
}

_IDENT = re.compile(r"[A-Za-z_]\w*")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.\w+)*")
_TARGET = re.compile(r"[^\s#]+")
_NUMBER = re.compile(r"-?(?:inf|nan|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)(?![\w.])")
_INT = re.compile(r"-?\d+$")
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_KWARG = re.compile(r"([A-Za-z_]\w*)\s*=(?!=)")
_SYMBOL = re.compile(r"s(\d+)$")
_PROVENANCE = re.compile(r"(?:from (?P<origin>%\w+(?:, %\w+)*))?\s*(?:by (?P<pass>\S+)(?: \(rule (?P<rule>.+)\))?)?$")


# ---- types ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Type:
    """A type as the text writes it: ``kind`` is tensor (dtype, dims), tuple (items), sym, none or
    scalar (the Python type name); ``text`` the exact characters, ``column`` where they start."""

    kind: str
    text: str
    column: int
    dtype: torch.dtype | None = None
    dims: tuple[int | str, ...] = ()
    items: tuple["_Type", ...] = ()


# ---- one line -----------------------------------------------------------------------------------------------
class _Line:
    """A cursor over one line of the text; every error it raises names ``file:line:column``."""

    def __init__(self, text: str, lineno: int, filename: str):
        self.s, self.i, self.lineno, self.filename = text, 0, lineno, filename

    def error(self, message: str, column: int | None = None) -> ParseError:
        col = (self.i if column is None else column) + 1
        return ParseError(message, filename=self.filename, line=self.lineno, column=col)

    def expected(self, what: str) -> ParseError:
        self.ws()
        rest = self.s[self.i:]
        found = "end of line" if not rest else repr(rest[:20] + ("..." if len(rest) > 20 else ""))
        return self.error(f"expected {what}, found {found}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def at_end(self) -> bool:
        self.ws()
        return self.i >= len(self.s)

    def peek(self, lit: str) -> bool:
        self.ws()
        return self.s.startswith(lit, self.i)

    def eat(self, lit: str) -> bool:
        if self.peek(lit):
            self.i += len(lit)
            return True
        return False

    def expect(self, lit: str, what: str | None = None) -> None:
        if not self.eat(lit):
            raise self.expected(what or f"'{lit}'")

    def match(self, pattern: re.Pattern) -> str | None:
        self.ws()
        m = pattern.match(self.s, self.i)
        if m is None:
            return None
        self.i = m.end()
        return m.group(0)

    def name(self, what: str) -> str:
        """``%NAME`` (the sigil included in ``what``'s wording)."""
        self.expect("%", what)
        name = self.match(_IDENT)
        if name is None:
            raise self.expected(f"a name after '%' ({what})")
        return name

    # -- types
    def type(self) -> _Type:
        self.ws()
        start = self.i
        if self.eat("("):
            items = []
            if not self.eat(")"):
                items.append(self.type())
                while self.eat(","):
                    items.append(self.type())
                self.expect(")", "',' or ')' in a tuple type")
            return _Type("tuple", self.s[start:self.i], start, items=tuple(items))
        word = self.match(_IDENT)
        if word is None:
            raise self.expected("a type such as f32[1,3,224,224]")
        if not self.s.startswith("[", self.i):
            kind = "none" if word == "none" else "scalar"
            return _Type(kind, word, start)
        self.i += 1
        inner = self._bracketed()
        text = self.s[start:self.i]
        if word == "sym":
            return _Type("sym", text, start)
        try:
            dtype = dtype_from_short(word)
        except ValueError:
            raise self.error(f"unknown dtype '{word}' in type '{text}'", start) from None
        dims: list[int | str] = []
        for d in _split_top(inner) if inner.strip() else []:
            d = d.strip()
            if not d:
                raise self.error(f"empty dimension in type '{text}'", start)
            dims.append(int(d) if d.isdigit() else d)
        return _Type("tensor", text, start, dtype=dtype, dims=tuple(dims))

    def _bracketed(self) -> str:
        """The text up to the ``]`` that closes the one just read (nested brackets and parens)."""
        start, depth = self.i, 0
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in "([":
                depth += 1
            elif c in ")]":
                if depth == 0:
                    if c == "]":
                        self.i += 1
                        return self.s[start:self.i - 1]
                    break
                depth -= 1
            self.i += 1
        raise self.expected("']' closing the dimensions")

    # -- arguments (the syntax of printer.format_arg)
    def arg(self, env: dict[str, fx.Node]) -> Any:
        self.ws()
        start = self.i
        if self.peek("%"):
            name = self.name("a value")
            if name not in env:
                raise self.error(f"undefined value %{name} (not an input nor defined on an earlier line)", start)
            return env[name]
        if self.eat("["):
            return self._seq("]", env)
        if self.eat("("):
            items = self._seq(")", env, tuple_=True)
            return tuple(items)
        if self.eat("{"):
            out = {}
            if not self.eat("}"):
                while True:
                    self.ws()
                    key = self.match(re.compile(r"[^:,{}\[\]()]+"))
                    if key is None:
                        raise self.expected("a dict key")
                    key = key.strip()
                    self.expect(":", "':' after a dict key")
                    out[int(key) if _INT.match(key) else key] = self.arg(env)
                    if self.eat("}"):
                        break
                    self.expect(",", "',' or '}' in a dict")
            return out
        text = self.match(_STRING)
        if text is not None:
            return ast.literal_eval(text)
        text = self.match(_NUMBER)
        if text is not None:
            return int(text) if _INT.match(text) else float(text)
        word = self.match(_IDENT)
        if word is None:
            raise self.expected("an argument (%value, number, string, list, tuple, dtype, device(...), None)")
        if word == "device" and self.eat("("):
            spec = self.match(re.compile(r"[\w:]+"))
            if spec is None:
                raise self.expected("a device such as cpu or cuda:0")
            self.expect(")", "')' closing device(...)")
            try:
                return torch.device(spec)
            except RuntimeError:
                raise self.error(f"unknown device '{spec}'", start) from None
        if word in _CONSTANTS:
            return _CONSTANTS[word]
        try:
            return dtype_from_short(word)
        except ValueError:
            raise self.error(f"unknown name '{word}' in an argument (expected %value, a number, a string, "
                             "True/False/None, a dtype such as f32, device(...), a memory format or a layout)",
                             start) from None

    def _seq(self, close: str, env, tuple_: bool = False) -> list:
        items = []
        if self.eat(close):
            return items
        while True:
            items.append(self.arg(env))
            if self.eat(close):
                if tuple_ and len(items) == 1:
                    raise self.error("a one-element tuple is written (x,)", self.i - 1)
                return items
            self.expect(",", f"',' or '{close}'")
            if self.eat(close):   # (x,) and a trailing comma
                return items

    def call_args(self, env) -> tuple[tuple, dict]:
        """``(a, b, k=v)`` after the op name."""
        self.expect("(", "'(' after the op name")
        args, kwargs = [], {}
        if self.eat(")"):
            return (), {}
        while True:
            self.ws()
            m = _KWARG.match(self.s, self.i)
            if m is not None:
                self.i = m.end()
                kwargs[m.group(1)] = self.arg(env)
            elif kwargs:
                raise self.expected("a keyword argument k=v (positional arguments come first)")
            else:
                args.append(self.arg(env))
            if self.eat(")"):
                return tuple(args), kwargs
            self.expect(",", "',' or ')' in the argument list")

    def notes(self) -> list[str]:
        """``  # a; b`` at the end of a node's line, or nothing."""
        if self.at_end():
            return []
        if not self.eat("#"):
            raise self.expected("'#' or the end of the line")
        text = self.s[self.i:].strip()
        self.i = len(self.s)
        return [n.strip() for n in text.split("; ")] if text else []


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and parentheses."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


# ---- ops ------------------------------------------------------------------------------------------------------
def resolve_op(name: str) -> Callable:
    """The call target that prints as ``name`` (see ``printer.op_name``); a KeyError says why there is none."""
    if "." not in name:
        if name in _PY_CALLABLES:
            return _PY_CALLABLES[name]
        raise KeyError(f"a bare name is one of the Python callables {', '.join(sorted(_PY_CALLABLES)[:6])}, ...; "
                       "an operator is written NAMESPACE.NAME[.OVERLOAD], e.g. aten.add.Tensor")
    parts = name.split(".")
    if len(parts) > 3:
        raise KeyError("an operator is written NAMESPACE.NAME[.OVERLOAD], e.g. aten.add.Tensor")
    ns, base, overload = parts[0], parts[1], parts[2] if len(parts) == 3 else "default"
    if ns == "optc" and not _has_op(ns, base):
        import importlib
        for module in _OP_LIBRARIES:
            importlib.import_module(module)
    if not _has_op(ns, base):
        raise KeyError(f"torch.ops.{ns} has no operator '{base}'")
    packet = getattr(getattr(torch.ops, ns), base)
    if overload in packet.overloads():
        return getattr(packet, overload)
    if len(parts) == 2:
        return packet
    raise KeyError(f"{ns}.{base} has no overload '{overload}' (it has: {', '.join(packet.overloads())})")


def _has_op(ns: str, base: str) -> bool:
    try:
        return isinstance(getattr(getattr(torch.ops, ns), base), torch._ops.OpOverloadPacket)
    except (AttributeError, RuntimeError):
        return False


# ---- the program --------------------------------------------------------------------------------------------
class _Builder:
    """Builds the graph line by line: nodes, their fake values, the checks."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
        self.weights = weights
        self.graph = fx.Graph()
        self.env: dict[str, fx.Node] = {}
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=self.shape_env)
        self.symbols: dict[str, torch.SymInt] = {}
        self.attrs: dict[str, torch.Tensor] = {}
        self.inputs: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(0)

    def define(self, line: _Line, name: str, column: int, make: Callable[[str], fx.Node]) -> fx.Node:
        if name in self.env:
            raise line.error(f"%{name} is defined twice", column)
        node = make(name)
        if node.name != name:
            raise line.error(f"%{name} cannot name an fx node (fx calls it %{node.name}: a Python keyword "
                             "or builtin, or a name fx reserves)", column)
        self.env[name] = node
        return node

    # -- inputs
    def placeholder(self, line: _Line, name: str, column: int, ty: _Type) -> None:
        if ty.kind != "tensor":
            raise line.error(f"input %{name} has type '{ty.text}': inputs are tensors such as f32[1,3]", ty.column)
        value = self.weights.get(f"%{name}")
        if value is not None:
            value = self._check_input(line, name, ty, value)
        sizes = []
        for axis, d in enumerate(ty.dims):
            if isinstance(d, int):
                sizes.append(d)
                continue
            hint = int(value.shape[axis]) if value is not None else None
            sizes.append(self._symbol(line, ty, d, hint))
        if value is None:
            value = _random(tuple(int(s.node.hint) if isinstance(s, torch.SymInt) else s for s in sizes),
                            ty.dtype, self.generator)
        with self.mode:   # the type has no device: the example value's (cpu for random ones)
            val = torch.empty_strided(sizes, _contiguous_strides(sizes), dtype=ty.dtype, device=value.device)
        node = self.define(line, name, column, lambda n: self.graph.placeholder(n))
        node.meta["val"] = val
        self.inputs.append(value)

    def _check_input(self, line: _Line, name: str, ty: _Type, value) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{line.filename}:{line.lineno}: the example value of input %{name} is a "
                               f"{type(value).__name__}, not a tensor")
        static_ok = value.dim() == len(ty.dims) and all(
            not isinstance(d, int) or d == s for d, s in zip(ty.dims, value.shape))
        if value.dtype != ty.dtype or not static_ok:
            raise WeightsError(f"{line.filename}:{line.lineno}: the example value of input %{name} is "
                               f"{dtype_short(value.dtype)}[{','.join(map(str, value.shape))}], the text declares "
                               f"{ty.text}")
        return value

    def _symbol(self, line: _Line, ty: _Type, dim: str, hint: int | None) -> torch.SymInt:
        if dim in self.symbols:
            return self.symbols[dim]
        m = _SYMBOL.match(dim)
        if m is None:
            raise line.error(f"the input dim '{dim}' of '{ty.text}' is not a plain symbol such as s0: only "
                             "static dims and plain symbols are supported in the inputs' types", ty.column)
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic
        # the ShapeEnv names a symbol s<id>; give it the id the text has, so derived dims print the same
        idx = int(m.group(1))
        hint = max(hint, 2) if hint is not None else _HINTS[len(self.symbols) % len(_HINTS)]
        env = self.shape_env
        env._generate_unique_id = lambda source_name: idx
        try:
            expr = env.create_symbol(hint, ConstantSource(dim), dynamic_dim=DimDynamic.DYNAMIC)
        finally:
            del env._generate_unique_id
        env.unique_ids.add(idx)
        if str(expr) != dim:
            raise line.error(f"cannot recreate the symbol {dim} (the shape environment made {expr})", ty.column)
        sym = env.create_symintnode(expr, hint=hint, source=ConstantSource(dim))
        self.symbols[dim] = sym
        return sym

    # -- weights
    def get_attr(self, line: _Line, name: str, column: int, ty: _Type, target: str) -> None:
        tensor = self.attrs.get(target)
        if tensor is None:
            tensor = self.weights.get(target)
            if tensor is None:
                raise WeightsError(f"{line.filename}:{line.lineno}: no weight '{target}' for %{name} "
                                   f"({ty.text}) in the weights given")
            if not isinstance(tensor, torch.Tensor):
                raise WeightsError(f"{line.filename}:{line.lineno}: weight '{target}' is a "
                                   f"{type(tensor).__name__}, not a tensor")
        got = f"{dtype_short(tensor.dtype)}[{','.join(str(d) for d in tensor.shape)}]"
        if got != ty.text:
            raise WeightsError(f"{line.filename}:{line.lineno}: weight '{target}' is {got}, the text declares "
                               f"%{name} : {ty.text}")
        self.attrs[target] = tensor
        node = self.define(line, name, column, lambda n: self.graph.create_node("get_attr", target, name=n))
        node.meta["val"] = self.mode.from_tensor(tensor, static_shapes=True)

    # -- calls
    def call(self, line: _Line, name: str, column: int, ty: _Type, op: str, op_column: int,
             args: tuple, kwargs: dict) -> fx.Node:
        try:
            target = resolve_op(op)
        except KeyError as e:
            raise line.error(f"unknown op '{op}': {e.args[0]}", op_column) from None
        node = self.define(line, name, column,
                           lambda n: self.graph.create_node("call_function", target, args, kwargs, name=n))
        from torch._dispatch.python import enable_python_dispatcher

        from optc.ir.printer import type_str
        from optc.ir.rewrite import compute_val
        try:
            # as torch.export computes them: composite ops (aten.pad) through their symbolic-aware
            # Python decompositions, which do not specialise a symbolic dim to its example size
            with enable_python_dispatcher():
                val = compute_val(node, self.mode)
        except Exception as e:  # noqa: BLE001 - an op's shape function raises any exception type
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise line.error(f"cannot compute the type of %{name}: {op} raised {type(e).__name__}: {first}",
                             op_column) from e
        if type_str(val) != ty.text:
            raise line.error(f"%{name} is declared {ty.text} but {op} computes {type_str(val)}", ty.column)
        node.meta["val"] = val
        return node


_HINTS = (5, 7, 11, 13, 17, 19, 23, 29)   # example sizes of symbolic dims without an example value: distinct


def _contiguous_strides(sizes) -> list:
    strides, acc = [], 1
    for s in reversed(sizes):
        strides.append(acc)
        acc = acc * s
    return list(reversed(strides))


def _random(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """The values optc's CLI makes for an input spec: normal floats, integers in [0, 100), booleans."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.randint(0, 100, shape, generator=generator, dtype=dtype)


def parse_program(text: str, weights: dict[str, torch.Tensor] | None = None, *, filename: str = "<text>",
                  name: str | None = None) -> Program:
    """The Program that ``text`` (what :func:`optc.ir.printer.format_text` prints) describes; see the
    module doc. ``weights`` maps get_attr targets to tensors and ``%INPUT`` to example inputs."""
    weights = dict(weights or {})
    b = _Builder(weights)
    lines = text.splitlines()
    rows = [(i + 1, s) for i, s in enumerate(lines) if s.strip() and not s.strip().startswith("#")]
    if not rows:
        raise ParseError("expected 'graph(...):', found an empty text", filename=filename, line=1, column=1)
    lineno, s = rows[0]
    header = _Line(s, lineno, filename)
    header.expect("graph", "'graph(' at the start of the program")
    header.expect("(", "'(' after 'graph'")
    if not header.eat(")"):
        while True:
            header.ws()
            col = header.i
            pname = header.name("an input %NAME")
            header.expect(":", f"':' and the type of input %{pname}")
            b.placeholder(header, pname, col, header.type())
            if header.eat(")"):
                break
            header.expect(",", "',' or ')' after an input")
    header.expect(":", "':' ending the graph header")
    if not header.at_end():
        raise header.expected("the end of the line after 'graph(...):'")

    origins: dict[fx.Node, tuple] = {}
    output = None
    for lineno, s in rows[1:]:
        line = _Line(s, lineno, filename)
        if output is not None:
            raise line.expected("nothing after 'return (...)'")
        if line.peek("return"):
            line.expect("return")
            line.expect("(", "'(' after 'return'")
            outs = []
            if not line.eat(")"):
                while True:
                    outs.append(line.arg(b.env))
                    if line.eat(")"):
                        break
                    line.expect(",", "',' or ')' in the return values")
            if not line.at_end():
                raise line.expected("the end of the line after 'return (...)'")
            output = b.graph.output(tuple(outs))
            continue
        line.ws()
        col = line.i
        nname = line.name("'%NAME : TYPE = ...' or 'return (...)'")
        line.expect(":", f"':' and the type of %{nname}")
        ty = line.type()
        line.expect("=", f"'=' after the type of %{nname}")
        line.ws()
        op_col = line.i
        op = line.match(_DOTTED)
        if op is None:
            raise line.expected("an op name such as aten.add.Tensor, or get_attr")
        if op == "get_attr":
            target = line.match(_TARGET)
            if target is None:
                raise line.expected("the attribute after get_attr")
            notes = line.notes()
            b.get_attr(line, nname, col, ty, target)
            node = b.env[nname]
        else:
            args, kwargs = line.call_args(b.env)
            notes = line.notes()
            node = b.call(line, nname, col, ty, op, op_col, args, kwargs)
        _apply_notes(line, node, notes, origins)
    if output is None:
        last = rows[-1][0]
        raise ParseError("expected 'return (...)' ending the graph, found the end of the text",
                         filename=filename, line=last + 1, column=1)

    gm = fx.GraphModule(dict(b.attrs), b.graph, class_name="GraphModule")
    gm._optc_fake_mode = b.mode
    provenance.stamp(gm)
    for node, (origin, pass_name, rule) in origins.items():
        if origin:
            node.meta[provenance.ORIGIN] = origin
        if pass_name:
            node.meta[provenance.PASS] = pass_name
        if rule:
            node.meta[provenance.RULE] = rule
    n_out = len(output.args[0])
    placeholders = [n.name for n in b.graph.nodes if n.op == "placeholder"]
    args = tuple(b.inputs)
    if name is None:
        name = re.sub(r"\W", "_", os.path.splitext(os.path.basename(filename))[0]) if not filename.startswith("<") \
            else "model"
    return Program(
        graph_module=gm,
        in_spec=pytree.tree_flatten((args, {}))[1],
        out_spec=pytree.tree_flatten(0 if n_out == 1 else tuple(range(n_out)))[1],
        input_leaves=tuple(InputLeaf(f"args[{i}]", True) for i in range(len(placeholders))),
        example_args=args, example_kwargs={}, name=name,
        meta={"capture_method": "parse", "source_file": filename})


def _apply_notes(line: _Line, node: fx.Node, notes: list[str], origins: dict) -> None:
    """``# file.py:LINE; from %a by PASS (rule R)``: the source line and the provenance."""
    source_seen = False
    for note in notes:
        m = _PROVENANCE.match(note)
        if m is not None and (m.group("origin") or m.group("pass")):
            origin = tuple(o.strip()[1:] for o in m.group("origin").split(",")) if m.group("origin") else None
            origins[node] = (origin, m.group("pass"), m.group("rule"))
        elif not source_seen:
            node.meta["optc_source"] = note
            source_seen = True
        else:
            raise line.error(f"unexpected note '{note}' (a node's notes are its source line and its "
                             "provenance, 'from %a by PASS')", line.s.find(note))


# ---- on disk --------------------------------------------------------------------------------------------------
def program_tensors(program: Program | fx.GraphModule, inputs: list | tuple | None = None) -> dict[str, torch.Tensor]:
    """What ``X.optc.weights`` holds: every get_attr target's tensor, and ``%NAME`` for each input with an
    example value (``inputs``, or the Program's example inputs)."""
    gm = program.graph_module if isinstance(program, Program) else program
    out: dict[str, torch.Tensor] = {}
    tensors = attr_tensors(gm)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            raise OptcError(f"cannot save %{node.name}: get_attr '{node.target}' is not a tensor")
    out.update({k: t.detach() for k, t in tensors.items()})
    if inputs is None and isinstance(program, Program):
        try:
            inputs = program.example_flat_inputs()
        except OptcError:
            inputs = None
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if inputs is not None and len(inputs) == len(placeholders):
        for pname, value in zip(placeholders, inputs):
            if isinstance(value, torch.Tensor):
                out[f"%{pname}"] = value.detach()
    return out


def save_program_text(program: Program | fx.GraphModule, path: str, *, inputs: list | tuple | None = None,
                      with_provenance: bool = False) -> list[str]:
    """Write ``path`` (the text) and ``path + '.weights'`` (see :func:`program_tensors`), each to a
    temporary file first; the weights are put in place before the text, so a reader that sees the new
    text sees its weights. Returns both paths."""
    from optc.ir.printer import format_text
    text = format_text(program, with_provenance=with_provenance)
    tensors = program_tensors(program, inputs)
    weights_path = path + WEIGHTS_SUFFIX
    write_atomic(weights_path, lambda f: torch.save(tensors, f))
    write_atomic(path, lambda f: f.write(text.encode()))
    return [path, weights_path]


def load_program(path: str, *, weights_path: str | None = None) -> Program:
    """The Program of ``path`` (an ``.optc`` text), its tensors from ``path + '.weights'``."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise OptcError(f"cannot read '{path}': {e.strerror or e}") from None
    weights_path = weights_path or path + WEIGHTS_SUFFIX
    weights = {}
    if os.path.exists(weights_path):
        try:
            weights = torch.load(weights_path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises pickle, zip and runtime errors
            raise WeightsError(f"cannot read the weights of '{path}' from '{weights_path}': "
                               f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from None
        if not isinstance(weights, dict):
            raise WeightsError(f"'{weights_path}' holds a {type(weights).__name__}, not a dict of tensors")
    try:
        return parse_program(text, weights, filename=path)
    except WeightsError as e:
        if not os.path.exists(weights_path):
            raise WeightsError(f"{e} (the side file '{weights_path}' does not exist)") from None
        raise


def write_atomic(path: str, write: Callable, *, what: str = "") -> None:
    """``write(binary file)`` into ``path``, complete or absent: a temporary file beside it, renamed
    over it (with the usual mode); an OSError is an :class:`OptcError` naming ``what`` and the path."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; give the file the usual mode
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    except OSError as e:
        raise OptcError(f"cannot write {what + ' ' if what else ''}'{path}': {e.strerror or e}") from None


__all__ = ["write_atomic", "parse_program", "resolve_op", "program_tensors", "save_program_text", "load_program", "WEIGHTS_SUFFIX"]
