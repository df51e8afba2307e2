import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optc
from optc.errors import InputSpecError, OptcError
from optc.tools import zoo


def _kl(teacher, student, x) -> float:
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(student(x), -1), F.log_softmax(teacher(x), -1), log_target=True,
                              reduction="batchmean"))


@pytest.fixture(scope="module")
def cnn():
    model, _ = zoo.load("small_cnn", **zoo.tiny_config("small_cnn"))
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    program = optc.capture(model, (x[:2],), dynamic_shapes="batch")
    return model, program, x


def test_recover_pruned_program_by_distillation(cnn):
    model, program, x = cnn
    pruned, _ = optc.optimize(program, "prune-channels{ratio=0.5}")
    weights = {k: v.clone() for k, v in pruned.graph_module.state_dict().items()}
    held_out = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    recovered = optc.recover(pruned, teacher=model, data=x, steps=40, lr=1e-2, batch_size=16, progress=False)
    assert _kl(model, recovered, held_out) < 0.5 * _kl(model, pruned, held_out)
    info = recovered.meta["recover"]
    assert info["steps"] == 40 and info["last_loss"] < info["first_loss"]
    for k, v in pruned.graph_module.state_dict().items():      # the input program is untouched
        assert torch.equal(v, weights[k]), k
    assert recovered.output_specs == pruned.output_specs
    assert not any(p.requires_grad for p in recovered.graph_module.parameters())


def test_magnitude_pruned_weights_stay_zero(cnn):
    model, program, x = cnn
    sparse, _ = optc.optimize(program, "prune-magnitude{ratio=0.5}")
    recovered = optc.recover(sparse, teacher=model, data=x, steps=5, lr=1e-2, batch_size=16, progress=False)
    masked = [n for n in recovered.graph.nodes if n.op == "get_attr" and "prune_mask" in n.meta]
    assert len(masked) == 4
    changed = False
    for n in masked:
        w, mask = getattr(recovered.graph_module, n.target), n.meta["prune_mask"]
        assert bool((w[~mask] == 0).all()), n.target
        changed |= not torch.equal(w[mask], getattr(sparse.graph_module, n.target)[mask])
    assert changed


def test_batches_with_labels_and_progress_bar(cnn, capsys):
    model, program, x = cnn
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size=8)
    optc.recover(program, teacher=program, data=loader, steps=3, progress=True)   # labels are ignored
    assert "recover" in capsys.readouterr().err


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x))


def test_non_logit_outputs_use_mse():
    model = Dense().eval()
    x = torch.randn(4, 2, 5, 5)
    program = optc.capture(model, (x,))
    sparse, _ = optc.optimize(program, "prune-magnitude{ratio=0.7}")
    out = optc.recover(sparse, teacher=model, data=[x] * 2, steps=20, lr=1e-2, progress=False)
    assert out.meta["recover"]["last_loss"] < out.meta["recover"]["first_loss"]


def test_bad_input():
    model = Dense().eval()
    program = optc.capture(model, (torch.randn(4, 2, 5, 5),))
    with pytest.raises(InputSpecError, match="dynamic_shapes='batch'"):
        optc.recover(program, model, torch.randn(16, 2, 5, 5), steps=1, batch_size=8, progress=False)
    with pytest.raises(OptcError, match="loss must be one of"):
        optc.recover(program, model, torch.randn(4, 2, 5, 5), loss="l1", progress=False)
    with pytest.raises(OptcError, match="data must be"):
        optc.recover(program, model, 3.0, steps=1, progress=False)
    with pytest.raises(OptcError, match="ran out"):
        optc.recover(program, model, iter([torch.randn(4, 2, 5, 5)]), steps=2, progress=False)
    with pytest.raises(TypeError, match="takes a Program"):
        optc.recover(model, model, torch.randn(4, 2, 5, 5))
