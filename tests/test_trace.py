"""Tracing third-party model code: containers, caches, leaves."""

from __future__ import annotations

import torch
from torch import nn

import fxq
from fxq.frontend.trace import trace_model
from helpers import sqnr
from test_regions import Gate


def test_blocks_inside_a_module_list_become_float_leaves_and_the_rest_traces():
    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 1), Gate(), nn.Conv2d(8, 8, 1)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    gm, leaves = trace_model(Blocks())
    assert [leaf.module for leaf in leaves] == ["blocks.1"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["blocks.0", "blocks.1", "blocks.2"]


class CachedBias(nn.Module):
    """Keeps a tensor computed from a parameter in a dict in eval mode, as timm's LeViT and EfficientFormer
    keep their attention biases: a trace that reads the cache left by an earlier trace is broken."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.biases = nn.Parameter(torch.randn(4, 16))
        self.index = nn.Parameter(torch.tensor([0, 1, 2, 3]), requires_grad=False)
        self.cache: dict[str, torch.Tensor] = {}

    def bias(self) -> torch.Tensor:
        if self.training:
            return self.biases[self.index]
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.biases[self.index]
        return self.cache["cpu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.bias().sum(0)


def test_a_forward_that_caches_a_tensor_traces_and_keeps_its_cache():
    model = CachedBias().eval()
    gm, leaves = trace_model(model)
    gm.graph.lint()  # every argument belongs to the graph
    assert leaves == [] and model.cache == {}
    x = torch.randn(2, 16)
    quantized = fxq.quantize(model, x, calibration_data=[torch.randn(8, 16) for _ in range(4)])
    with torch.no_grad():
        assert sqnr(model(x), quantized(x)) > 25.0


class Scaled(nn.Module):
    """Branches on an optional argument, as efficientnet_pytorch's MBConvBlock tests `if drop_connect_rate:`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor, scale: float | torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x)
        if scale:
            x = x * scale
        return x


class ScalesAfterAGate(nn.Module):
    """An untraceable Gate makes fxq look for what blocks the trace, and so trace Scaled alone; the model
    passes it a constant (or, with `scale_by_data`, a tensor computed from the input)."""

    def __init__(self, scale_by_data: bool = False) -> None:
        super().__init__()
        self.gate, self.block, self.scale_by_data = Gate(), Scaled(), scale_by_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(x)
        return self.block(x, scale=x.mean() > 0 if self.scale_by_data else 0.5)


def test_a_block_traced_alone_gets_its_optional_arguments_bound():
    model = ScalesAfterAGate().eval()
    gm, leaves = trace_model(model)
    assert [leaf.module for leaf in leaves] == ["gate"]  # the block was a float leaf too
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["gate", "block.conv"]
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_a_block_given_a_tensor_it_branches_on_stays_a_float_leaf():
    model = ScalesAfterAGate(scale_by_data=True).eval()
    gm, leaves = trace_model(model)
    assert [leaf.module for leaf in leaves] == ["gate", "block"]
    assert "Proxy" in leaves[1].reason or "control flow" in leaves[1].reason
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
