"""Ops that compute nothing in eval mode, removed from the traced graph before quantizing.

Stochastic depth (torchvision's `stochastic_depth`, wrapped for torch.fx so it appears as one opaque call)
and dropout return their input when not training. torch.ao has no int8 kernel for the former, so left in
place it splits every residual block of EfficientNet, ConvNeXt or Swin into int8 / float / int8 with a
dequantize and a quantize around a no-op. Removing them changes nothing the eval-mode model computes.
"""

from __future__ import annotations

import inspect

import torch.nn.functional as F
from torch import fx, nn

_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)


def _stochastic_depth():
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:
        return None
    return stochastic_depth


def _training_argument(node: fx.Node) -> object:
    """The value of a call's `training` argument (its default when not given)."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return True  # cannot tell: keep the op
    bound.apply_defaults()
    return bound.arguments.get("training", True)


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return type(module) in _IDENTITY_MODULES and not module.training
    if node.op == "call_function" and (node.target in _DROPOUT_FUNCTIONS or node.target is _stochastic_depth()):
        return _training_argument(node) is False
    return False


def remove_eval_identities(gm: fx.GraphModule) -> list[str]:
    """Drop stochastic depth, dropout and identity calls that return their input; returns the node names."""
    removed = []
    for node in list(gm.graph.nodes):
        if _is_identity(gm, node) and node.args and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed.append(node.name)
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed
