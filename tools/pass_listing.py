"""What ``optc passes`` prints: every registered pass in a table, or one pass in full.

The table fits a 100-column terminal: a pass's name and ``exact``/``lossy``, then its options as
``{name:type=default,...}`` (the syntax of ``--pipeline 'pass{name=value}'``, ``-`` for none)
and its description, wrapped from the third column (options at their commas; a description
after options that take more than a line starts a line of its own); the target's default
pipeline is wrapped at its commas. ``optc passes NAME`` shows one pass: description, numerics,
every option with its type, default and help, and the ordering constraints that involve it.
"""

from __future__ import annotations

from typing import Mapping

WIDTH = 100          # no line is longer
_NAME_COLUMN = 24    # longest name the table's first column widens to


def format_table(reg: Mapping, default_pipeline: str, target: str) -> str:
    """The table of every pass in ``reg`` (a name -> PassInfo mapping), then the default pipeline."""
    name_w = min(max((len(n) for n in reg), default=0), _NAME_COLUMN)
    indent = " " * (name_w + 2 + 5 + 2)
    lines = []
    for name in sorted(reg):
        info = reg[name]
        opts = ",".join(f"{k}:{_type_name(o.type)}={_value_text(o.default)}" for k, o in info.options.items())
        rows = _wrap_items(_split_after_commas("{" + opts + "}" if opts else "-", 1), WIDTH - len(indent))
        # the description follows options that fit on one line, else it starts a line of its own
        body = _flow(rows, info.description, WIDTH - len(indent)) if len(rows) == 1 else \
            rows + _flow([], info.description, WIDTH - len(indent))
        kind = "exact" if info.exact else "lossy"
        if len(name) > name_w:       # a long (plugin) name gets a line of its own
            lines.append(name)
            name = ""
        lines.append(f"{name:<{name_w}}  {kind}  {body[0]}")
        lines += [indent + line for line in body[1:]]
    lines += format_pipeline(f"default pipeline for {target}: ", default_pipeline, reg)
    return "\n".join(lines)


def format_pipeline(prefix: str, pipeline: str, reg: Mapping) -> list[str]:
    """``prefix`` and ``pipeline`` wrapped at its top-level commas, continuation lines aligned
    under the pipeline; then the passes it names that ``reg`` lacks, if any."""
    from optc.passes.pipeline import parse
    pad = " " * len(prefix)
    rows = _wrap_items(_split_after_commas(pipeline), WIDTH - len(prefix))
    lines = [prefix + rows[0]] + [pad + row for row in rows[1:]]
    missing = [item.name for item in parse(pipeline) if item.name not in reg]
    if missing:
        lines += [pad + row for row in _flow([], f"(not registered yet: {', '.join(missing)})", WIDTH - len(pad))]
    return lines


def format_pass(info, reg: Mapping, default_pipeline: str, target: str) -> str:
    """One pass in full: what ``optc passes NAME`` prints."""
    from optc.passes.pipeline import parse
    head = f"{info.name}: {info.description}"
    lines = [head] if len(head) <= WIDTH else [info.name, *_indented(info.description, 2)]
    lines.append("")
    if info.exact:
        numerics = "exact: the result computes the same function, up to floating-point rounding"
    elif info.lossy_tolerance is not None:
        numerics = f"lossy: outputs may differ from the input program's by up to {info.lossy_tolerance:g} " \
                   "(relative to their largest magnitude)"
    else:
        numerics = "lossy: outputs may differ from the input program's (no error bound declared)"
    lines += _labelled("numerics:", numerics)
    if info.options:
        example = ",".join(f"{k}={_value_text(o.default)}" for k, o in list(info.options.items())[:2])
        lines += _labelled("options:", f"name: type = default, then what it does; set as {info.name}{{{example}}}")
        for key, o in info.options.items():
            lines.append(f"  {key}: {_type_name(o.type)} = {_value_text(o.default) or repr('')}")
            if o.help:
                lines += _indented(o.help, 6)
    else:
        lines += _labelled("options:", "none")
    before = sorted(n for n, other in reg.items() if info.name in other.after)
    lines += _labelled("runs after:", ", ".join(info.after) + ", where a pipeline has both" if info.after else "-")
    lines += _labelled("runs before:", ", ".join(before) + ", where a pipeline has both" if before else "-")
    names = [item.name for item in parse(default_pipeline)]
    where = (f"position {names.index(info.name) + 1} of {len(names)}" if info.name in names else "not in it")
    lines += _labelled(f"default pipeline for {target}:", where)
    module = getattr(info.fn, "__module__", None)
    if module:
        lines += _labelled("defined in:", module)
    return "\n".join(lines)


def _labelled(label: str, text: str) -> list[str]:
    """``label`` then ``text`` wrapped, continuation lines aligned after the label's column."""
    col = max(len(label) + 1, 13)
    rows = _flow([], text, WIDTH - col)
    return [f"{label:<{col}}{rows[0]}"] + [" " * col + row for row in rows[1:]]


def _indented(text: str, n: int) -> list[str]:
    return [" " * n + row for row in _flow([], text, WIDTH - n)]


def _split_after_commas(text: str, level: int = 0) -> list[str]:
    """``text`` cut after each comma ``level`` braces deep: ``a,b{x=1,y=2},c`` -> ``a,``,
    ``b{x=1,y=2},``, ``c`` (a pipeline); ``{x:int=1,y:str=a}`` at level 1 -> ``{x:int=1,``,
    ``y:str=a}`` (options)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == level:
            items.append(text[start:i + 1])
            start = i + 1
    items.append(text[start:])
    return items


def _wrap_items(items: list[str], width: int) -> list[str]:
    """Pack ``items`` (joined without spaces) into rows of at most ``width``; an item longer than
    that is cut."""
    rows, cur = [], ""
    for item in items:
        while len(item) > width:
            if cur:
                rows.append(cur)
                cur = ""
            rows.append(item[:width])
            item = item[width:]
        if cur and len(cur) + len(item) > width:
            rows.append(cur)
            cur = ""
        cur += item
    rows.append(cur)
    return rows


def _flow(rows: list[str], text: str, width: int) -> list[str]:
    """``rows`` with ``text``'s words after the last row (two spaces apart from it) as far as they
    fit in ``width``, the rest wrapped into new rows."""
    rows = list(rows)
    cur, sep = (rows.pop(), "  ") if rows else ("", "")
    for word in text.split():
        if cur and len(cur) + len(sep) + len(word) > width:
            rows.append(cur)
            cur, sep = "", ""
        cur += sep + word
        sep = " "
    rows.append(cur)
    return rows


def _type_name(t) -> str:
    return "|".join(t) if isinstance(t, tuple) else t.__name__


def _value_text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
