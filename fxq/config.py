"""Quantization options: one frozen dataclass, validated once at the API edge.

`fxq.quantize(model, inputs, **options)` maps its keyword arguments onto `QuantOptions`; the report prints
the resolved options so a result can be reproduced.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from fxq.errors import ConfigError


class Mode(str, enum.Enum):
    STATIC = "static"
    DYNAMIC = "dynamic"
    QAT = "qat"


class Backend(str, enum.Enum):
    AUTO = "auto"
    X86 = "x86"
    FBGEMM = "fbgemm"
    QNNPACK = "qnnpack"
    ONEDNN = "onednn"


class Observer(str, enum.Enum):
    """How an activation's int8 range is chosen from calibration data."""

    AUTO = "auto"  # per activation, the range with the least error on its calibration histogram, among min-max,
    # shrunk min-max (mse), percentile and histogram (backend.observers.AutoRangeObserver)
    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    HISTOGRAM = "histogram"
    PERCENTILE = "percentile"
    MSE = "mse"


def _enum_value(enum_type: type[enum.Enum], value: Any, option: str) -> Any:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(str(value).lower())
    except ValueError:
        valid = ", ".join(repr(member.value) for member in enum_type)
        raise ConfigError(f"{option}={value!r} is not valid; choose one of {valid}") from None


def key_covers(keys: Iterable[Any], name: str, module: Any = None) -> bool:
    """Whether a keep_float / observer_overrides key covers a module: its own name, an enclosing
    module's name (a block kept float keeps all its layers), or its class."""
    for key in keys:
        if isinstance(key, str) and (name == key or name.startswith(key + ".")):
            return True
        if isinstance(key, type) and isinstance(module, key):
            return True
    return False


def covered_modules(model: Any, keys: Iterable[Any]) -> list[str]:
    """Names of the submodules of `model` that `keys` cover (see `key_covers`), the root left out."""
    return [name for name, module in model.named_modules() if name and key_covers(keys, name, module)]


@dataclass(frozen=True)
class QuantOptions:
    """Every knob of a quantization run. Defaults are what fxq recommends; change them per model."""

    mode: Mode = Mode.STATIC
    backend: Backend = Backend.AUTO
    activation_observer: Observer = Observer.AUTO
    # Layers (qualified module names, or module classes) left in float.
    keep_float: tuple[Any, ...] = ()
    # Per-layer observer overrides: {module name or class: Observer}.
    observer_overrides: Mapping[Any, Observer] = field(default_factory=dict)
    # 7-bit activations. None (and False): 8-bit activations; where a probe finds that the int8 kernel
    # saturates 16-bit pair sums (x86 without VNNI), weights are 7-bit instead (-64..64) in every output
    # channel not measured to run 8-bit weights without overflow (backend.weight_bits).
    reduce_range: bool | None = None
    per_channel_weights: bool = True
    equalize: bool = True
    # Per-layer bias correction on the float simulation of the int8 model, with quantized upstream inputs.
    bias_correction: bool = True
    # Error-compensated (GPTQ-style) int8 weight rounding instead of round-to-nearest.
    optimize_rounding: bool = True
    # Dynamic mode: divide a Linear's input channels by per-channel factors folded into its weights
    # (SmoothQuant's migration), per layer where it measurably lowers the int8 output error
    # (fxq/recovery/smoothing.py). Needs no data beyond the example inputs; uses calibration_data if given.
    smooth_activations: bool = True
    # Dynamic int8 layers (dynamic mode's Linear/LSTM/GRU, static mode's LSTM/GRU) stay int8 only where
    # they time faster than float on this CPU at the example inputs' shapes, measured at quantize time
    # (fxq/backend/dynamic_payoff.py); being timed, the choice near break-even may differ between runs.
    # False keeps every one int8.
    dynamic_where_faster: bool = True
    # Dynamic int8 Linears that read the same tensor (an attention block's query, key and value) run as one
    # kernel where that keeps their output error, measured on the calibration batches (fxq/shared_inputs.py).
    # Models whose top-level forward is an FX graph, and accuracy-targeted runs, are left as they are.
    share_inputs: bool = True
    # Leave ops in float where int8 would cost more time than it saves, quantize/dequantize included
    # (fxq/frontend/islands.py); False runs every op torch.ao can quantize in int8.
    float_islands: bool = True
    # A model quantized by regions or module swaps (its forward does not FX-trace: Hugging Face models) runs a
    # torch.jit.trace of its forward per input signature, each checked against the Python forward on its first
    # call (fxq/backend/traced_serving.py); False keeps its Python forward on every call.
    serve_traced: bool = True
    # Keep the fewest blocks in float that reach this end-to-end SQNR (accuracy-targeted mixed precision),
    # measured on held-out calibration batches (fxq/mixed_precision.py). Blocks are ranked by
    # their layers' float and int8 times measured on this machine, so unlike the rest of quantize the
    # choice may differ between runs; each choice is verified against the target.
    target_sqnr_db: float | None = None
    # Or for the user's metric: eval_fn(model) -> score (higher is better); the int8 model may score at
    # most max_drop below the float model.
    eval_fn: Callable[[Any], float] | None = None
    max_drop: float | None = None
    max_calibration_batches: int | None = None
    progress: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _enum_value(Mode, self.mode, "mode"))
        object.__setattr__(self, "backend", _enum_value(Backend, self.backend, "backend"))
        object.__setattr__(self, "activation_observer",
                           _enum_value(Observer, self.activation_observer, "activation_observer"))
        keep = self.keep_float
        if isinstance(keep, (str, type)):
            keep = (keep,)
        object.__setattr__(self, "keep_float", tuple(keep))
        overrides = {key: _enum_value(Observer, value, f"observer_overrides[{key!r}]")
                     for key, value in dict(self.observer_overrides).items()}
        object.__setattr__(self, "observer_overrides", overrides)
        if self.max_calibration_batches is not None and self.max_calibration_batches < 1:
            raise ConfigError(f"max_calibration_batches={self.max_calibration_batches} must be >= 1")
        if self.target_sqnr_db is not None and not 0 < self.target_sqnr_db < 200:
            raise ConfigError(f"target_sqnr_db={self.target_sqnr_db} must be a positive number of dB")
        if (self.eval_fn is None) != (self.max_drop is None):
            raise ConfigError("eval_fn and max_drop go together: eval_fn(model) scores a model (higher is "
                              "better) and max_drop is how far below the float model's score int8 may fall")
        if self.eval_fn is not None:
            if not callable(self.eval_fn):
                raise ConfigError(f"eval_fn={self.eval_fn!r} must be a function of a model returning a score")
            if not isinstance(self.max_drop, (int, float)) or self.max_drop < 0:
                raise ConfigError(f"max_drop={self.max_drop!r} must be a number >= 0")
            if self.target_sqnr_db is not None:
                raise ConfigError("pass target_sqnr_db or eval_fn with max_drop, not both")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "QuantOptions":
        """Build options from `fxq.quantize` keyword arguments, rejecting unknown names by listing valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid options are {', '.join(sorted(names))}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "QuantOptions":
        return dataclasses.replace(self, **changes)

    def with_float(self, names: Iterable[str]) -> "QuantOptions":
        """These options with `names` kept float on top of the user's keep_float."""
        return self.replace(keep_float=self.keep_float + tuple(names))

    def scoped_to(self, prefix: str) -> "QuantOptions":
        """These options for the submodule named `prefix`: keep_float and observer_overrides names made
        relative to it, names outside it dropped (classes apply everywhere)."""
        inside = prefix + "."

        def relative(key: Any) -> Any:
            return key[len(inside):] if isinstance(key, str) else key

        def applies(key: Any) -> bool:
            return not isinstance(key, str) or key.startswith(inside)

        keep = tuple(relative(key) for key in self.keep_float if applies(key))
        overrides = {relative(key): value for key, value in self.observer_overrides.items() if applies(key)}
        return self.replace(keep_float=keep, observer_overrides=overrides)

    @property
    def searches_mixed_precision(self) -> bool:
        """Whether a target (SQNR or the user's metric) asks for the mixed-precision search."""
        return self.target_sqnr_db is not None or self.eval_fn is not None

    def describe(self) -> dict[str, Any]:
        """Plain-value view for reports and JSON."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif f.name == "eval_fn" and value is not None:
                value = getattr(value, "__name__", repr(value))
            elif f.name == "keep_float":
                value = [v if isinstance(v, str) else getattr(v, "__name__", str(v)) for v in value]
            elif f.name == "observer_overrides":
                value = {str(k if isinstance(k, str) else getattr(k, "__name__", k)): v.value
                         for k, v in value.items()}
            out[f.name] = value
        return out
