"""Walk the float simulation of the int8 model and the float model side by side, one layer at a time.

Corrections that should see quantized upstream inputs (bias correction, refitting weights) need, at
each layer, its input in the simulation (torch.ao's reference model: quantize/dequantize pairs and
on-grid weights) and in the float model, for the same calibration images, after every earlier layer
was corrected. Both graphs are therefore interpreted node by node over all calibration batches at
once, and paused before each weighted layer, where the caller may change the simulated layer before
it runs on every batch. The graphs run at full resolution; the statistics a caller takes at a layer
use a subgrid of its output positions (sample_step), which is what keeps their cost from dominating.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import fx, nn

from fxq.calibration import Batch
from fxq.config import key_covers
from fxq.frontend.graph import get_module
from fxq.frontend.rewrite import Clamp, unwrap
from fxq.recovery.layers import channel_axis_shape

# Samples held at once: every image's activations at the current layer, in both graphs.
MAX_SAMPLES = 64
# Output positions per image at which a conv's statistics (refit moments, held-out shrinkage, bias shift) are
# taken. They are per-channel averages and K x K moments; an early MobileNetV2 layer has 12544 positions per
# image, so a regular subgrid of them estimates the same averages at a fraction of the cost, and the cost per
# layer stops growing with the image size. At 64 calibration crops (logits SQNR on 256 others), 14 x 14
# against 28 x 28 moved MobileNetV2 by +0.11 and +0.05 dB (two pairs of crop seeds) and BN-recalibrated
# ResNet-50 by -0.08 dB, and cut their quantize time by 1.6 and 4 s; 7 x 7 cost 1.5 dB on MobileNetV2.
SAMPLED_POSITIONS = 14 * 14


def output_size(layer: nn.Conv2d, x: torch.Tensor, step: int = 1) -> list[int]:
    """A zero-padded Conv2d's output rows and columns for input x, run at `step` times its stride."""
    return [(x.shape[-2 + i] + 2 * layer.padding[i] - layer.dilation[i] * (layer.kernel_size[i] - 1) - 1)
            // (layer.stride[i] * step) + 1 for i in range(2)]


def sample_step(layer: nn.Module, x: torch.Tensor) -> int:
    """Every how many output rows and columns a layer's statistics are taken: 1 but for Conv2d layers with
    more than SAMPLED_POSITIONS outputs per image (a larger stride gives exactly that subgrid's outputs)."""
    if not isinstance(layer, nn.Conv2d) or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return 1
    rows, columns = output_size(layer, x)
    return max(1, math.isqrt(rows * columns // SAMPLED_POSITIONS))


@contextmanager
def sampled_positions(layer: nn.Module, step: int) -> Iterator[None]:
    """Run a Conv2d (float or torch.ao's reference module, whose forward fake-quantizes its weight) at
    every `step`-th output row and column, by multiplying its stride."""
    if step == 1:
        yield
        return
    stride = layer.stride
    layer.stride = tuple(s * step for s in stride)
    try:
        yield
    finally:
        layer.stride = stride


@dataclass
class PairedLayer:
    """One weighted layer of the simulation, with the float model's counterpart and both inputs."""

    name: str
    simulated: nn.Module  # the simulation's conv/linear (weights fake-quantized when it runs)
    float_layer: nn.Module
    clamp: Clamp | None  # the fused activation after both
    simulated_inputs: list[torch.Tensor]  # one per calibration batch
    float_inputs: list[torch.Tensor]
    step: int = 1  # statistics are taken at every step-th output row and column (sample_step)
    _float_outputs: list[torch.Tensor] | None = field(default=None, repr=False)
    # (weight version, bias, full outputs) of the last simulated_outputs call, for walked_outputs
    _simulated: tuple[int, torch.Tensor | None, list[torch.Tensor]] | None = field(default=None, repr=False)

    def float_outputs(self) -> list[torch.Tensor]:
        """The float layer's outputs (before the clamp) at the sampled positions, per batch."""
        if self._float_outputs is None:
            with sampled_positions(self.float_layer, self.step):
                self._float_outputs = [self.float_layer(x) for x in self.float_inputs]
        return self._float_outputs

    def simulated_outputs(self) -> list[torch.Tensor]:
        """The simulated layer's outputs (its current weights and bias) at the sampled positions, per batch.

        They are computed at full resolution and kept, so that the walk, which runs the layer once the
        caller is done with it, takes them (walked_outputs) instead of running it again."""
        bias = self.simulated.bias
        full = [self.simulated(x) for x in self.simulated_inputs]
        self._simulated = (self.simulated.weight._version, None if bias is None else bias.detach().clone(), full)
        return [_every(y, self.step) for y in full]

    def walked_outputs(self) -> list[torch.Tensor] | None:
        """The simulated layer's full outputs (before its clamp) as the walk would compute them now: those
        simulated_outputs kept, shifted by any change of the bias since; None when there are none, or the
        weights changed since."""
        if self._simulated is None:
            return None
        version, bias, full = self._simulated
        if self.simulated.weight._version != version:
            return None
        current = self.simulated.bias
        if bias is None or torch.equal(bias, current):
            return full
        shift = (current.detach() - bias).reshape(channel_axis_shape(self.simulated, bias.numel()))
        self._simulated = None
        return [y.add_(shift) for y in full]  # the kept outputs are this pair's own

    def linear_region(self, output: torch.Tensor) -> torch.Tensor:
        """Where the fused clamp passes this layer's output (float or simulated) through unchanged."""
        if self.clamp is None:
            return torch.ones_like(output, dtype=torch.bool)
        inside = output > self.clamp.low
        if self.clamp.bounded:
            high = self.clamp.high
            if high.numel() > 1:
                high = high.reshape(channel_axis_shape(self.float_layer, high.numel()))
            inside &= output < high
        return inside


def _last_uses(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values no later node reads (so the walk can free them)."""
    seen: set[fx.Node] = set()
    last: dict[fx.Node, list[fx.Node]] = {node: [] for node in gm.graph.nodes}
    for node in reversed(gm.graph.nodes):
        for source in node.all_input_nodes:
            if source not in seen:
                seen.add(source)
                last[node].append(source)
    return last


def after_layer(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """What `module` (a layer, or a fused container whose first module is the layer: see unwrap) does
    with its layer's output: the container's other modules, in order."""
    if isinstance(module, nn.Sequential):
        for later in list(module)[1:]:
            output = later(output)
    return output


def _every(y: torch.Tensor, step: int) -> torch.Tensor:
    """Every step-th row and column of a conv output: what the conv computes at `step` times its stride."""
    return y[..., ::step, ::step] if step > 1 else y


def _layer_major(gm: fx.GraphModule, batches: Sequence[Batch], layer_outputs: bool = False,
                 computed: dict[fx.Node, list[torch.Tensor]] | None = None
                 ) -> Iterator[tuple[fx.Node, list[torch.Tensor], list[torch.Tensor] | None]]:
    """Run `gm` node by node over all batches, yielding (weighted node, its input per batch, None) before
    the node runs; with `layer_outputs`, the layer runs first and its output before the fused clamp (per
    batch) comes third, so that statistics need not run the layer again. A weighted node the caller put
    in `computed` by the time the walk resumes takes those outputs (per batch) instead of running."""
    runners = []
    for batch in batches:
        runner = fx.Interpreter(gm)
        runner.args_iter = iter(batch)
        runner.env = {}
        runners.append(runner)
    last_uses = _last_uses(gm)
    for node in gm.graph.nodes:
        layer = unwrap(get_module(gm, node))[0]
        done = False
        if layer is not None:
            inputs = [runner.env[node.args[0]] for runner in runners]
            if layer_outputs and len(node.args) == 1 and not node.kwargs:
                outputs = [layer(x) for x in inputs]
                yield node, inputs, outputs
                for runner, output in zip(runners, outputs):
                    runner.env[node] = after_layer(get_module(gm, node), output)
                done = True
            else:
                yield node, inputs, None
                if computed is not None and node in computed:
                    for runner, output in zip(runners, computed.pop(node)):
                        runner.env[node] = output
                    done = True
        for runner in runners:
            if not done:
                runner.env[node] = runner.run_node(node)
            for dead in last_uses[node]:
                del runner.env[dead]


def _first_samples(batches: Sequence[Batch], limit: int) -> list[Batch]:
    """Leading batches holding at most `limit` samples (at least one batch)."""
    chosen, samples = [], 0
    for batch in batches:
        size = batch[0].shape[0] if batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() else 1
        if chosen and samples + size > limit:
            break
        chosen.append(batch)
        samples += size
    return chosen


def walked_layers(simulation: fx.GraphModule, float_gm: fx.GraphModule, skip: Iterable[str | type] = ()) -> set[str]:
    """Names of the layers paired_layers yields (unless the walk ends early at a layer the float graph
    lacks): the simulation's weighted layers called once, present in the float graph and not in `skip`."""
    skip = tuple(skip)
    calls = Counter(str(node.target) for node in simulation.graph.nodes if node.op == "call_module")
    float_modules = dict(float_gm.named_modules())
    walked = set()
    for node in simulation.graph.nodes:
        name = str(node.target)
        if calls[name] != 1 or unwrap(get_module(simulation, node))[0] is None:
            continue
        float_layer, _ = unwrap(float_modules.get(name))
        if float_layer is not None and not key_covers(skip, name, float_layer):
            walked.add(name)
    return walked


def paired_layers(simulation: fx.GraphModule, float_gm: fx.GraphModule, batches: Sequence[Batch],
                  skip: Iterable[str | type] = ()) -> Iterator[PairedLayer]:
    """The simulation's quantized layers in graph order, each paired with the float model's.

    `float_gm` is the float graph the simulation was prepared from (same module names). Layers `skip`
    keeps in float and layers called more than once are passed over (walked_layers); a layer the float
    graph lacks ends the walk, since nothing after it can be paired. Run it under torch.no_grad().
    """
    walked = walked_layers(simulation, float_gm, skip)
    batches = _first_samples(batches, MAX_SAMPLES)
    float_walk = _layer_major(float_gm, batches, layer_outputs=True)
    computed: dict[fx.Node, list[torch.Tensor]] = {}
    for node, simulated_inputs, _ in _layer_major(simulation, batches, computed=computed):
        name = str(node.target)
        for float_node, float_inputs, float_outputs in float_walk:
            if str(float_node.target) == name:
                break
        else:
            return
        if name in walked:
            simulated, _ = unwrap(get_module(simulation, node))
            float_layer, clamp = unwrap(get_module(float_gm, float_node))
            step = sample_step(float_layer, float_inputs[0])
            sampled = None if float_outputs is None else [_every(y, step) for y in float_outputs]
            pair = PairedLayer(name, simulated, float_layer, clamp, simulated_inputs, float_inputs, step, sampled)
            yield pair
            outputs = pair.walked_outputs()
            if outputs is not None and len(node.args) == 1 and not node.kwargs:
                computed[node] = [after_layer(get_module(simulation, node), y) for y in outputs]
