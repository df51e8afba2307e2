import pytest

from optc.errors import PipelineError
from optc.passes.pipeline import parse, resolve


@pytest.mark.parametrize("text", [
    "dce",
    "canonicalize,constant-fold,cse,dce",
    "default,dce",
    "constant-fold{max_bytes=1024},dce",
    'constant-fold{max_bytes=1024},x{a=1,b="p,q{r}"}',
    "",
])
def test_round_trip(text):
    assert str(parse(text)) == text


def test_items_and_options():
    p = parse("a{x=1,y=true},b")
    assert [i.name for i in p] == ["a", "b"]
    assert p.items[0].option_dict == {"x": "1", "y": "true"}


@pytest.mark.parametrize("text, message", [
    ("dce,", "trailing ','"),
    ("dce,,cse", "expected a pass name"),
    ("dce{", "expected an option name"),
    ("dce{x}", "expected '=' after option 'x'"),
    ("dce{x=}", "has no value"),
    ("dce{x=1", "expected ',' or '}'"),
    ("dce{x=1,x=2}", "given twice"),
    ("dce cse", "expected ','"),
    ('dce{x="a}', "unterminated"),
    ("9dce", "expected a pass name"),
])
def test_malformed(text, message):
    with pytest.raises(PipelineError, match=message) as info:
        parse(text)
    assert "column" in str(info.value)


def test_unknown_pass_lists_valid_ones():
    with pytest.raises(PipelineError) as info:
        resolve("dce,fold-everything")
    msg = str(info.value)
    assert "unknown pass 'fold-everything'" in msg and "dce" in msg and "cse" in msg


def test_unknown_option_lists_valid_ones():
    with pytest.raises(PipelineError, match=r"pass 'dce' has no option 'ratio' \(valid options: none\)"):
        resolve("dce{ratio=0.5}")


def test_bad_option_value_is_named():
    with pytest.raises(PipelineError, match=r"max_bytes='lots' is not a valid int"):
        resolve("constant-fold{max_bytes=lots}")


def test_default_expands_inside_a_list():
    names = [p.name for p in resolve("default,dce", default="cse,dce")]
    assert names == ["cse", "dce", "dce"]
    with pytest.raises(PipelineError, match="'default' takes no options"):
        resolve("default{x=1}", default="dce")


def test_ordering_constraints_are_checked(monkeypatch):
    from optc.passes import base
    info = base.get_pass("cse")
    monkeypatch.setitem(base._REGISTRY, "cse", base.PassInfo(info.name, info.fn, info.exact, info.description,
                                                             info.options, after=("canonicalize",)))
    assert [p.name for p in resolve("canonicalize,cse")] == ["canonicalize", "cse"]
    with pytest.raises(PipelineError, match="'cse' must run after 'canonicalize'"):
        resolve("cse,canonicalize")


def test_pruning_written_after_default_moves_before_the_merge_that_needs_it():
    # ``default,prune-heads``: merge-parallel-linear (and convert-layout) of the default pipeline
    # must run after pruning, so the user's pass moves to just before the first of them, with a note
    default = "canonicalize,fuse-attention,merge-parallel-linear,convert-layout{layout=NHWC},cse,dce"
    passes = resolve("default,prune-heads,cse", default)
    assert [p.name for p in passes] == ["canonicalize", "fuse-attention", "prune-heads", "merge-parallel-linear",
                                        "convert-layout", "cse", "dce", "cse"]
    assert passes[2].moved == "moved before 'merge-parallel-linear' of the default pipeline, which must run after it"
    assert not any(p.moved for i, p in enumerate(passes) if i != 2)
    # never moved past a pass the user wrote: then the order is refused, with the reason
    with pytest.raises(PipelineError, match="'merge-parallel-linear' must run after 'prune-channels'"):
        resolve("merge-parallel-linear,prune-channels", default)
    with pytest.raises(PipelineError, match="must run after 'prune-channels'"):
        resolve("default,cse,prune-channels", default)
