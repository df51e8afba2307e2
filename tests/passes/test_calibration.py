"""Calibration observers (minmax, percentile, entropy) and calibration samples, against data whose
answer is known."""

import pytest
import torch

import optc
from optc.errors import InputSpecError, OptcError
from optc.ir.calibration import (EntropyObserver, MinMaxObserver, PercentileObserver, calibration_samples,
                                 make_observer, normalise_sample)


def test_minmax_is_the_range_over_every_sample():
    o = MinMaxObserver()
    for t in (torch.tensor([0.5, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([float("inf"), 0.0])):
        o.update(t)
    assert o.range() == (-3.0, 2.0)            # non-finite values are ignored
    assert MinMaxObserver().range() == (0.0, 0.0)


def test_percentile_clips_the_tail_to_the_given_fraction():
    values = torch.arange(10000, dtype=torch.float32)        # 0 .. 9999, one of each
    o = PercentileObserver(99.0)
    o.update(values)
    lo, hi = o.range()
    width = 9999 / 2048                                      # one histogram bin
    assert abs(hi - 9900) <= 2 * width and abs(lo - 100) <= 2 * width
    o = PercentileObserver(99.99)
    o.update(values)
    o.update(torch.tensor([1e6]))                            # one outlier widens the histogram (re-binned)
    lo, hi = o.range()
    # the outlier is past the 99.99th percentile; the re-binned histogram is ~1.1e6 / 2048 per bin
    assert 9999 <= hi <= 9999 + 2 * 1.1e6 / 2048 and lo == 0.0
    assert PercentileObserver(100.0).range() == (0.0, 0.0)
    with pytest.raises(OptcError, match=r"percentile must be in \(50, 100\]"):
        PercentileObserver(40.0)


def test_entropy_clips_a_far_outlier_and_keeps_a_bounded_range():
    torch.manual_seed(0)
    o = EntropyObserver()
    for _ in range(8):
        o.update(torch.rand(50000))
    o.update(torch.tensor([3.0]))                            # one value 3x past the data
    lo, hi = o.range()
    assert lo >= 0 and 0.95 <= hi <= 1.15                    # the threshold sits at the data's end
    bounded = EntropyObserver()
    for _ in range(8):
        bounded.update(torch.rand(50000) * 2 - 1)            # uniform: nothing to clip
    lo, hi = bounded.range()
    assert hi >= 0.95 and lo <= -0.95


def test_entropy_ignores_exact_zeros():
    torch.manual_seed(0)
    with_zeros, without = EntropyObserver(), EntropyObserver()
    for _ in range(4):
        t = torch.randn(100000).relu()                       # half exact zeros
        with_zeros.update(t)
        without.update(t[t > 0])
    # about the same threshold (the KL minimum is flat: the histograms' edges differ slightly, one
    # starting at 0, the other at the least positive value), and not dragged down to ~1.9 by the
    # spike at 0 (what the same search gives with the zeros in the histogram)
    assert with_zeros.range()[1] == pytest.approx(without.range()[1], rel=0.15)
    assert with_zeros.range()[1] > 3.0


def test_make_observer_names_the_valid_methods():
    assert isinstance(make_observer("entropy"), EntropyObserver)
    with pytest.raises(OptcError, match="unknown calibration method 'kl' \\(valid: minmax, percentile, entropy\\)"):
        make_observer("kl")


def test_sample_forms():
    x = torch.randn(2)
    assert normalise_sample(x) == ((x,), {})
    assert normalise_sample([x, x]) == ((x, x), {})
    assert normalise_sample({"x": x}) == ((), {"x": x})
    assert normalise_sample(((x,), {"m": x})) == ((x,), {"m": x})


class KwModel(torch.nn.Module):
    def forward(self, x, *, mask):
        return x * mask


def test_calibration_samples_accept_keyword_inputs_and_check_them():
    program = optc.capture(KwModel(), (torch.randn(2, 3),), {"mask": torch.ones(2, 3)})
    flat = calibration_samples(program, [((torch.randn(2, 3),), {"mask": torch.zeros(2, 3)})], samples=4)
    assert len(flat) == 1 and torch.equal(flat[0][1], torch.zeros(2, 3))
    with pytest.raises(InputSpecError, match="calibration sample 0 does not match"):
        calibration_samples(program, [torch.randn(2, 3)], samples=4)     # mask missing
