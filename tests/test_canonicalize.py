"""Third-party layer code canonicalized into torchvision's modules, each model checked against float.

Planted models reproduce what packages write: a conv subclass that pads in its own forward (static,
symmetric and TF-SAME stride-2), efficientnet_pytorch's dynamic SAME conv (control flow on `x.size()`, so
fxq's tracer keeps it a leaf), a functional conv with a BatchNorm module and timm's functional BatchNorm
behind a shape assert, one ReLU6 module called by three convs, and timm's weight-standardized conv. After
`canonicalize_layers` no functional conv is left, the outputs equal the float model's to float rounding,
and fxq's unchanged BN folding and clamp fusion apply.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.frontend import canonicalize
from fxq.frontend.canonicalize import Canonicalization, canonicalize_layers
from fxq.frontend.identities import remove_eval_identities
from fxq.frontend.rewrite import fold_batchnorm, fuse_clamping_activations
from fxq.frontend.trace import trace_model

CONV_FUNCTIONS = (torch.conv1d, torch.conv2d, torch.conv3d, F.linear)


def traced(model: nn.Module) -> tuple[fx.GraphModule, list[str]]:
    """The graph fxq quantizes (traced with float leaves, eval no-ops dropped) and its leaves' names."""
    gm, leaves = trace_model(copy.deepcopy(model).eval())
    remove_eval_identities(gm)
    return gm, [leaf.module for leaf in leaves]


def assert_same_outputs(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, actual = model(x), gm(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=canonicalize.RTOL, atol=canonicalize.ATOL)


def functional_calls(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function"
            and (n.target in CONV_FUNCTIONS or n.target is F.batch_norm)]


def called_types(gm: fx.GraphModule) -> list[type]:
    return [type(gm.get_submodule(str(n.target))) for n in gm.graph.nodes if n.op == "call_module"]


def applied(records: list[Canonicalization], kind: str) -> list[Canonicalization]:
    return [r for r in records if r.kind == kind and r.applied]


def batchnorms(gm: fx.GraphModule) -> int:
    return sum(t in (nn.BatchNorm1d, nn.BatchNorm2d) for t in called_types(gm)) + sum(
        n.op == "call_function" and n.target is F.batch_norm for n in gm.graph.nodes)


# --- planted third-party layers ---------------------------------------------------------------------

def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME': (before, after), the extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class StaticSameConv(nn.Conv2d):
    """efficientnet_pytorch's Conv2dStaticSamePadding: a ZeroPad2d module, then F.conv2d on its weight."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, image_size: int, **kwargs) -> None:
        super().__init__(cin, cout, kernel, stride, **kwargs)
        top, bottom = same_padding(image_size, kernel, stride)
        self.static_padding = nn.ZeroPad2d((top, bottom, top, bottom))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class DynamicSameConv(nn.Conv2d):
    """efficientnet_pytorch's Conv2dDynamicSamePadding: pads computed with max() and an `if` on sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ArithmeticSameConv(nn.Conv2d):
    """SAME padding from `x.shape` arithmetic without control flow: it traces, leaving size nodes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = (self.kernel_size[0] - self.stride[0]) + (x.shape[-1] % self.stride[0])
        x = F.pad(x, [total // 2, total - total // 2, total // 2, total - total // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


class BatchSizedPad(nn.Module):
    """A pad whose width depends on the batch size: folding it for the example would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.size(0) % 2
        return self.conv(F.pad(x, [width, width, width, width]))


class SameConvBlock(nn.Module):
    """conv -> BatchNorm -> ReLU6 twice, with a SAME conv of the given kind."""

    def __init__(self, conv_type: type, stride: int, size: int) -> None:
        super().__init__()
        extra = {"image_size": size} if conv_type is StaticSameConv else {}
        self.conv1 = conv_type(3, 8, 3, stride, **extra)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        inner = (size + stride - 1) // stride
        self.conv2 = conv_type(8, 8, 5, 1, **({"image_size": inner} if conv_type is StaticSameConv else {}),
                               groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


def trained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics from a train-mode pass, so that BN is not the identity."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


# --- tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv_type, stride, size, padding_kind", [
    (StaticSameConv, 1, 16, "symmetric"),
    (StaticSameConv, 2, 16, "asymmetric"),  # (0, 1): TF SAME pads the extra pixel right and bottom
    (StaticSameConv, 2, 15, "symmetric"),
    (DynamicSameConv, 1, 16, "symmetric"),
    (DynamicSameConv, 2, 16, "asymmetric"),
    (ArithmeticSameConv, 2, 16, "asymmetric"),
])
def test_same_padding_convs_become_conv2d_and_fold_their_batchnorm(conv_type: type, stride: int, size: int,
                                                                   padding_kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    model = trained_like(SameConvBlock(conv_type, stride, size), torch.randn(8, 3, size, size))
    gm, leaves = traced(model)
    if conv_type is DynamicSameConv:
        assert leaves == ["conv1", "conv2"]  # control flow on sizes: kept whole by fxq's tracer

    records = canonicalize_layers(gm, (x,))

    assert not [r for r in records if not r.applied]
    assert_same_outputs(model, gm, x)
    assert not functional_calls(gm)
    convs = {str(n.target): gm.get_submodule(str(n.target)) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Conv2d)}
    assert sorted(convs) == ["conv1", "conv2"]  # named as in the user's model
    assert all(type(conv) is nn.Conv2d for conv in convs.values())
    assert convs["conv2"].padding == (2, 2) and convs["conv2"].groups == 8
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.pad]
    assert not pads and not [t for t in called_types(gm) if t is nn.ZeroPad2d]
    narrows = [n for n in gm.graph.nodes if n.target is torch.narrow]
    if padding_kind == "asymmetric":
        assert convs["conv1"].padding == (2, 2) and len(narrows) == 2
        # the crop comes after BN and ReLU6, so that conv -> BN -> ReLU6 stays a chain
        assert type(gm.get_submodule(str(narrows[0].args[0].target))) is nn.ReLU6
        (fold,) = [r for r in records if r.kind == "fold_padding" and r.modules == ("conv1",)]
        assert "asymmetric (0, 1, 0, 1)" in fold.reason and f"input {size}x{size}" in fold.reason
    else:
        assert not narrows
    if conv_type in (DynamicSameConv, ArithmeticSameConv):
        kind = "specialize_shapes" if conv_type is DynamicSameConv else "fold_shape_values"
        assert f"input {size}x{size}" in applied(records, kind)[0].reason

    assert len(fold_batchnorm(gm)) == 2
    assert len(fuse_clamping_activations(gm)) == 2
    assert batchnorms(gm) == 0
    assert_same_outputs(model, gm, x)


class PadThenConv(nn.Module):
    def __init__(self, widths: tuple[int, int, int, int], kernel: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.widths = widths
        self.conv = nn.Conv2d(3, 4, kernel, stride, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.widths))


@pytest.mark.parametrize("widths, kernel, stride, dilation, size", [
    ((0, 1, 0, 1), 3, 2, 1, 16), ((1, 2, 1, 2), 5, 2, 1, 14), ((1, 0, 2, 1), 3, 2, 1, 9),
    ((0, 2, 1, 1), 3, 3, 1, 11), ((2, 3, 2, 3), 3, 2, 2, 13), ((0, 1, 0, 1), 2, 1, 1, 7),
])
def test_asymmetric_zero_padding_is_exact_as_conv_padding_and_crop(widths, kernel, stride, dilation, size) -> None:
    torch.manual_seed(0)
    model = PadThenConv(widths, kernel, stride, dilation).eval()
    x = torch.randn(2, 3, size, size + 1)
    gm, _ = traced(model)

    (record,) = canonicalize_layers(gm, (x,))

    assert record.applied and record.kind == "fold_padding"
    assert not [n for n in gm.graph.nodes if n.target is F.pad]
    assert_same_outputs(model, gm, x)


def test_shape_values_that_depend_on_the_batch_are_not_fixed() -> None:
    model = BatchSizedPad().eval()
    x = torch.randn(1, 3, 8, 8)
    gm, _ = traced(model)

    records = canonicalize_layers(gm, (x,))

    (skipped,) = [r for r in records if r.kind == "fold_shape_values"]
    assert not skipped.applied and "batch" in skipped.reason
    assert [n for n in gm.graph.nodes if n.target is F.pad]  # still computed from x.size(0)
    for batch in (1, 2, 3):
        x = torch.randn(batch, 3, 8, 8)
        assert_same_outputs(model, gm, x)


class FunctionalConvBN(nn.Module):
    """A functional conv on a parameter, a BatchNorm module after it; then timm's BatchNormAct2d code: an
    assert on the rank and F.batch_norm on the module's own buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 1)
        self.norm = nn.BatchNorm2d(16)
        self.head_weight = nn.Parameter(torch.randn(10, 16) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(F.conv2d(x, self.weight, self.bias, 1, 1))
        x = self.conv2(x)
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(x, self.norm.running_mean, self.norm.running_var, self.norm.weight, self.norm.bias,
                         False, 0.1, self.norm.eps)
        return F.linear(F.relu(x).mean((2, 3)), self.head_weight)


def test_functional_conv_and_batchnorm_fold() -> None:
    torch.manual_seed(0)
    model = trained_like(FunctionalConvBN(), torch.randn(8, 3, 12, 12))
    x = torch.randn(2, 3, 12, 12)
    gm, _ = traced(model)
    assert len(functional_calls(gm)) == 3

    records = canonicalize_layers(gm, (x,))

    assert not functional_calls(gm)
    assert {r.kind for r in records if r.applied} == {"conv_module", "batchnorm_module", "linear_module",
                                                      "fold_shape_values"}
    assert not [n for n in gm.graph.nodes if n.target is torch._assert]
    assert called_types(gm).count(nn.Linear) == 1 and called_types(gm).count(nn.BatchNorm2d) == 2
    # the root's own weights give `conv` and `linear`; the BatchNorm takes the name of the module whose
    # buffers it reads
    assert [r.modules[0] for r in records if r.applied and r.kind != "fold_shape_values"] == \
        ["conv", "norm", "linear"]
    assert_same_outputs(model, gm, x)

    folded = fold_batchnorm(gm)

    assert len(folded) == 2 and batchnorms(gm) == 0
    assert_same_outputs(model, gm, x)


class SharedActivation(nn.Module):
    """One activation module called after each of three convs (the issue's EfficientNet-style classifier)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.act(conv(x) * 4)  # so that ReLU6's clamp at 6 is reached
        return x


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.Hardswish()], ids=["ReLU6", "Hardswish"])
def test_shared_activation_gets_one_module_per_call(act: nn.Module) -> None:
    """torch.ao swaps an activation module for one quantized module with one output scale, so a module
    called after three convs of different ranges would be requantized with one of their scales at all
    three (fxq.quantize on such a model with the convs' outputs scaled by 1, 4 and 7, logits SQNR without ->
    with the split: Hardswish 25.4 -> 28.1 dB, LeakyReLU 24.7 -> 28.7 dB, ELU 24.4 -> 28.2 dB). fxq's clamp
    fusion does not need the split: it drops the call, not the module."""
    torch.manual_seed(0)
    model = SharedActivation(act).eval()
    x = torch.randn(2, 3, 10, 10)
    gm, _ = traced(model)

    records = canonicalize_layers(gm, (x,))

    assert [r.modules for r in applied(records, "split_activation")] == [("act", "act_1"), ("act", "act_2")]
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and "act" in str(n.target)]
    assert calls == ["act", "act_1", "act_2"]
    assert len({id(gm.act), id(gm.act_1), id(gm.act_2)}) == 3 and type(gm.act_2) is type(act)
    assert_same_outputs(model, gm, x)
    if isinstance(act, nn.ReLU6):  # each conv -> ReLU6 pair then fuses (the `* 4` moved into the conv)
        for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
            conv = gm.get_submodule(str(node.args[0].target))
            conv.weight.data.mul_(4), conv.bias.data.mul_(4)
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        gm.recompile()
        assert len(fuse_clamping_activations(gm)) == 3
        assert not [t for t in called_types(gm) if t is nn.ReLU6]
        assert_same_outputs(model, gm, x)


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight standardized per output channel on every call."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, 8)
        self.conv = StdConv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.norm(self.stem(x))))


def test_weight_standardization_is_computed_once() -> None:
    torch.manual_seed(0)
    model = StdConvNet().eval()
    x = torch.randn(2, 3, 12, 12)
    gm, _ = traced(model)
    assert sum(n.target is F.batch_norm for n in gm.graph.nodes) == 2

    records = canonicalize_layers(gm, (x,))

    assert len(applied(records, "fold_parameters")) == 2 and len(applied(records, "conv_module")) == 2
    assert not functional_calls(gm)  # neither the conv nor the standardization's batch_norm
    assert [t for t in called_types(gm) if issubclass(t, nn.Conv2d)] == [nn.Conv2d, nn.Conv2d]
    assert [r.modules[0] for r in applied(records, "conv_module")] == ["stem", "conv"]
    weight = model.stem.weight
    standardized = (weight - weight.mean((1, 2, 3), keepdim=True)) / torch.sqrt(
        weight.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(gm.stem.weight, standardized, rtol=1e-5, atol=1e-5)
    assert_same_outputs(model, gm, x)


class SharedWeight(nn.Module):
    """One parameter read by two functional convs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 3, 3) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, self.weight, padding=1), self.weight, padding=1)


def test_weight_read_by_two_calls_gives_two_independent_modules() -> None:
    torch.manual_seed(0)
    model = SharedWeight().eval()
    x = torch.randn(1, 3, 8, 8)
    gm, _ = traced(model)

    records = canonicalize_layers(gm, (x,))

    first, second = [gm.get_submodule(r.modules[0]) for r in applied(records, "conv_module")]
    assert type(first) is nn.Conv2d and type(second) is nn.Conv2d
    # equalization scales weights in place: the two layers must not share storage
    assert first.weight.data_ptr() != second.weight.data_ptr()
    assert_same_outputs(model, gm, x)


def test_asymmetric_padding_can_be_kept_as_a_pad(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(canonicalize, "CROP_ASYMMETRIC_PADDING", False)
    torch.manual_seed(0)
    model = trained_like(SameConvBlock(StaticSameConv, 2, 16), torch.randn(8, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    gm, _ = traced(model)

    records = canonicalize_layers(gm, (x,))

    (kept,) = [r for r in records if r.kind == "fold_padding" and not r.applied]
    assert "kept as F.pad" in kept.reason
    (pad,) = [n for n in gm.graph.nodes if n.target is F.pad]
    assert type(gm.get_submodule(str(next(iter(pad.users)).target))) is nn.Conv2d
    assert not functional_calls(gm)
    assert_same_outputs(model, gm, x)


def doubling_rewrite(gm: fx.GraphModule, context: object, only: set[str] | None) -> list[Canonicalization]:
    """A faulty rewrite for the test: replaces the first conv module by one with twice its weight."""
    records = []
    for node in gm.graph.nodes:
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if type(module) is nn.Conv2d and (only is None or node.name in only):
            wrong = copy.deepcopy(module)
            wrong.weight = nn.Parameter(module.weight.detach() * (2 if node.name == "conv2" else 1))
            setattr(gm, str(node.target), wrong)
            records.append(Canonicalization("doubling", (node.name,), (str(node.target),), True))
    return records


def test_rewrite_that_changes_outputs_is_undone_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(canonicalize, "_PASSES", canonicalize._PASSES + (doubling_rewrite,))
    torch.manual_seed(0)
    model = trained_like(SameConvBlock(StaticSameConv, 1, 12), torch.randn(8, 3, 12, 12))
    x = torch.randn(2, 3, 12, 12)
    gm, _ = traced(model)

    records = canonicalize_layers(gm, (x,))

    doubled = [r for r in records if r.kind == "doubling"]
    assert [(r.nodes[0], r.applied) for r in doubled] == [("conv1", True), ("conv2", False)]
    assert "SQNR" in doubled[1].reason
    # the other kinds still apply (retried kind by kind), and the graph computes the float outputs
    assert len(applied(records, "conv_module")) == 2 and len(applied(records, "fold_padding")) == 2
    assert not functional_calls(gm)
    assert_same_outputs(model, gm, x)
    assert torch.equal(gm.conv2.weight, model.conv2.weight)


def test_training_mode_is_left_alone() -> None:
    model = SameConvBlock(StaticSameConv, 2, 16).train()
    gm, _ = trace_model(copy.deepcopy(model))
    (record,) = canonicalize_layers(gm, (torch.randn(2, 3, 16, 16),))
    assert not record.applied and "training" in record.reason


# --- the packages themselves --------------------------------------------------------------------------

def efficientnet_pytorch_b0() -> nn.Module:
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    return efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0").eval()


def timm_tf_efficientnet_b0() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_b0", pretrained=False).eval()


@pytest.mark.parametrize("build, conv_subclass_leaves, pads", [
    (efficientnet_pytorch_b0, 0, 17),  # Conv2dStaticSamePadding: ZeroPad2d + F.conv2d, traced through
    (timm_tf_efficientnet_b0, 5, 5),  # Conv2dSame at stride 2: control flow on sizes, kept as leaves
], ids=["efficientnet_pytorch-b0", "timm-tf_efficientnet_b0"])
def test_efficientnets_from_packages(build, conv_subclass_leaves: int, pads: int) -> None:
    model = build()
    x = torch.randn(1, 3, 96, 96)
    gm, leaves = traced(model)
    assert len(leaves) == conv_subclass_leaves

    records = canonicalize_layers(gm, (x,))

    assert not [r for r in records if not r.applied]
    assert len(applied(records, "specialize_shapes")) == conv_subclass_leaves
    assert len(applied(records, "fold_padding")) == pads
    assert not functional_calls(gm)
    assert not [t for t in called_types(gm) if issubclass(t, nn.Conv2d) and t is not nn.Conv2d]
    assert called_types(gm).count(nn.Conv2d) == 81 and called_types(gm).count(nn.BatchNorm2d) == 49
    # efficientnet_pytorch's MemoryEfficientSwish (an autograd.Function) traces into x * sigmoid(x)
    assert all(t.__name__ != "MemoryEfficientSwish" for t in called_types(gm))
    assert_same_outputs(model, gm, x)
    assert len(fold_batchnorm(gm)) == 49 and batchnorms(gm) == 0
    assert_same_outputs(model, gm, x)


class WeightDevice(nn.Module):
    """Builds a mask on its conv weight's device, as EdgeNeXt's and XCiT's positional encodings do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros((x.shape[0], 1, x.shape[2], x.shape[3]), device=self.conv.weight.device,
                           dtype=self.conv.weight.dtype)
        return self.conv(x) + mask


def test_a_weights_device_and_dtype_become_constants_and_the_int8_model_runs_and_saves(tmp_path):
    import fxq

    model = WeightDevice().eval()
    batches = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    quantized = fxq.quantize(model, batches[0], calibration_data=batches)
    assert any(r.startswith("fold_parameter_properties") for r in fxq.summary_of(quantized).rewrites)
    with torch.no_grad():
        expected = quantized(batches[0])
        fxq.save(quantized, tmp_path / "model.pt")
        assert torch.equal(fxq.load(tmp_path / "model.pt")(batches[0]), expected)
