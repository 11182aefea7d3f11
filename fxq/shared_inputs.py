"""Which dynamic int8 Linears of a quantized model run as one kernel (backend.shared_input), by measurement.

Candidates are the Linears every call of which, in a pass of the example inputs, reads the very tensor
another one reads (an attention block's query, key and value). Their stacked layer needs one input
smoothing (recovery.smoothing), so it is chosen again for the stack; the group is kept only if its int8
output is about as close to the float layers' outputs, on the calibration inputs, as the separate layers'
(MAX_ERROR_RATIO), and the whole model only if its outputs stay as close to float on the example inputs
and a few calibration batches (TOLERANCE_DB), else every group is undone. A model whose top level is an
fx.GraphModule is left alone: it is served and exported from its graph, which this does not change.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx, nn

from fxq.analysis.metrics import sqnr_db
from fxq.backend.dynamic_linear import DynamicLinear
from fxq.backend.engine import using_engine
from fxq.backend.shared_input import SharedInputGroup, install_group
from fxq.calibration import output_tensors
from fxq.frontend.graph import replace_module
from fxq.recovery.smoothing import choose_smoothing
from fxq.regions import capture_calls

# a group's int8 output error (sum of squares against the float layers) may be this much above the
# separate layers' (about 0.4 dB on those outputs); one kernel instead of three is worth that
MAX_ERROR_RATIO = 1.1
# the model's outputs on the example inputs and the first CHECK_BATCHES calibration batches may lose this
# much SQNR against float (the lowest over those calls)
TOLERANCE_DB = 0.1
CHECK_BATCHES = 4


@dataclass
class Joined:
    """What fuse_shared_input_linears did: the summary's lines (one per group), notes (why groups were
    undone), and the member layers now run in groups."""

    rewrites: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)


def shared_input_groups(model: nn.Module, example_inputs: tuple[Any, ...]) -> list[list[str]]:
    """Groups of fxq DynamicLinears of `model` (paths, in call order) with one input size and grid whose
    every call, in a pass of `example_inputs`, reads the same tensor object as the others' calls."""
    linears = {name: m for name, m in model.named_modules() if type(m) is DynamicLinear}
    calls = capture_calls(model, list(linears), [example_inputs])
    by_inputs: dict[tuple, list[str]] = defaultdict(list)
    for name, (made,) in calls.items():  # the recorded tensors stay alive here, so their ids are unique
        if made and all(args is not None and len(args) == 1 for args in made):
            layer = linears[name]
            by_inputs[(tuple(id(args[0]) for args in made), layer.in_features, layer.reduce_range)].append(name)
    return [names for names in by_inputs.values() if len(names) > 1]


def _float_linear(float_model: nn.Module, name: str, like: DynamicLinear) -> nn.Linear | None:
    """The float Linear that `name` (a path of the quantized model) quantizes: at the same path, or at its
    parent's (a region quantized on its own holds the layer as its `linear`)."""
    for path in (name, name.rpartition(".")[0]):
        try:
            module = float_model.get_submodule(path)
        except AttributeError:
            continue
        if type(module) is nn.Linear and (module.in_features, module.out_features) == (
                like.in_features, like.out_features):
            return module
    return None


def _stacked(linears: list[nn.Linear]) -> nn.Linear:
    stacked = nn.Linear(linears[0].in_features, sum(l.out_features for l in linears))
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([l.weight.detach().float() for l in linears]))
        stacked.bias.copy_(torch.cat([l.bias.detach().float() if l.bias is not None
                                      else torch.zeros(l.out_features) for l in linears]))
    return stacked


def fuse_shared_input_linears(quantized: nn.Module, float_model: nn.Module, example_inputs: tuple[Any, ...],
                              batches: Sequence[tuple], engine: str, per_channel: bool) -> Joined:
    """Run each measured-good group of `quantized`'s dynamic Linears as one kernel, in place (packed for
    `engine`)."""
    if isinstance(quantized, fx.GraphModule):
        return Joined()
    groups = shared_input_groups(quantized, example_inputs)
    members = {name: quantized.get_submodule(name) for group in groups for name in group}
    floats = {name: _float_linear(float_model, name, module) for name, module in members.items()}
    groups = [group for group in groups if all(floats[name] is not None for name in group)]
    if not groups:
        return Joined()
    calls = capture_calls(quantized, [group[0] for group in groups], list(batches))
    inputs = {name: [args[0].detach() for run in runs for args in run] for name, runs in calls.items()}
    checked = [tuple(example_inputs)] + list(batches[:CHECK_BATCHES])
    with torch.no_grad():
        float_outputs = [output_tensors(float_model(*batch)) for batch in checked]
        before_db = _fidelity_db(quantized, checked, float_outputs)
    lines, installed = [], []
    with using_engine(engine), torch.no_grad():
        for group in groups:
            line = _join(quantized, group, [members[name] for name in group], [floats[name] for name in group],
                         inputs[group[0]], batches, per_channel)
            if line is not None:
                lines.append(line)
                installed.append(group)
        if not installed:
            return Joined()
        try:
            after_db = _fidelity_db(quantized, checked, float_outputs)
            why = (None if after_db >= before_db - TOLERANCE_DB else
                   f"outputs {after_db:.1f} dB against float with them, {before_db:.1f} dB without")
        except Exception as error:  # the model's code may need contiguous outputs (`.view`), say
            why = f"the model failed with them ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    if why is None:
        return Joined(lines, [], [name for group in installed for name in group])
    for group in installed:
        for name in group:
            replace_module(quantized, name, members[name])
    return Joined(notes=[f"dynamic Linears reading one tensor kept as separate kernels: {why}"])


def _join(quantized: nn.Module, group: list[str], members: list[DynamicLinear], floats: list[nn.Linear],
          inputs: list[torch.Tensor], batches: Sequence[tuple], per_channel: bool) -> str | None:
    """Install `group` as one kernel if its int8 output error on `inputs` (the calibration inputs) is within
    MAX_ERROR_RATIO of the separate `members`'; returns its summary line, or None if it stays apart."""
    reduce_range = members[0].reduce_range
    stacked = _stacked(floats)
    factors, choices = choose_smoothing(
        quantized, {"stack": stacked}, batches,
        lambda linear, s: DynamicLinear.from_linear(linear, reduce_range, s, per_channel),
        known_inputs={"stack": inputs})
    fused = SharedInputGroup.stacking(DynamicLinear.from_linear(stacked, reduce_range, factors.get("stack"),
                                                                per_channel), [f.out_features for f in floats])
    fused_error = separate_error = 0.0
    for x in inputs:
        reference = stacked(x)
        fused_error += float((fused(x) - reference).square().sum())
        separate_error += float((torch.cat([member(x) for member in members], dim=-1) - reference).square().sum())
    ratio = fused_error / separate_error if separate_error > 0 else float("inf")
    if ratio > MAX_ERROR_RATIO:
        return None
    install_group(quantized, group, fused)
    alpha = choices[0].alpha
    return (f"shared input: {', '.join(group)} run as one dynamic int8 kernel (smoothing "
            f"{'none' if alpha is None else f'alpha {alpha}'}; int8 output error x{ratio:.2f} of the separate layers)")


def _fidelity_db(model: nn.Module, batches: list[tuple], float_outputs: list[list[torch.Tensor]]) -> float:
    """The lowest SQNR of `model`'s outputs against float over `batches`."""
    return min(float(sqnr_db(f, o)) for batch, expected in zip(batches, float_outputs)
               for f, o in zip(expected, output_tensors(model(*batch))))


def without_members(rewrites: list[str], members: list[str]) -> list[str]:
    """The summary's rewrite lines without the activation smoothing lines of `members` (Joined.members):
    their group's line gives the smoothing they share. A layer quantized as a region of its own is named by
    the region's path in its line."""
    forms = [f"activation smoothing: {name} (" for name in members] + [
        f"{name.rpartition('.')[0]}: activation smoothing: {name.rpartition('.')[2]} (" for name in members]
    return [line for line in rewrites if not line.startswith(tuple(forms))]
