"""``optc report``: the self-contained HTML page (data, grouping, overlays, history) and, where a
Chromium is installed (or installable: the ``headless_chromium`` fixture in conftest.py), the page itself in a headless browser."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
import torch.fx as fx

from optc.tools.cli import main
from optc.tools.report import CHUNK, MAX_CHILDREN, build_report, graph_data, render_html


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, 2 * d)
        self.fc2 = torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Deep(torch.nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(n))
        self.head = torch.nn.Linear(d, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _data(model, x, **kw):
    return build_report(model, (x,), pipeline=kw.pop("pipeline", "default"), **kw).data


def test_groups_follow_the_module_tree():
    torch.manual_seed(0)
    data = _data(Deep().eval(), torch.randn(2, 8), with_time=False)
    groups = {g["id"]: g for g in data["groups"]}
    assert {"blocks.0", "blocks.0.fc1", "blocks.2.fc2", "head"} <= set(groups)
    ids = [g["id"] for g in data["groups"]]
    assert groups["blocks.0.fc1"]["parent"] == ids.index("blocks.0")
    assert groups["blocks.0.fc1"]["label"] == "fc1" and groups["blocks.0.fc1"]["cls"] == "Linear"
    by_name = {n["n"]: n for n in data["nodes"]}
    relu = [n for n in data["nodes"] if n["op"] == "aten.relu"]
    assert len(relu) == 3 and [data["groups"][n["g"]]["id"] for n in relu] == ["blocks.0", "blocks.1", "blocks.2"]
    # every node once, edges as input indices
    assert len(data["nodes"]) == len(by_name)
    out = [n for n in data["nodes"] if n["op"] == "output"][0]
    assert [data["nodes"][i]["op"] for i in out["in"]] == ["aten.linear"]
    assert data["nodes"][out["in"][0]]["src"].startswith("test_report.py:")


def test_a_big_group_is_split_into_runs():
    # 600 elementwise ops at the root, no module structure: runs of CHUNK, none over MAX_CHILDREN
    def f(x):
        for i in range(600):
            x = x * 1.0001 + i
        return x
    gm = fx.symbolic_trace(f)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(3))
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                n.meta["val"] = fake
    prog = type("P", (), {"graph_module": gm, "name": "f"})()
    data = graph_data(prog)
    members: dict[int, int] = {}
    for n in data["nodes"]:
        members[n["g"]] = members.get(n["g"], 0) + 1
    for i, g in enumerate(data["groups"]):
        members[g["parent"]] = members.get(g["parent"], 0) + 1
    assert all(v <= MAX_CHILDREN for k, v in members.items() if k >= 0)
    runs = [g for g in data["groups"] if g.get("chunk")]
    assert len(runs) == -(-len(data["nodes"]) // CHUNK) and all(g["parent"] == 0 for g in runs)
    assert sum(members[i] for i, g in enumerate(data["groups"]) if g.get("chunk")) == len(data["nodes"])


def test_history_has_each_changed_pass_as_a_diff_and_refusals():
    torch.manual_seed(0)
    data = _data(Deep().eval(), torch.randn(2, 8), pipeline="canonicalize,merge-parallel-linear,dce", with_time=False)
    assert [h["pass"] for h in data["history"]] == ["canonicalize", "merge-parallel-linear", "dce"]
    for h in data["history"]:
        assert bool(h["diff"]) == h["modified"], h["pass"]
        if h["modified"]:
            assert any(line.startswith(("+", "-")) for line in h["diff"].splitlines())


def test_overlays_error_flops_params_and_the_float16_overflow(tmp_path, overflow_file):
    out = tmp_path / "r.html"
    rc = main(["report", f"{overflow_file}:make", "--pipeline", "to-half{dtype=float16,range_check=false}",
               "--out", str(out)])
    assert rc == 0
    data = _page_data(out.read_text())
    names = [n["n"] for n in data["nodes"]]
    ov = {o["key"]: o for o in data["overlays"]}
    assert set(ov) >= {"error", "flops", "weights"}
    err = dict(zip(names, ov["error"]["values"]))
    # y * y overflows: the first node, in graph order, far off (inf is written as 1e308); its input
    # y = h * 300 is still fine
    worst = next(k for k in names if err[k] is not None and err[k] > 1e-2)
    node = data["nodes"][names.index(worst)]
    assert node["op"] == "aten.mul.Tensor" and node["src"] == "overflow.py:12"
    assert err[worst] >= 1e300 and err[data["nodes"][node["in"][0]]["n"]] < 1e-2
    lin = [n for n in data["nodes"] if n["op"] == "aten.linear"][0]
    assert ov["flops"]["values"][names.index(lin["n"])] == 2 * 4 * 8 * 8
    assert ov["weights"]["values"][names.index(lin["n"])] == (8 * 8 + 8) * 2   # float16 now


def test_onnx_backend_adds_time_and_the_node_map():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    data = _data(Deep().eval(), torch.randn(2, 8), backend="onnx")
    ov = {o["key"]: o for o in data["overlays"]}
    assert "time" in ov
    timed = [(n, t) for n, t in zip(data["nodes"], ov["time"]["values"]) if t is not None]
    assert timed and all(t > 0 for _, t in timed)
    assert any(n["op"] == "aten.linear" for n, _ in timed)
    assert all(n.get("be") for n, _ in timed)   # time comes through the node map
    assert data["history"][-1]["index"] > len([h for h in data["history"] if h["pass"] != "ort-contrib-ops"]) - 5


def test_the_page_is_self_contained_and_escapes_the_data():
    torch.manual_seed(0)
    report = build_report(Deep().eval(), (torch.randn(2, 8),), with_time=False, with_error=False)
    report.data["title"] = "</script><script>alert(1)</script>"
    page = render_html(report.data)
    assert page.count("<script") == 3 and "src=" not in re.sub(r"<script>.*?</script>", "", page, flags=re.S)
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)
    assert "</script><script>alert" not in page
    assert _page_data(page)["title"] == report.data["title"]


def test_bad_input(tmp_path, capsys, overflow_file):
    torch.manual_seed(0)
    path = overflow_file
    missing = tmp_path / "no" / "such" / "r.html"
    assert main(["report", f"{path}:make", "--out", str(missing)]) == 2
    assert "not writable" in capsys.readouterr().err
    assert main(["report", f"{path}:make", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.html*"))


def test_model_explorer_format(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "me"
    assert main(["report", "zoo:bert", "--tiny", "--backend", "onnx", "--format", "model-explorer",
                 "--out", str(out)]) == 0
    graph = json.loads((out / "graph.json").read_text())
    ids = {n["id"] for g in graph["graphs"] for n in g["nodes"]}
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["graph.json"] + [f"{k}.nodedata.json" for k in ("error", "time", "flops", "params",
                                                                             "weights")])
    for name in files[:-1] if files[-1] == "graph.json" else [f for f in files if f != "graph.json"]:
        data = json.loads((out / name).read_text())
        (gid, per_graph), = data.items()
        assert gid == graph["graphs"][0]["id"] and per_graph["results"]
        assert set(per_graph["results"]) <= ids, name


def _page_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="optc-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


# ---- in a real browser ---------------------------------------------------------------------------------------
def _check_selftest(result: dict, nodes: int) -> None:
    assert result["errors"] == []
    assert result["shownCount"] == result["nodes"] == nodes
    assert result["expandShowsMembers"] is True and result["visibleAfter"] > result["visibleBefore"]
    for key, o in result["overlays"].items():
        assert o["coloured"] == o["expected"] and o["expected"] > 0, key
    assert result["searchHits"] and result["revealed"] and result["details"]


def test_bert_report_in_headless_chromium(tmp_path, headless_chromium):
    out = tmp_path / "bert.html"
    assert main(["report", "zoo:bert", "--tiny", "--backend", "onnx", "--out", str(out)]) == 0
    nodes = len(_page_data(out.read_text())["nodes"])
    result, console = headless_chromium(str(out))
    _check_selftest(result, nodes)
    assert set(result["overlays"]) == {"error", "time", "flops", "params", "weights"}
    assert console == []


@pytest.mark.slow
def test_a_10k_node_report_in_headless_chromium(tmp_path, headless_chromium):
    out = tmp_path / "big.html"
    assert main(["report", "zoo:bert", "--config", "num_layers=240", "--config", "hidden_size=16",
                 "--config", "num_heads=2", "--config", "intermediate_size=32", "--pipeline", "dce",
                 "--no-time", "--out", str(out)]) == 0
    data = _page_data(out.read_text())
    assert len(data["nodes"]) > 10_000
    result, console = headless_chromium(str(out), timeout=180)
    _check_selftest(result, len(data["nodes"]))
    assert result["visibleBefore"] <= MAX_CHILDREN and console == []


def test_a_graph_without_modules_in_headless_chromium(tmp_path, headless_chromium):
    out = tmp_path / "flat.py"
    out.write_text(textwrap.dedent("""\
        import torch

        class Flat(torch.nn.Module):
            def forward(self, x):
                for i in range(300):
                    x = torch.sin(x) * 1.01 + i
                return x

        def make():
            return Flat(), (torch.randn(4),)
        """))
    html_path = tmp_path / "flat.html"
    assert main(["report", f"{out}:make", "--pipeline", "dce", "--out", str(html_path)]) == 0
    data = _page_data(html_path.read_text())
    assert all(g.get("chunk") for g in data["groups"][1:])
    result, console = headless_chromium(str(html_path))
    _check_selftest(result, len(data["nodes"]))
    assert console == []
