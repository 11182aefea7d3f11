"""keep_float keeps everything a named module computes in float, its functional ops (adds) included."""

from __future__ import annotations

import torch
from torch import nn

import fxq
from fxq.backend.conv_add import is_conv_add
from fxq.backend.op_kinds import is_quantized_module
from helpers import sqnr


class Merge(nn.Module):
    """A module with no layers of its own: only its functional add can be kept in float."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.merge = Merge()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.head(self.merge(self.left(x), self.right(x)) + x)


def _int8_adds(model: nn.Module) -> int:
    """int8 add ops, and convs that add their residual inside the kernel (onednn's conv2d_add)."""
    return sum(1 for node in model.graph.nodes
               if node.op == "call_function" and "quantized" in str(node.target) and "add" in str(node.target)
               or node.op == "call_module" and is_conv_add(model.get_submodule(str(node.target))))


def test_a_module_kept_float_keeps_its_functional_ops_float():
    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    all_int8 = fxq.quantize(model, (batches[0][:1],), calibration_data=batches)
    kept = fxq.quantize(model, (batches[0][:1],), calibration_data=batches, keep_float=["merge"])
    assert _int8_adds(all_int8) == 2
    assert _int8_adds(kept) == 1  # the top-level add stays int8
    assert all(is_quantized_module(kept.get_submodule(name)) for name in ("stem", "left", "right", "head"))
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert sqnr(model(x), kept(x)) > 25


class ActivationsBetweenConvs(nn.Module):
    """Activations torch.ao lowers to int8 by module type whenever they sit between int8 layers."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3)
        self.act = nn.Hardswish()
        self.second = nn.Conv2d(8, 8, 3)
        self.slopes = nn.PReLU(8)
        self.third = nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.third(self.slopes(self.second(self.act(self.first(x)))))


def test_an_activation_kept_float_between_int8_convs_runs_float():
    torch.manual_seed(0)
    model = ActivationsBetweenConvs().eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    all_int8 = fxq.quantize(model, (batches[0][:1],), calibration_data=batches)
    assert is_quantized_module(all_int8.get_submodule("act")) and is_quantized_module(all_int8.get_submodule("slopes"))
    # torch.ao turned a float Hardswish here into nnq.Hardswish, and crashed on a float PReLU
    kept = fxq.quantize(model, (batches[0][:1],), calibration_data=batches, keep_float=["act", nn.PReLU])
    assert type(kept.get_submodule("act")) is nn.Hardswish
    assert type(kept.get_submodule("slopes")) is nn.PReLU
    assert all(is_quantized_module(kept.get_submodule(name)) for name in ("first", "second", "third"))
    assert ("Hardswish: act", "keep_float") in fxq.summary_of(kept).float_ops  # the summary says so
    assert ("PReLU: slopes", "keep_float") in fxq.summary_of(kept).float_ops
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert sqnr(model(x), kept(x)) > 25
    assert type(model.act) is nn.Hardswish  # the user's model keeps its own classes
