"""MLIR-style pipeline text: ``canonicalize,cse,prune-channels{ratio=0.5,round_to=8}``.

Grammar::

    pipeline := item ("," item)*
    item     := NAME [ "{" option ("," option)* "}" ]
    option   := KEY "=" VALUE          VALUE: any text without , { } or a "double-quoted" string

``default`` names the target's default pipeline and may appear anywhere in the list; it is
expanded when the pipeline is resolved for a target. ``str(parse(p)) == p`` for every
canonical ``p`` (no spaces). Validation -- unknown passes, unknown options, bad values,
ordering constraints -- happens in :func:`resolve` and raises :class:`PipelineError` listing
what is valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from optc.errors import PipelineError

_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]*")
DEFAULT = "default"


@dataclass(frozen=True)
class PipelineItem:
    name: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"

    @property
    def option_dict(self) -> dict[str, str]:
        return {k: _unquote(v) for k, v in self.options}


@dataclass(frozen=True)
class Pipeline:
    items: tuple[PipelineItem, ...]

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.items)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _unquote(v: str) -> str:
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v


def parse(text: str) -> Pipeline:
    """Parse pipeline text (syntax only; see :func:`resolve` for names and options)."""
    if not isinstance(text, str):
        raise PipelineError(f"pipeline must be a string, got {type(text).__name__}")
    s = text.strip()
    if not s:
        return Pipeline(())
    items: list[PipelineItem] = []
    i = 0
    n = len(s)

    def err(msg: str, at: int):
        caret = " " * at + "^"
        raise PipelineError(f"malformed pipeline: {msg} at column {at + 1}\n  {s}\n  {caret}")

    while i < n:
        while i < n and s[i] == " ":
            i += 1
        m = _NAME.match(s, i)
        if not m:
            err("expected a pass name", i)
        name = m.group(0)
        i = m.end()
        options: list[tuple[str, str]] = []
        if i < n and s[i] == "{":
            i += 1
            if i < n and s[i] == "}":
                err("empty option list", i)
            while True:
                km = re.compile(r"[a-zA-Z_][a-zA-Z0-9_-]*").match(s, i)
                if not km:
                    err(f"expected an option name in '{name}{{...}}'", i)
                key = km.group(0)
                i = km.end()
                if i >= n or s[i] != "=":
                    err(f"expected '=' after option '{key}' of '{name}'", i)
                i += 1
                if i < n and s[i] == '"':
                    j = s.find('"', i + 1)
                    if j < 0:
                        err("unterminated quoted value", i)
                    value = s[i:j + 1]
                    i = j + 1
                else:
                    j = i
                    while j < n and s[j] not in ",}{":
                        j += 1
                    value = s[i:j].strip()
                    i = j
                if value == "":
                    err(f"option '{key}' of '{name}' has no value", i)
                if any(k == key for k, _ in options):
                    err(f"option '{key}' given twice for '{name}'", i)
                options.append((key, value))
                if i < n and s[i] == ",":
                    i += 1
                    continue
                if i < n and s[i] == "}":
                    i += 1
                    break
                err(f"expected ',' or '}}' in the options of '{name}'", i)
        items.append(PipelineItem(name, tuple(options)))
        while i < n and s[i] == " ":
            i += 1
        if i < n:
            if s[i] != ",":
                err("expected ','", i)
            i += 1
            if i >= n:
                err("trailing ','", i - 1)
    return Pipeline(tuple(items))


@dataclass(frozen=True)
class ResolvedPass:
    info: "object"       # PassInfo
    options: dict
    text: str            # the item as written, e.g. prune-channels{ratio=0.5}
    from_default: bool = False    # came from the expansion of ``default``
    moved: str = ""               # why resolve() moved it (empty: where the user wrote it)

    @property
    def name(self) -> str:
        return self.info.name


def resolve(pipeline: str | Pipeline, default: str | Pipeline = "") -> list[ResolvedPass]:
    """Expand ``default``, look up every pass, parse and validate options and ordering."""
    from optc.passes.base import get_pass

    p = parse(pipeline) if isinstance(pipeline, str) else pipeline
    d = parse(default) if isinstance(default, str) else default
    out: list[ResolvedPass] = []
    for item in p:
        if item.name == DEFAULT:
            if item.options:
                raise PipelineError("'default' takes no options")
            for sub in d:
                if sub.name == DEFAULT:
                    raise PipelineError("the default pipeline cannot contain 'default'")
                info = get_pass(sub.name)
                out.append(ResolvedPass(info, info.parse_options(sub.option_dict), str(sub), from_default=True))
            continue
        info = get_pass(item.name)
        out.append(ResolvedPass(info, info.parse_options(item.option_dict), str(item)))
    out = _hoist_into_default(out)
    _check_order(out)
    return out


def _hoist_into_default(passes: list[ResolvedPass]) -> list[ResolvedPass]:
    """``default,prune-channels{...}``: a pass of the default pipeline (``merge-parallel-linear``,
    ``convert-layout``) declares that it must run after the user's pass, which the user wrote after
    ``default``. The user's pass is moved to just before the first default pass that needs it, when
    only default passes lie between (never past another pass the user wrote); the move is recorded
    in ``ResolvedPass.moved`` and reported by the PassManager. Any other order is left for
    :func:`_check_order` to refuse."""
    out = list(passes)
    for _ in range(len(out)):
        moved = False
        for i, rp in enumerate(out):
            if not rp.from_default:
                continue
            for j in range(i + 1, len(out)):
                q = out[j]
                if q.from_default or q.name not in rp.info.after:
                    continue
                if any(not x.from_default for x in out[i:j]):
                    continue
                out.pop(j)
                why = (f"moved before '{rp.name}' of the default pipeline, which must run after it")
                out.insert(i, ResolvedPass(q.info, q.options, q.text, False, why))
                moved = True
                break
            if moved:
                break
        if not moved:
            break
    return out


def _check_order(passes: list[ResolvedPass]) -> None:
    position: dict[str, int] = {}
    for i, rp in enumerate(passes):
        position.setdefault(rp.name, i)
    for i, rp in enumerate(passes):
        for before in rp.info.after:
            j = position.get(before)
            if j is not None and j > i:
                raise PipelineError(f"pass '{rp.name}' must run after '{before}', but the pipeline "
                                    f"has it at position {i + 1} and '{before}' at {j + 1}")
