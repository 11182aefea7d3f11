"""The quantization engine: the only module that drives torch.ao.quantization's FX flow.

Everything PyTorch-specific about qconfigs, prepare, convert and the int8 CPU kernels lives here (and in
the modules beside it: op kinds, observers, kernel choice), so a second engine (torchao PT2E) can be
added behind the same functions without touching the front end, the recovery passes or the analysis.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import fx, nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization import observer as ao_observer
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.qconfig import default_dynamic_qconfig, per_channel_dynamic_qconfig
from torch.ao.quantization.qconfig_mapping import get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx, prepare_qat_fx

from fxq.backend import conv_add, float_shield
from fxq.backend.dynamic_linear import DynamicLinear
from fxq.backend.op_kinds import TRANSPOSED_CONV_TYPES
from fxq.backend.observers import (AutoRangeObserver, ChannelsLastMinMaxObserver,
                                  ChannelsLastMovingAverageMinMaxObserver, MSEObserver, PercentileObserver,
                                  SampledHistogramObserver)
from fxq.backend.prelu_slopes import PReLUSlopeObserver
from fxq.config import Backend, Observer, QuantOptions, key_covers
from fxq.backend.op_kinds import DYNAMIC_TYPES, is_quantized_module
from fxq.errors import UnsupportedBackendError
from fxq.frontend.graph import get_module, replace_module

__all__ = [
    "EngineChoice", "WeightGrid", "Bound", "weight_grid", "available_engines", "using_engine",
    "probe_kernel_saturation", "sums_exactly", "select_engine", "MixedBitsWeightObserver",
    "build_static_qconfig_mapping", "prepare_static", "prepare_qat", "prepare_dynamic",
    "quantize_dynamic_modules", "convert",
    "convert_reference", "repack_weights", "quantize_dynamic_recurrent", "range_choices", "freeze_observers", "freeze_bn_stats",
    "refine_dynamic_linears", "dynamic_linear", "weight_qparams", "fake_quantize_weight", "install_weights",
]

# torch.ao prints a deprecation notice on every prepare/convert; fxq pins the version and says so once.
warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")
warnings.filterwarnings("ignore", message=r"(?s).*For migrations of users.*")
warnings.filterwarnings("ignore", message=r".*_empty_affine_quantized.*")
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\.quantization.*")



@dataclass(frozen=True)
class EngineChoice:
    """Which int8 kernel library runs the model, and what fxq measured about it on this CPU."""

    engine: str
    reduce_range: bool
    kernel_saturates: bool
    reason: str

    @property
    def seven_bit_weights(self) -> bool:
        """7-bit weights (-64..64): on a saturating kernel, the other way than reduce_range to keep every
        pair of u8 x s8 products inside int16 (255 * 64 * 2 = 32640)."""
        return self.kernel_saturates and not self.reduce_range

    @property
    def dynamic_reduce_range(self) -> bool:
        """7-bit inputs for dynamic int8 Linears: where asked, or where the kernel saturates (their weights
        stay 8-bit). torch.ao's own dynamic Linear takes 7 bits on every CPU."""
        return self.reduce_range or self.kernel_saturates

    @property
    def fuses_conv_add(self) -> bool:
        """Whether a conv read only by a residual add runs as one kernel with it (see backend.conv_add)."""
        return self.engine in conv_add.FUSING_ENGINES


@dataclass(frozen=True)
class WeightGrid:
    """The int8 grid weights are rounded to: per output channel or per tensor, 8-bit or 7-bit.

    Every pass that rounds weights itself (optimized rounding, the refit, the sensitivity check) must use
    the grid the engine's weight observer gives, or the int8 modules would get other values.
    """

    per_channel: bool = True
    seven_bit: bool = False
    # on a saturating kernel, by layer: the output channels measured not to overflow with 8-bit weights,
    # which keep them (backend.weight_bits); a per-tensor grid keeps 8 bits only where every channel can
    eight_bit_channels: Mapping[str, frozenset[int]] = field(default_factory=dict)
    # the grid of one layer (`of`): its own channels on 8 bits where the others are on 7
    rows: frozenset[int] = frozenset()

    def observer(self):
        if self.seven_bit and self.rows:
            if self.per_channel:
                return MixedBitsWeightObserver.with_args(eight_bit_rows=tuple(sorted(self.rows)))
            return _weight_observer(self.per_channel, seven_bit=False)
        return _weight_observer(self.per_channel, self.seven_bit)

    def of(self, layer: str) -> WeightGrid:
        """The grid of one layer, by module name."""
        return WeightGrid(self.per_channel, self.seven_bit, rows=frozenset(self.eight_bit_channels.get(layer, ())))


def weight_grid(options: QuantOptions, choice: EngineChoice) -> WeightGrid:
    return WeightGrid(options.per_channel_weights, choice.seven_bit_weights)


def available_engines() -> list[str]:
    """Int8 engines this CPU and PyTorch build can run, read live (fbgemm and x86 need AVX2, for one)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


@contextlib.contextmanager
def using_engine(engine: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def probe_kernel_saturation(engine: str) -> bool:
    """True when the engine's int8 conv saturates its 16-bit pairwise products (x86 without VNNI).

    A kernel that adds u8*s8 pairs in int16 (vpmaddubsw) clips each pair at 32767: inputs all 255 times
    weights all 127 give about half the exact sum.
    """
    return not sums_exactly(engine, 127)


def sums_exactly(engine: str, weight_code: int) -> bool:
    """Whether a 64-channel int8 conv with every input code 255 and every weight code `weight_code`
    returns the exact sum 255 * weight_code * 64 on this engine."""
    import torch.ao.nn.quantized as nnq

    with using_engine(engine):
        conv = nnq.Conv2d(64, 1, 1)
        weight = torch.quantize_per_tensor(torch.full((1, 64, 1, 1), float(weight_code)), 1.0, 0, torch.qint8)
        conv.set_weight_bias(weight, None)
        exact = 255.0 * weight_code * 64
        conv.scale, conv.zero_point = 255.0 * 128 * 64 / 127, 128  # codes 1..255 span +-exact
        x = torch.quantize_per_tensor(torch.full((1, 64, 2, 2), 255.0), 1.0, 0, torch.quint8)
        result = float(conv(x).dequantize().mean())
    return abs(result - exact) <= 0.01 * abs(exact)


def select_engine(options: QuantOptions) -> EngineChoice:
    """Resolve `backend="auto"` and the activation range for this CPU, checking the engine exists.

    A backend the user names must be supported here (else UnsupportedBackendError, before any work);
    "auto" takes the first supported engine in this CPU family's order of preference and records why.
    """
    available = available_engines()
    machine = platform.machine().lower()
    if options.backend is Backend.AUTO:
        arm = machine in ("arm64", "aarch64") or machine.startswith("arm")
        # x86 dispatches per op to fbgemm or onednn. On x86 CPUs auto stays within the engines that
        # kernel_choice compares; any other supported engine must be named (the error says which).
        # onednn first on x86: its conv2d_add kernel saves residual blocks a rounding (backend.conv_add),
        # at the same batch-1 latency as x86 (MobileNetV2, ResNet-18; with and without VNNI). A model
        # with no such pair goes to x86 once its graph is known (kernel_choice.engine_for_graph).
        preference = ("qnnpack", "onednn") if arm else ("onednn", "x86")
        engine = next((name for name in preference if name in available), None)
        if engine is None:
            raise UnsupportedBackendError("auto", available, machine)
        why = f"auto: {machine} CPU"
        if engine != preference[0]:
            why += f" ({preference[0]} not supported here; supported: {', '.join(available)})"
    else:
        engine = options.backend.value
        why = "requested"
        if engine not in available:
            raise UnsupportedBackendError(engine, available, machine)
    # Measured, not assumed from CPU flags.
    saturates = probe_kernel_saturation(engine) if engine != "qnnpack" else False
    reduce_range = bool(options.reduce_range)
    if options.reduce_range is not None:
        why += f"; reduce_range={reduce_range} requested"
    if not saturates:
        why += "; probe: int8 conv does not saturate, so weights and activations are 8-bit"
    elif reduce_range:
        why += "; probe: int8 conv saturates 16-bit pair sums on this CPU (no VNNI): activations are 7-bit"
    else:
        # Per-tensor activations lose more to a halved grid than per-channel, error-compensated weights:
        # on ImageNet MobileNetV2 (AMD EPYC, AVX2, no VNNI) 7-bit activations gave 13.4 dB logits SQNR,
        # 7-bit weights 19.3 dB (bench/accuracy.py). NNCF's overflow fix makes the same trade.
        why += ("; probe: int8 conv saturates 16-bit pair sums on this CPU (no VNNI): weights are 7-bit "
                "(-64..64) except where measured not to overflow (backend.weight_bits), activations 8-bit")
    return EngineChoice(engine, reduce_range, saturates, why)


def _activation_observer(kind: Observer, reduce_range: bool):
    common = dict(dtype=torch.quint8, reduce_range=reduce_range)
    table = {
        Observer.MINMAX: ChannelsLastMinMaxObserver,
        Observer.MOVING_AVERAGE: ChannelsLastMovingAverageMinMaxObserver,
        Observer.HISTOGRAM: SampledHistogramObserver,
        Observer.AUTO: AutoRangeObserver,
        Observer.PERCENTILE: PercentileObserver,
        Observer.MSE: MSEObserver,
    }
    return table[kind].with_args(**common)


# symmetric, so +-max|w| both land on the grid (torch rounds to nearest within the dtype, not the
# observer bounds: -64..63 let 64 through anyway)
SEVEN_BIT_WEIGHTS = dict(quant_min=-64, quant_max=64)


def _weight_observer(per_channel: bool, seven_bit: bool = False):
    bounds = SEVEN_BIT_WEIGHTS if seven_bit else {}
    if per_channel:
        return ao_observer.PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, **bounds)
    return ao_observer.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, **bounds)


class MixedBitsWeightObserver(ao_observer.PerChannelMinMaxObserver):
    """Per-channel symmetric weights, 8-bit (-128..127) in the given output channels and 7-bit (-64..64)
    in the others: a layer on a saturating kernel overflows in some output channels only (backend.weight_bits).

    A 7-bit channel is an 8-bit one with a scale 127.5 / 64 times larger, so the kernel, the convert and
    every pass that reads (scale, quant_min, quant_max) need nothing else.
    """

    def __init__(self, eight_bit_rows: tuple[int, ...] = (), **kwargs: Any) -> None:
        super().__init__(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, **kwargs)
        self.eight_bit_rows = tuple(eight_bit_rows)

    def seven_bit_rows(self, channels: int) -> torch.Tensor:
        seven_bit = torch.ones(channels, dtype=torch.bool)
        seven_bit[[row for row in self.eight_bit_rows if row < channels]] = False
        return seven_bit

    @torch.jit.export
    def calculate_qparams(self):
        scale, zero_point = super().calculate_qparams()
        half_range = (SEVEN_BIT_WEIGHTS["quant_max"] - SEVEN_BIT_WEIGHTS["quant_min"]) / 2
        wider = scale * ((self.quant_max - self.quant_min) / 2 / half_range)
        return torch.where(self.seven_bit_rows(scale.numel()), wider, scale), zero_point

    def row_bounds(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(quant_min, quant_max) of each output channel: a pass that moves weights off their nearest
        grid point (optimized rounding) must keep a 7-bit channel's codes inside -64..64."""
        seven_bit = self.seven_bit_rows(channels)
        low = torch.where(seven_bit, float(SEVEN_BIT_WEIGHTS["quant_min"]), float(self.quant_min))
        return low, torch.where(seven_bit, float(SEVEN_BIT_WEIGHTS["quant_max"]), float(self.quant_max))


def build_static_qconfig_mapping(gm: fx.GraphModule, options: QuantOptions, choice: EngineChoice,
                                 keep_float: Iterable[str] = ()) -> QConfigMapping:
    """Global static qconfig plus per-layer overrides (observer choice, float layers) by module name."""
    weight = weight_grid(options, choice).observer()
    activation = _activation_observer(options.activation_observer, choice.reduce_range)
    mapping = QConfigMapping().set_global(QConfig(activation=activation, weight=weight)) \
        .set_object_type(nn.PReLU, QConfig(activation=activation, weight=PReLUSlopeObserver))
    float_keys = list(options.keep_float) + list(keep_float)
    for name, module in gm.named_modules():
        if not name:
            continue
        # transposed convs by name, not by type: a name rule (an observer override below) beats a type rule,
        # and torch.ao refuses per-channel weights for them
        if key_covers(float_keys, name, module) or isinstance(module, TRANSPOSED_CONV_TYPES):
            mapping.set_module_name(name, None)
            continue
        for key, observer_kind in options.observer_overrides.items():
            if key_covers([key], name, module):
                mapping.set_module_name(name, QConfig(
                    activation=_activation_observer(observer_kind, choice.reduce_range),
                    weight=PReLUSlopeObserver if isinstance(module, nn.PReLU) else weight))
    _keep_functions_float(gm, mapping, [key for key in float_keys if isinstance(key, str)])
    return mapping


def _keep_functions_float(gm: fx.GraphModule, mapping: QConfigMapping, float_names: list[str]) -> None:
    """Keep float the functional ops (residual adds, cats, ...) written inside modules kept in float.

    The traced graph is flat, so torch.ao sees every such op at the top level and `set_module_name`
    cannot reach it: a block kept in float would still quantize its residual add (on ImageNet
    MobileNetV2 that left a model with every block but one in float at 23 dB instead of 39 dB). The
    tracer records each node's enclosing modules in `nn_module_stack`; torch.ao addresses top-level
    functional ops by (function, index among calls of that function), counted in graph order.
    """
    if not float_names:
        return
    calls: dict[Any, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        index = calls.get(node.target, 0)
        calls[node.target] = index + 1
        scopes = [value[0] if isinstance(value, tuple) else key
                  for key, value in (node.meta.get("nn_module_stack") or {}).items()]
        if any(key_covers(float_names, scope) for scope in scopes):
            mapping.set_module_name_object_type_order("", node.target, index, None)


def _custom_config(non_traceable: Iterable[str]) -> PrepareCustomConfig:
    return PrepareCustomConfig().set_non_traceable_module_names(sorted(non_traceable))


def prepare_static(gm: fx.GraphModule, mapping: QConfigMapping, example_inputs: tuple,
                   choice: EngineChoice, non_traceable: Iterable[str] = ()) -> fx.GraphModule:
    """Insert observers (static PTQ) into an eval-mode traced model."""
    shielded = float_shield.shield(gm, _names_kept_float(mapping))
    with using_engine(choice.engine):
        return prepare_fx(gm, mapping, example_inputs,
                          prepare_custom_config=_custom_config([*non_traceable, *shielded]))


def _names_kept_float(mapping: QConfigMapping) -> list[str]:
    return [name for name, qconfig in mapping.module_name_qconfigs.items() if qconfig is None and name]


def prepare_qat(model: nn.Module, example_inputs: tuple, choice: EngineChoice,
                keep_float: Iterable[Any] = (), non_traceable: Iterable[str] = ()) -> fx.GraphModule:
    """Insert fake-quant modules (with BN folding during training) into a train-mode model."""
    mapping = get_default_qat_qconfig_mapping(choice.engine)
    # torch's defaults for x86 and fbgemm have 7-bit activations, and none has 7-bit weights
    if choice.seven_bit_weights or (not choice.reduce_range and choice.engine in ("x86", "fbgemm")):
        from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize

        activation = FusedMovingAvgObsFakeQuantize.with_args(
            observer=ao_observer.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=False)
        # the grid of the static flow's per-channel weight observer (7-bit on a saturating kernel)
        weight = FusedMovingAvgObsFakeQuantize.with_args(
            observer=ao_observer.MovingAveragePerChannelMinMaxObserver, dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            **(SEVEN_BIT_WEIGHTS if choice.seven_bit_weights else dict(quant_min=-128, quant_max=127)))
        mapping.set_global(QConfig(activation=activation, weight=weight))
    # PReLU slopes are not fake-quantized in training; this grid is the one convert puts them on
    mapping.set_object_type(nn.PReLU, QConfig(activation=mapping.global_qconfig.activation,
                                              weight=PReLUSlopeObserver))
    for name, module in model.named_modules():
        if name and key_covers(keep_float, name, module):
            mapping.set_module_name(name, None)
    shielded = float_shield.shield(model, _names_kept_float(mapping))
    with using_engine(choice.engine):
        return prepare_qat_fx(model, mapping, example_inputs,
                              prepare_custom_config=_custom_config([*non_traceable, *shielded]))


def prepare_dynamic(gm: nn.Module, example_inputs: tuple, options: QuantOptions, choice: EngineChoice,
                    non_traceable: Iterable[str] = ()) -> fx.GraphModule:
    """Dynamic quantization: int8 weights for Linear and recurrent layers, activations quantized per call."""
    qconfig = per_channel_dynamic_qconfig if options.per_channel_weights else default_dynamic_qconfig
    mapping = QConfigMapping()
    for module_type in DYNAMIC_TYPES:
        # recurrent kernels take per-tensor weights only
        mapping.set_object_type(module_type, qconfig if module_type is nn.Linear else default_dynamic_qconfig)
    for name, module in gm.named_modules():
        if name and key_covers(options.keep_float, name, module):
            mapping.set_module_name(name, None)
    with using_engine(choice.engine):
        return prepare_fx(gm, mapping, example_inputs, prepare_custom_config=_custom_config(non_traceable),
                          backend_config=_unfused_backend_config())


def _unfused_backend_config():
    """torch.ao's native backend config without its fusion patterns, for dynamic mode. Dynamic int8 layers
    gain nothing from fusing the activation after them (it runs on the float output either way), and
    prepare_fx refuses to fuse a Linear whose qconfig is dynamic with a ReLU that has none: Linear -> ReLU
    raised torch.ao's "During fusion, we need to specify the same qconfigs" LookupError."""
    from torch.ao.quantization.backend_config import BackendConfig, get_native_backend_config

    native = get_native_backend_config()
    return BackendConfig(f"{native.name}_unfused").set_backend_pattern_configs(
        [config for config in native.configs if config.fuser_method is None])


def quantize_dynamic_modules(model: nn.Module, options: QuantOptions, choice: EngineChoice,
                             smoothing: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Dynamic quantization without a graph, for models whose forward does not trace: each Linear and
    recurrent layer not kept float is swapped in place for its dynamic int8 module (swapping a module needs
    no trace). Linears become fxq's DynamicLinear (the probed input grid, `smoothing` by layer name);
    recurrent layers torch.ao's, with `prepare_dynamic`'s qconfig. Returns the swapped layers' names."""
    chosen = {name: module for name, module in model.named_modules()
              if name and isinstance(module, DYNAMIC_TYPES) and not key_covers(options.keep_float, name, module)}
    linears = {name: module for name, module in chosen.items() if type(module) is nn.Linear}
    with using_engine(choice.engine):
        for name, linear in linears.items():
            replace_module(model, name, dynamic_linear(linear, options, choice, (smoothing or {}).get(name)))
    quantize_dynamic_recurrent(model, [name for name in chosen if name not in linears], choice)
    return sorted(chosen)


def quantize_dynamic_recurrent(model: nn.Module, names: Iterable[str], choice: EngineChoice) -> None:
    """Swap the named LSTM/GRU/RNN-cell layers of `model` (in place) for torch.ao's dynamic int8 modules,
    with `prepare_dynamic`'s qconfig."""
    from torch.ao.quantization import quantize_dynamic

    recurrent = {name: default_dynamic_qconfig for name in names}
    if recurrent:
        with using_engine(choice.engine):
            quantize_dynamic(model, recurrent, inplace=True)


def refine_dynamic_linears(quantized: nn.Module, float_linears: Mapping[str, nn.Linear], options: QuantOptions,
                           choice: EngineChoice, smoothing: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Swap each torch.ao dynamic Linear of a converted graph for fxq's DynamicLinear, from the float layer
    of the same name (`float_linears`): the probed input grid instead of torch.ao's blanket 7 bits, and
    `smoothing` by layer name. Returns the layers swapped."""
    import torch.ao.nn.quantized.dynamic as nnqd

    swapped = []
    with using_engine(choice.engine):
        for name, module in list(quantized.named_modules()):
            if type(module) is nnqd.Linear and name in float_linears:
                replace_module(quantized, name, dynamic_linear(float_linears[name], options, choice,
                                                               (smoothing or {}).get(name)))
                swapped.append(name)
    return swapped


def dynamic_linear(linear: nn.Linear, options: QuantOptions, choice: EngineChoice,
                   smoothing: torch.Tensor | None = None) -> DynamicLinear:
    """fxq's dynamic int8 Linear for the float `linear`: the input grid `choice` allows, the weight grid
    `options` asks for, and `smoothing` (one factor per input channel) if given. Packs for the current
    engine (call it under `using_engine(choice.engine)`)."""
    return DynamicLinear.from_linear(linear, choice.dynamic_reduce_range, smoothing, options.per_channel_weights)


def convert(prepared: fx.GraphModule, choice: EngineChoice, conv_adds: Iterable[str] = ()) -> fx.GraphModule:
    """Lower an observed or QAT model to int8 kernels; on an engine that can, the `conv_adds` layers
    (`conv_add.fusable_convs`) run as one kernel with the residual add that reads them."""
    with using_engine(choice.engine):
        quantized = float_shield.unshield(convert_fx(prepared))
        if choice.fuses_conv_add:
            conv_add.fuse_into_adds(quantized, conv_adds)
        return quantized


def repack_weights(quantized: nn.Module, choice: EngineChoice) -> nn.Module:
    """A copy of `quantized` whose int8 weights are packed afresh for `choice.engine`.

    onednn (and x86, which sends convs with at most 100 groups to onednn) caches its kernel for the first
    input shape a packed weight sees; any other shape then rebuilds the kernel on every call. Measured on
    the reference machine: a 960->240 1x1 conv takes 0.08 ms at batch 1, and 19 ms at batch 1 after one
    batch-2 call. Choosing the engine and calibrating run the converted model on calibration batches, so
    the weights are repacked before the model is returned: the user's first call sets the cached shape.
    (Copying re-packs: packed params are saved as int8 weight and bias and packed again on load.)
    """
    with using_engine(choice.engine):
        return copy.deepcopy(quantized)


def convert_reference(prepared: fx.GraphModule, choice: EngineChoice, conv_adds: Iterable[str] = ()) -> fx.GraphModule:
    """Float simulation of the int8 model (quantize/dequantize pairs, fake-quantized weights), with the
    `conv_adds` outputs left unrounded where `convert` fuses them into their adds."""
    with using_engine(choice.engine):
        simulation = float_shield.unshield(convert_to_reference_fx(prepared))
    if choice.fuses_conv_add:
        conv_add.skip_output_rounding(simulation, conv_adds)
    return simulation


def range_choices(prepared: fx.GraphModule) -> dict[str, str]:
    """Which candidate range each calibrated activation observer with a per-activation choice
    (observers.AutoRangeObserver) takes, keyed by the node whose output it observes."""
    choices = {}
    for node in prepared.graph.nodes:
        observer = get_module(prepared, node)
        if isinstance(observer, AutoRangeObserver) and node.args and isinstance(node.args[0], fx.Node):
            observer.calculate_qparams()
            source = node.args[0]
            choices[str(source.target) if source.op == "call_module" else source.name] = observer.chosen
    return choices


def freeze_observers(qat_model: nn.Module) -> nn.Module:
    """Stop updating quantization ranges (the standard QAT recipe does this after a few epochs)."""
    qat_model.apply(torch.ao.quantization.disable_observer)
    return qat_model


def freeze_bn_stats(qat_model: nn.Module) -> nn.Module:
    """Stop updating BatchNorm running statistics in fused QAT conv-bn modules."""
    import torch.ao.nn.intrinsic.qat as nniqat

    qat_model.apply(nniqat.freeze_bn_stats)
    return qat_model




Bound = int | torch.Tensor


def weight_qparams(weight: torch.Tensor, grid: WeightGrid = WeightGrid()) -> tuple[torch.Tensor, Bound, Bound]:
    """(scale, quant_min, quant_max) the static qconfig's weight observer gives this weight; on a grid
    with 8 and 7 bits in different channels the bounds are per output channel, shaped like the scale."""
    observer = grid.observer()()
    observer(weight)
    scale, _ = observer.calculate_qparams()
    if isinstance(observer, MixedBitsWeightObserver):
        quant_min, quant_max = observer.row_bounds(scale.numel())
        return scale.to(torch.float32), quant_min, quant_max
    return scale.to(torch.float32), observer.quant_min, observer.quant_max


def fake_quantize_weight(weight: torch.Tensor, grid: WeightGrid = WeightGrid()) -> torch.Tensor:
    """The weight rounded to nearest on the int8 grid the kernel will use, in float."""
    scale, quant_min, quant_max = weight_qparams(weight, grid)
    shape = (-1,) + (1,) * (weight.dim() - 1) if scale.numel() > 1 else ()

    def rows(value: Bound) -> Bound:
        return value.view(shape) if isinstance(value, torch.Tensor) else value

    return torch.clamp(torch.round(weight / rows(scale)), rows(quant_min), rows(quant_max)) * rows(scale)


def install_weights(quantized: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    choice: EngineChoice) -> list[str]:
    """Replace int8 weights of converted modules by given on-grid float values and per-channel scales.

    Used for optimized rounding: the engine's convert rounds to nearest; these values were rounded to
    minimize output error on calibration data, on the same grid. Weights are packed for the engine the
    model was converted for (packing under another engine silently runs that engine's kernels).
    Returns the names installed.
    """
    with using_engine(choice.engine):
        return _install_weights(quantized, weights)


def _install_weights(quantized: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    installed = []
    for name, (values, scale) in weights.items():
        try:
            module = quantized.get_submodule(name)
        except AttributeError:
            continue
        if not (is_quantized_module(module) and hasattr(module, "set_weight_bias")):
            continue
        current = module.weight()
        if current.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            integer = torch.round(values / scale.view((-1,) + (1,) * (values.dim() - 1)))
            qweight = torch._make_per_channel_quantized_tensor(
                integer.to(torch.int8), scale.double(), torch.zeros(scale.numel(), dtype=torch.long), 0)
        else:
            integer = torch.round(values / scale)
            qweight = torch._make_per_tensor_quantized_tensor(integer.to(torch.int8), float(scale), 0)
        module.set_weight_bias(qweight, module.bias())
        installed.append(name)
    return installed
