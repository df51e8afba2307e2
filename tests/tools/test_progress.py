"""optc.tools.progress: a bar only on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import io

from optc.tools.progress import LineProgress, open_progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_each_step_of_the_budget_and_a_last_one():
    out = io.StringIO()
    p = open_progress("optc test", "model", total=40, file=out)
    assert isinstance(p, LineProgress)
    for k in range(39):
        p.set_postfix(mismatches=k // 10)
        p.update()
    p.write("a message")
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 19 + 1 + 1      # 5%, 10%, ... 95%; the message; at close, the models since 95%
    assert lines[0].startswith("optc test: 2/40 models (5%), 0:00 elapsed, ") and lines[0].endswith("mismatches=0")
    assert lines[-3].startswith("optc test: 38/40 models (95%)")
    assert lines[-2] == "a message"
    assert lines[-1].startswith("optc test: 39/40 models (98%)") and lines[-1].endswith("mismatches=3")


def test_without_a_budget_a_line_each_interval():
    out = io.StringIO()
    p = LineProgress("optc test", "item", interval_s=0.0, file=out)
    p.update(2)
    p.update(3)
    p.close()                            # nothing new since the last line: no line
    assert out.getvalue().splitlines()[0].startswith("optc test: 2 items, 0:00 elapsed, ")
    assert out.getvalue().splitlines()[1].startswith("optc test: 5 items, ")
    assert len(out.getvalue().splitlines()) == 2


def test_a_terminal_gets_a_bar():
    out = _Terminal()
    p = open_progress("optc test", "model", total=3, file=out, bar_format="{desc}: {n} models")
    assert not isinstance(p, LineProgress)
    p.update()
    p.close()
    assert "\r" in out.getvalue() and "optc test: 1 models" in out.getvalue()
