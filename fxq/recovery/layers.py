"""What the recovery passes need to know about weighted layers in a traced, BN-folded float graph."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import fx, nn

from fxq.calibration import Batch
from fxq.config import key_covers
from fxq.frontend.graph import get_module
from fxq.frontend.rewrite import Clamp, unwrap


def weighted_nodes(gm: fx.GraphModule,
                   skip: Iterable[str | type] = ()) -> Iterator[tuple[fx.Node, nn.Module, Clamp | None]]:
    """Weighted layers in graph order, leaving out those `skip` keeps in float (keep_float keys).

    Recovery passes must skip such layers: bias correction would otherwise shift a float layer's bias
    to undo a rounding error it never gets.
    """
    skip = tuple(skip)
    for node in gm.graph.nodes:
        layer, clamp = unwrap(get_module(gm, node))
        if layer is not None and not key_covers(skip, str(node.target), layer):
            yield node, layer, clamp


def is_depthwise(layer: nn.Module) -> bool:
    """A conv with one input and one output channel per group (channel i in, channel i out). A depthwise
    conv with a channel multiplier (FastViT's: out = 2 x in) is a grouped conv to the recovery passes."""
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.groups > 1 \
        and layer.groups == layer.in_channels == layer.out_channels and layer.weight.shape[1] == 1


def non_channel_dims(output: torch.Tensor, layer: nn.Module | None = None) -> list[int]:
    """Dimensions to reduce for per-channel statistics: all but dim 1 of conv outputs, the last of linear.

    A linear layer's channels are its last dimension whatever its rank ((batch, tokens, features) in
    transformers); without the layer, a rank-2 tensor is taken as linear and anything larger as conv.
    """
    if isinstance(layer, nn.Linear) or output.dim() <= 2:
        axis = output.dim() - 1
    else:
        axis = 1
    return [d for d in range(output.dim()) if d != axis]


def channel_axis_shape(layer: nn.Module, channels: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-output-channel vector over this layer's output."""
    if isinstance(layer, nn.Linear):
        return (channels,)
    return (1, channels) + (1,) * (layer.weight.dim() - 2)


def run_with_hooks(model: nn.Module, batches: Sequence[Batch], modules: dict[str, nn.Module],
                   on_call: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """Run the batches, calling on_call(name, input, output) for each listed module call."""
    handles = []
    for name, module in modules.items():
        def hook(_module, inputs, output, name=name):
            on_call(name, inputs[0], output)
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for handle in handles:
            handle.remove()


def _layer(model: nn.Module, name: str) -> nn.Module:
    layer, _ = unwrap(model.get_submodule(name))
    if layer is None:
        raise KeyError(f"{name} is not a conv/linear layer or a fused container of one")
    return layer


@torch.no_grad()
def set_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Overwrite the weights of the named layers (plain or fused; float, observed or simulated)."""
    for name, values in weights.items():
        _layer(model, name).weight.copy_(values)


@torch.no_grad()
def copy_biases(source: nn.Module, target: nn.Module, names: Iterable[str]) -> None:
    """Copy the named layers' biases from `source` to the same layers of `target`."""
    for name in names:
        _layer(target, name).bias.copy_(_layer(source, name).bias)
