import torch
import torch.nn as nn
import torch.nn.functional as F

from optc.ir.capture import capture
from optc.ir.stats import format_stats, format_stats_diff, model_stats
from optc.passes.manager import PassManager
from optc.tools import cli


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = self.dw(h).mean((2, 3))
        q = h[:, None, None, :].expand(2, 2, 3, 8)
        a = F.scaled_dot_product_attention(q, q, q)                  # (2, 2, 3, 8)
        return self.fc(h) + a.sum((1, 2))[:, :4]


def test_model_stats_counts_flops_params_and_bytes():
    program = capture(Net().eval(), (torch.randn(2, 3, 5, 5),))
    stats = model_stats(program)
    rows = {r.name: r for r in stats.rows}
    assert rows["conv"].flops == 2 * (2 * 8 * 5 * 5) * (3 * 9)       # 2 * out_numel * in/groups * k
    assert rows["conv"].params == 8 * 3 * 9 and rows["conv"].weight_bytes == 8 * 3 * 9 * 4
    assert rows["dw"].flops == 2 * (2 * 8 * 5 * 5) * 9 and rows["dw"].params == 8 * 9 + 8
    assert rows["fc"].flops == 2 * 2 * 4 * 8 and rows["fc"].act_bytes == 2 * 4 * 4
    assert rows["bn"].params == 16 and rows["bn"].weight_bytes == 4 * 8 * 4      # + the running statistics
    sdpa = next(r for r in stats.rows if r.op == "aten.scaled_dot_product_attention")
    assert sdpa.flops == 2 * (2 * 2 * 3) * 3 * (8 + 8)
    assert stats.total.params == sum(p.numel() for p in Net().parameters())
    assert stats.total.flops == sum(r.flops for r in stats.rows)
    assert "total" in format_stats(stats).splitlines()[-1]


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.conv(x)))).mean((2, 3))


def test_stats_diff_after_pruning():
    program = capture(Plain().eval(), (torch.randn(2, 3, 5, 5),))
    pruned, _ = PassManager("prune-channels{ratio=0.5}", default="").run(program)
    before, after = model_stats(program), model_stats(pruned)
    assert after.row("conv2d").flops * 2 == before.row("conv2d").flops
    text = format_stats_diff(before, after)
    conv = next(line for line in text.splitlines() if line.startswith("conv "))
    assert "216->108 0.50x" in conv
    assert text.splitlines()[-1].startswith("total")


def test_cli_dump_stats(capsys, tmp_path):
    status = cli.main(["dump", "zoo:small_cnn", "--tiny", "--pipeline", "prune-channels{ratio=0.5}", "--stats",
                       "--out", str(tmp_path / "g.txt")])
    err = capsys.readouterr().err
    assert status == 0
    lines = err.splitlines()
    assert any(line.startswith("features.2.0") and "0.25x" in line for line in lines)   # in and out halved
    total = next(line for line in lines if line.startswith("total ") and "pass time" not in line)
    assert "0.27x" in total                                                            # FLOPs
    status = cli.main(["dump", "zoo:small_cnn", "--tiny", "--stats", "--out", str(tmp_path / "g.txt")])
    assert status == 0 and capsys.readouterr().err.splitlines()[0].startswith("layer")


def test_onnx_runtime_attention_ops_count_the_flops_of_the_attention_they_replace():
    import optc.backends.onnx_contrib  # noqa: F401  (registers optc::ort_*)
    from optc.ir.stats import model_stats
    q, k, v = torch.randn(1, 5, 32), torch.randn(1, 7, 16), torch.randn(1, 7, 16)

    class Gqa(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.optc.ort_group_query_attention(q, k, v, None, 4, 2, 0.3, False)

    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))

    heads = (q.view(1, 5, 4, 8).transpose(1, 2), k.view(1, 7, 2, 8).transpose(1, 2), v.view(1, 7, 2, 8).transpose(1, 2))
    fused = model_stats(optc.capture(Gqa(), (q, k, v)))
    plain = model_stats(optc.capture(Sdpa(), heads))
    assert fused.total.flops == plain.total.flops == 2 * (1 * 4 * 5 * 7 * 8 * 2)
