"""Property-based tests: random small conv/bn/relu/add/cat/linear graphs quantize, stay close to float,
and survive save/load bit for bit.

Hypothesis draws a graph (a list of steps over earlier values), random shapes (1-16 channels, 4-16
pixels, batch 1-4), seeded weights and BatchNorm running statistics far from the identity so that
folding matters. Random tensors are right here: the properties are structural (any graph of these ops
must work), not accuracy on a real task. Examples are derandomized, so CI sees the same graphs each run.

Not generated, because of known bugs owned elsewhere (see the issue tracker): in-place ops whose result
is unused (torch.ao's convert drops them) and modules called twice (shared modules quantize badly).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxq
from helpers import assert_state_unchanged, sqnr, state_snapshot

# Measured on the calibration inputs over 400 drawn graphs (default pipeline, every op int8, x86/onednn
# engines, AMD EPYC): minimum 28.3 dB. The two bugs below gave 1-7 dB on drawn graphs; 7-bit activations (CPUs without VNNI)
# cost about 6 dB. 20 dB sits between.
SQNR_FLOOR_DB = 20.0
MAX_CHANNELS_AFTER_CAT = 32
CALIBRATION_BATCHES = 4
# Every op int8: the properties are about int8 correctness, and fxq's latency cost model (the
# float_islands option, where this fxq has it) would keep most layers of graphs this small in float.
EVERY_OP_INT8 = {"float_islands": False} if "float_islands" in {
    f.name for f in dataclasses.fields(fxq.QuantOptions)} else {}
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Step:
    """One node of a drawn graph: `op` applied to earlier values (index 0 is the model input)."""

    op: str  # conv, bn, relu, add, cat
    inputs: tuple[int, ...]
    channels: int = 0  # conv: output channels
    kernel: int = 1
    stride: int = 1
    depthwise: bool = False


@dataclass(frozen=True)
class GraphSpec:
    batch: int
    in_channels: int
    size: int
    steps: tuple[Step, ...]
    head: tuple[str, ...]  # on the flattened output: "linear:N", "bn1d", "relu"; empty: the feature map is the output
    seed: int

    def __str__(self) -> str:  # what hypothesis prints for a failing example: enough to rebuild it
        return (f"GraphSpec(batch={self.batch}, in_channels={self.in_channels}, size={self.size}, "
                f"steps={list(self.steps)}, head={list(self.head)}, seed={self.seed})")


class DrawnGraph(nn.Module):
    """A model executing a GraphSpec; each module is called once (no sharing) and nothing is in place."""

    def __init__(self, spec: GraphSpec) -> None:
        super().__init__()
        self.steps = spec.steps
        self.layers = nn.ModuleList()
        channels, spatial = [spec.in_channels], [spec.size]
        for step in spec.steps:
            source = channels[step.inputs[0]]
            spatial.append((spatial[step.inputs[0]] - 1) // step.stride + 1)
            if step.op == "conv":
                groups = source if step.depthwise else 1
                self.layers.append(nn.Conv2d(source, step.channels, step.kernel, step.stride, step.kernel // 2,
                                             groups=groups))
                channels.append(step.channels)
            elif step.op == "bn":
                self.layers.append(nn.BatchNorm2d(source))
                channels.append(source)
            elif step.op == "relu":
                self.layers.append(nn.ReLU())
                channels.append(source)
            else:
                self.layers.append(nn.Identity())  # keeps layers[i] aligned with steps[i]; never called
                channels.append(source + channels[step.inputs[1]] if step.op == "cat" else source)
        head: list[nn.Module] = []
        features = channels[-1] * spatial[-1] ** 2
        for part in spec.head:
            if part.startswith("linear:"):
                head.append(nn.Linear(features, int(part.split(":")[1])))
                features = int(part.split(":")[1])
            else:
                head.append(nn.BatchNorm1d(features) if part == "bn1d" else nn.ReLU())
        self.head = nn.Sequential(*head) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for index, step in enumerate(self.steps):
            first = values[step.inputs[0]]
            if step.op == "add":
                values.append(first + values[step.inputs[1]])
            elif step.op == "cat":
                values.append(torch.cat([first, values[step.inputs[1]]], 1))
            else:
                values.append(self.layers[index](first))
        if self.head is None:
            return values[-1]
        return self.head(torch.flatten(values[-1], 1))


def build(spec: GraphSpec) -> nn.Module:
    """The eval-mode model of `spec`: seeded weights, BatchNorm statistics and affine far from identity."""
    torch.manual_seed(spec.seed)
    model = DrawnGraph(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.5)
            module.running_var.copy_(torch.exp(torch.empty(count).uniform_(-1.5, 1.5, generator=generator)))
            sign = torch.where(torch.rand(count, generator=generator) < 0.2, -1.0, 1.0)
            module.weight.data.copy_(sign * torch.empty(count).uniform_(0.5, 2.0, generator=generator))
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.3)
    return model.eval()


def batches(spec: GraphSpec, count: int, first_seed: int) -> list[torch.Tensor]:
    return [torch.randn(spec.batch, spec.in_channels, spec.size, spec.size,
                        generator=torch.Generator().manual_seed(first_seed + i)) for i in range(count)]


@st.composite
def graph_specs(draw) -> GraphSpec:
    in_channels = draw(st.integers(1, 16))
    size = draw(st.integers(4, 16))
    shapes = [(in_channels, size)]  # (channels, spatial size) of every value so far
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["conv", "conv+bn", "bn", "relu", "add", "cat"]))  # conv+bn: a fold
        first = draw(st.one_of(st.just(len(shapes) - 1), st.integers(0, len(shapes) - 1)))  # mostly chains
        channels, spatial = shapes[first]
        partners = [i for i, shape in enumerate(shapes)
                    if (shape == shapes[first] if op == "add" else
                        shape[1] == spatial and shape[0] + channels <= MAX_CHANNELS_AFTER_CAT)]
        if op in ("add", "cat") and partners:
            second = draw(st.sampled_from(partners))
            steps.append(Step(op, (first, second)))
            shapes.append((channels + shapes[second][0], spatial) if op == "cat" else (channels, spatial))
        elif op in ("bn", "relu"):
            steps.append(Step(op, (first,)))
            shapes.append((channels, spatial))
        else:  # conv, or an add/cat without a partner of the right shape
            depthwise = channels > 1 and draw(st.booleans()) and draw(st.booleans())
            out_channels = channels if depthwise else draw(st.integers(1, 16))
            kernel = draw(st.sampled_from([1, 3]))
            stride = draw(st.sampled_from([1, 2])) if spatial >= 8 else 1
            steps.append(Step("conv", (first,), out_channels, kernel, stride, depthwise))
            shapes.append((out_channels, (spatial - 1) // stride + 1))
            if op == "conv+bn":
                steps.append(Step("bn", (len(shapes) - 1,)))
                shapes.append(shapes[-1])
    steps = _live_steps(steps)
    head: list[str] = []
    if draw(st.booleans()):
        head.append(f"linear:{draw(st.integers(1, 16))}")
        head += draw(st.sampled_from([[], ["relu"], ["bn1d"], ["bn1d", "relu"]]))
        if draw(st.booleans()):
            head.append(f"linear:{draw(st.integers(1, 16))}")
    return GraphSpec(draw(st.integers(1, 4)), in_channels, size, tuple(steps), tuple(head),
                     draw(st.integers(0, 2**16)))


def _live_steps(steps: list[Step]) -> tuple[Step, ...]:
    """The steps the output (the last value) depends on, re-indexed.

    Dead values are left out on purpose: a dead user of a conv stops fxq's BatchNorm folding, torch.ao then
    folds that BatchNorm itself after fxq computed the conv's int8 weights (test_dead_branch_blocks_bn_fold).
    """
    live = {len(steps)}
    for index in range(len(steps), 0, -1):
        if index in live:
            live.update(steps[index - 1].inputs)
    new_index = {0: 0}
    kept = []
    for index, step in enumerate(steps, start=1):
        if index in live:
            kept.append(Step(step.op, tuple(new_index[i] for i in step.inputs), step.channels, step.kernel,
                             step.stride, step.depthwise))
            new_index[index] = len(kept)
    return tuple(kept)


def adds_only_conv_streams(spec: GraphSpec) -> bool:
    """True when every add's operands are conv outputs, or adds and ReLUs of those (BN folded into a conv counts).

    Equalization mishandles the other adds, e.g. a skip from the model input or from a cat: it pulls that
    operand into the rescaled group without rescaling it, which changes the float function
    (test_equalization_keeps_a_skip_from_the_input). Such graphs run with equalize=False.
    """
    users = [0] * (len(spec.steps) + 1)
    for step in spec.steps:
        for source in set(step.inputs):
            users[source] += 1

    def from_conv(value: int) -> bool:
        if value == 0:
            return False
        step = spec.steps[value - 1]
        source = step.inputs[0]
        if step.op == "conv":
            return True
        if step.op == "bn":  # folded into a conv whose only user it is
            return source > 0 and spec.steps[source - 1].op == "conv" and users[source] == 1
        if step.op == "relu":
            return from_conv(source)
        return step.op == "add" and all(from_conv(i) for i in step.inputs)

    return all(from_conv(i) for step in spec.steps if step.op == "add" for i in step.inputs)


@PROPERTY_SETTINGS
@given(spec=graph_specs())
def test_drawn_graphs_quantize_close_to_float_and_reload_bit_exactly(spec: GraphSpec, tmp_path_factory):
    equalize = adds_only_conv_streams(spec)
    for op in sorted({step.op for step in spec.steps} | {part.split(":")[0] for part in spec.head}):
        event(f"has {op}")  # coverage: pytest --hypothesis-show-statistics
    event(f"equalize={equalize}")
    model = build(spec)
    before = state_snapshot(model)
    calibration = batches(spec, CALIBRATION_BATCHES, first_seed=0)
    quantized = fxq.quantize(model, calibration[0], calibration_data=calibration, equalize=equalize,
                             **EVERY_OP_INT8)
    summary = fxq.summary_of(quantized)
    event(f"rewrites: {len(summary.rewrites)}, equalized pairs: {summary.equalized_pairs}")
    assert_state_unchanged(model, before)
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in quantized.modules()), summary.float_layers
    with torch.no_grad():
        reference = torch.cat([model(batch) for batch in calibration])
        int8_outputs = torch.cat([quantized(batch) for batch in calibration])
    # Measured on the calibration inputs: the error a correct quantizer controls. On unseen inputs, ranges
    # calibrated on 4-16 samples clip (down to 4 dB measured), which says nothing about correctness.
    assert sqnr(reference, int8_outputs) >= SQNR_FLOOR_DB

    loaded = fxq.load(fxq.save(quantized, tmp_path_factory.mktemp("saved") / "model.pt"))
    unseen = batches(spec, 1, first_seed=100)[0]
    with torch.no_grad():
        for batch in (calibration[0], unseen):
            assert torch.equal(loaded(batch), quantized(batch))


# --- bugs hypothesis found (owned elsewhere): minimal reproducers, strict so a fix turns them red ---------

class DeadBranch(nn.Module):
    """conv -> bn is the output; `unused` also reads the conv's output but its result is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        self.unused(features)  # e.g. an auxiliary head computed but not returned
        return self.bn(features)


def test_dead_branch_blocks_bn_fold():
    torch.manual_seed(0)
    model = DeadBranch().eval()
    model.bn.running_mean.fill_(0.3)
    model.bn.running_var.fill_(0.05)
    generator = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(4)]
    quantized = fxq.quantize(model, calibration[0], calibration_data=calibration, **EVERY_OP_INT8)
    with torch.no_grad():
        assert sqnr(model(calibration[0]), quantized(calibration[0])) >= SQNR_FLOOR_DB


class SkipFromInput(nn.Module):
    """A residual block whose skip is the model input (in ResNets: the max-pool output before layer1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x) + x))


def test_equalization_keeps_a_skip_from_the_input():
    from fxq.frontend.rewrite import fold_batchnorm, fuse_clamping_activations
    from fxq.frontend.trace import trace_model
    from fxq.recovery.equalization import equalize

    torch.manual_seed(0)
    model = SkipFromInput().eval()
    generator = torch.Generator().manual_seed(0)
    channel_scales = torch.logspace(-1, 0.5, 8).view(1, -1, 1, 1)  # unequal channel ranges, as in real data
    calibration = [torch.randn(4, 8, 8, 8, generator=generator) * channel_scales for _ in range(2)]
    gm, _ = trace_model(copy.deepcopy(model))
    fold_batchnorm(gm)
    fuse_clamping_activations(gm)
    equalize(gm, [(batch,) for batch in calibration])  # the skip from x cannot be rescaled: no group
    with torch.no_grad():
        assert sqnr(model(calibration[0]), gm(calibration[0])) > 60  # float function kept (to rounding)
