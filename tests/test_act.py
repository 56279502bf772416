"""The activation table: one ABI shared by Python, the C++ core and the Triton kernels."""
import pytest
import torch

from jsp_fast import _act
from jsp_fast._ext import require_C


def test_codes_match_the_compiled_core():
    assert require_C().act_codes() == _act.CODES


def test_order_is_by_code():
    assert all(_act.ACTIVATIONS[c] == name for name, c in _act.CODES.items())


@pytest.mark.parametrize("name", _act.ACTIVATIONS)
def test_derivatives_agree_with_autograd(name):
    torch.manual_seed(0)
    pre = (torch.randn(257, dtype=torch.float64) * 2).requires_grad_(True)
    y = _act.apply(name, pre)
    (ref,) = torch.autograd.grad(y.sum(), pre)
    torch.testing.assert_close(_act.derivative(name, pre, y), ref)
    torch.testing.assert_close(_act.dact_from_y(name, y), ref)
    yy = y.detach().requires_grad_(True)
    d2 = _act.ddact_dy(name, yy)
    if d2 is None:  # act' is piecewise constant in y: nothing for double backward to carry
        assert name in ("none", "relu")
    else:
        (ref2,) = torch.autograd.grad(_act.dact_from_y(name, yy).sum(), yy)
        torch.testing.assert_close(d2, ref2)


@pytest.mark.parametrize("bad", ["gelu", "", 3])
def test_unknown_names_are_refused(bad):
    with pytest.raises(ValueError, match="expected None or one of"):
        _act.check(bad)


def test_aliases():
    assert _act.check(None) == _act.check("Identity") == "none"
    assert _act.code("TANH") == 1
