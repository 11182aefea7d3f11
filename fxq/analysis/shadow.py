"""Shadow runs: the float reference graph and the int8 model side by side, layer by layer.

One pass per eval batch gives, for every quantized layer (a call_module of the int8 graph that has a
module of the same name in the float graph):

- accumulated error: the int8 model's activation at the layer against the float model's;
- own error: the layer's int8 module fed the float model's input to it, quantized to the grid the int8
  module reads (its input tensor's scale and zero point, read off the int8 run), against the float layer;
- solo error: the float model's output when only this layer runs its int8 module (fed as for the own
  error) and everything else stays float.

The solo runs reuse the float pass: every node value of the batch is kept, and each layer's run starts
from those values and recomputes only the nodes downstream of the layer (fx.Interpreter's initial_env).
Forward hooks capture activations, so the int8 model is run exactly as `fxq.quantize` returned it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from fxq.analysis.metrics import ActivationStats, ErrorStats
from fxq.backend.conv_add import is_conv_add
from fxq.backend.engine import using_engine
from fxq.backend.op_kinds import is_dynamic_quantized_module, is_quantized_module
from fxq.calibration import Batch, output_tensors


@dataclass(frozen=True)
class LayerPair:
    """One quantized layer: its module name, the int8 module type and both modules."""

    name: str
    op: str
    float_module: nn.Module
    int8_module: nn.Module

    @property
    def adds_residual(self) -> bool:
        """The int8 module also adds the residual the float graph adds after the layer (backend.conv_add):
        its output is compared with the float add's, and it reads the add's other input as a second input."""
        return is_conv_add(self.int8_module)

    @property
    def relu_after_add(self) -> bool:
        """It also applies the ReLU after that add (its output is compared with that ReLU's)."""
        return is_conv_add(self.int8_module, relu=True)


@dataclass
class LayerErrors:
    accumulated: ErrorStats = field(default_factory=ErrorStats)
    own: ErrorStats = field(default_factory=ErrorStats)
    solo: ErrorStats = field(default_factory=ErrorStats)
    activation: ActivationStats = field(default_factory=ActivationStats)
    # per call of the module: (scale, zero_point, dtype) of its int8 input; None if not a per-tensor int8 tensor
    input_grids: list[tuple[float, int, torch.dtype] | None] = field(default_factory=list)
    # the same for the residual input of a layer that adds one (LayerPair.adds_residual)
    residual_grids: list[tuple[float, int, torch.dtype] | None] = field(default_factory=list)

    @property
    def input_grid(self) -> tuple[float, int, torch.dtype] | None:
        """The grid of the first call's input (the only call, for all but shared modules)."""
        return self.input_grids[0] if self.input_grids else None


@dataclass
class ShadowResult:
    layers: dict[str, LayerErrors]
    end_to_end: ErrorStats
    reference_outputs: list[list[torch.Tensor]]  # float model outputs per eval batch, flattened
    seconds: dict[str, float] = field(default_factory=dict)  # side_by_side (both models, own), solo


def pair_layers(float_gm: fx.GraphModule, quantized: fx.GraphModule) -> list[LayerPair]:
    """Quantized layers of `quantized` that have a float counterpart by name, in graph order."""
    float_modules = dict(float_gm.named_modules())
    pairs: dict[str, LayerPair] = {}
    for node in quantized.graph.nodes:
        if node.op != "call_module" or node.target in pairs:
            continue
        module = quantized.get_submodule(str(node.target))
        measurable = hasattr(module, "scale") or is_dynamic_quantized_module(module)
        if is_quantized_module(module) and measurable and node.target in float_modules:
            pairs[str(node.target)] = LayerPair(str(node.target), type(module).__name__,
                                                float_modules[str(node.target)], module)
    return list(pairs.values())


def _as_float(value: torch.Tensor) -> torch.Tensor:
    return value.dequantize() if value.is_quantized else value


# The "grid" of a dynamic layer's input: it reads float and quantizes on each call's own range.
FLOAT_INPUT = (float("nan"), 0, torch.float32)


def is_float_input(grid: tuple[float, int, torch.dtype] | None) -> bool:
    return grid is not None and grid[2] == torch.float32


def _input_grid(inputs: tuple[Any, ...], position: int = 0,
                dynamic: bool = False) -> tuple[float, int, torch.dtype] | None:
    x = inputs[position] if len(inputs) > position else None
    if dynamic and isinstance(x, torch.Tensor) and x.is_floating_point():
        return FLOAT_INPUT
    if isinstance(x, torch.Tensor) and x.is_quantized and x.qscheme() in (torch.per_tensor_affine,
                                                                          torch.per_tensor_symmetric):
        return float(x.q_scale()), int(x.q_zero_point()), x.dtype
    return None


def _on_grid(x: torch.Tensor, grid: tuple[float, int, torch.dtype]) -> torch.Tensor:
    if is_float_input(grid):
        return x.detach()
    scale, zero_point, dtype = grid
    return torch.quantize_per_tensor(x.detach(), scale, zero_point, dtype)


def _run_int8_on(pair: LayerPair, grid: tuple[float, int, torch.dtype], x: torch.Tensor,
                 residual: tuple[tuple[float, int, torch.dtype], torch.Tensor] | None = None) -> torch.Tensor:
    """The int8 module on float inputs rounded to the grids it reads in the int8 model, dequantized."""
    extra = () if residual is None else (_on_grid(residual[1], residual[0]),)
    return _as_float(pair.int8_module(_on_grid(x, grid), *extra))


@dataclass
class _Hooks:
    handles: list[Any] = field(default_factory=list)

    def add(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        self.handles.append(module.register_forward_hook(hook))

    def add_pre(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _downstream(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes and every node that (transitively) uses them."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.users)
    return seen


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="solo runs", unit="layer", leave=False)


@torch.no_grad()
def run_side_by_side(float_gm: fx.GraphModule, quantized: fx.GraphModule, pairs: Sequence[LayerPair],
                     batches: Sequence[Batch], engine: str, *, solo: bool = True,
                     progress: bool = False) -> ShadowResult:
    """Accumulated, own and solo errors of every layer in `pairs` over `batches`.

    `float_gm` must be free of in-place ops (the pipeline makes them out of place): its node values are reused.
    """
    layers = {pair.name: LayerErrors() for pair in pairs}
    end_to_end = ErrorStats()
    reference_outputs = []
    call_nodes = {pair.name: [n for n in float_gm.graph.nodes if n.op == "call_module" and n.target == pair.name]
                  for pair in pairs}
    # where the int8 layer's output has a float counterpart: the call, or the residual add right after it
    output_nodes = {pair.name: [_fused_output(node, pair) for node in call_nodes[pair.name]] for pair in pairs}
    downstream = {name: _downstream(nodes) for name, nodes in output_nodes.items()}
    bar = _progress(len(batches) * len(pairs), progress and solo)
    seconds = {"side_by_side": 0.0, "solo": 0.0}
    with using_engine(engine):
        for batch in batches:
            start = time.perf_counter()
            interpreter = fx.Interpreter(float_gm, garbage_collect_values=False)
            references = output_tensors(interpreter.run(*batch))
            env = interpreter.env
            int8_result = _run_int8(quantized, pairs, layers, output_nodes, env, batch)
            for reference, test in zip(references, output_tensors(int8_result), strict=True):
                end_to_end.update(reference, test)
            reference_outputs.append(references)
            own_outputs = {pair.name: _measure_own(pair, layers[pair.name], call_nodes[pair.name],
                                                   output_nodes[pair.name], env) for pair in pairs}
            middle = time.perf_counter()
            seconds["side_by_side"] += middle - start
            if solo:
                for pair in pairs:
                    if own_outputs[pair.name] is not None:
                        result = _run_solo(float_gm, pair, layers[pair.name], output_nodes[pair.name],
                                           own_outputs[pair.name], env, downstream[pair.name], batch)
                        for reference, test in zip(references, output_tensors(result), strict=True):
                            layers[pair.name].solo.update(reference, test)
                    if bar is not None:
                        bar.update(1)
            seconds["solo"] += time.perf_counter() - middle
            del env, own_outputs
    if bar is not None:
        bar.close()
    return ShadowResult(layers, end_to_end, reference_outputs, {k: round(v, 3) for k, v in seconds.items()})


def _run_int8(quantized: fx.GraphModule, pairs: Sequence[LayerPair], layers: dict[str, LayerErrors],
              output_nodes: dict[str, list[fx.Node]], env: dict[fx.Node, Any], batch: Batch) -> Any:
    """Run the int8 model, comparing each layer's output with the float value of the same call."""
    calls = {pair.name: 0 for pair in pairs}
    hooks = _Hooks()
    for pair in pairs:
        def compare(_module, inputs, output, name=pair.name):
            errors, index = layers[name], calls[name]
            calls[name] += 1
            if index == len(errors.input_grids):
                errors.input_grids.append(_input_grid(inputs, dynamic=is_dynamic_quantized_module(_module)))
            if index < len(output_nodes[name]):
                reference = env[output_nodes[name][index]]
                errors.activation.update(reference)
                errors.accumulated.update(reference, _as_float(output))
        hooks.add(pair.int8_module, compare)
        if pair.adds_residual:  # before the call: the kernel may write its output over the residual
            def record_residual(_module, inputs, name=pair.name):
                errors = layers[name]
                if len(errors.residual_grids) == len(errors.input_grids):
                    errors.residual_grids.append(_input_grid(inputs, 1))
            hooks.add_pre(pair.int8_module, record_residual)
    try:
        return quantized(*batch)
    finally:
        hooks.remove()


def _float_input(node: fx.Node, env: dict[fx.Node, Any]) -> torch.Tensor | None:
    first = node.args[0] if node.args else None
    value = env.get(first) if isinstance(first, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _fused_output(node: fx.Node, pair: LayerPair) -> fx.Node:
    """The float node whose value the int8 layer computes: its call, or for a layer that adds a residual
    the add its call feeds (conv_add.fusable_convs: the only reader), or the ReLU after that add."""
    if not pair.adds_residual:
        return node
    (add,) = node.users
    if not pair.relu_after_add:
        return add
    (relu,) = add.users
    return relu


def _residual_input(node: fx.Node, env: dict[fx.Node, Any]) -> torch.Tensor | None:
    (add,) = node.users
    other = next((arg for arg in add.args if isinstance(arg, fx.Node) and arg is not node), None)
    value = env.get(other) if other is not None else None
    return value if isinstance(value, torch.Tensor) else None


def _measure_own(pair: LayerPair, errors: LayerErrors, nodes: list[fx.Node], output_nodes: list[fx.Node],
                 env: dict[fx.Node, Any]) -> list[torch.Tensor] | None:
    """Own error of every call of the layer; returns the int8 outputs (one per call) for the solo run.

    A layer that adds a residual reads the float add's other input too, rounded to its int8 grid; one
    called more than once is not measured (the solo run could not substitute its later calls)."""
    grids = errors.input_grids
    if len(grids) != len(nodes) or any(grid is None for grid in grids) or (pair.adds_residual and len(nodes) > 1):
        return None
    outputs = []
    residual_grids = errors.residual_grids if pair.adds_residual else [None] * len(grids)
    if len(residual_grids) != len(nodes):
        return None
    for node, output_node, grid, residual_grid in zip(nodes, output_nodes, grids, residual_grids):
        x = _float_input(node, env)
        residual = _residual_input(node, env) if pair.adds_residual else None
        if x is None or (pair.adds_residual and (residual is None or residual_grid is None)):
            return None
        own = _run_int8_on(pair, grid, x, None if residual is None else (residual_grid, residual))
        errors.own.update(env[output_node], own)
        outputs.append(own)
    return outputs


def _run_solo(float_gm: fx.GraphModule, pair: LayerPair, errors: LayerErrors, nodes: list[fx.Node],
              own_outputs: list[torch.Tensor], env: dict[fx.Node, Any], downstream: set[fx.Node],
              batch: Batch) -> Any:
    """The float graph's output with only `pair` running its int8 module; upstream values are reused."""
    initial_env = {node: value for node, value in env.items() if node not in downstream}
    if len(nodes) == 1:
        initial_env[nodes[0]] = own_outputs[0]
        return fx.Interpreter(float_gm).run(*batch, initial_env=initial_env)

    # a module called more than once: later calls see perturbed inputs, so substitute as they run
    calls = iter(errors.input_grids)

    def substitute(_module, inputs, _output):
        return _run_int8_on(pair, next(calls), inputs[0])

    handle = pair.float_module.register_forward_hook(substitute)
    try:
        return fx.Interpreter(float_gm).run(*batch, initial_env=initial_env)
    finally:
        handle.remove()
