"""Keep float the modules a qconfig mapping keeps float, where torch.ao's lowering would not.

convert_fx's `special_pattern_replacement` swaps every module of a type in its
SPECIAL_PATTERN_LOWER_MODULE_MAP (Hardswish, LeakyReLU, ELU, PReLU, Softmax, LayerNorm, BatchNorm2d,
InstanceNorm, Dropout, ...) that sits between a dequantize and a quantize for the int8 version, whatever
its qconfig says. A module kept float between two int8 layers therefore ran int8: `keep_float=["act"]`
on a conv-Hardswish-conv model returned an nnq.Hardswish, and a float PReLU crashed the convert (its
`from_reference` reads the qconfig, which is None). The map is looked up by exact type, so while the
model is prepared and converted such a module wears a subclass of its own class that the map does not
hold (`shield`); `unshield` gives the converted model's modules their own classes back. prepare_fx
retraces the model and calls a module a leaf only when its class comes from torch.nn, so the shielded
names are also passed to it as non-traceable (else the disguised Hardswish was traced into F.hardswish
and lowered as a function).
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

_TWINS: dict[type, type] = {}  # module class -> its shielded subclass, made once per class


def _lowered_types() -> frozenset[type]:
    from torch.ao.quantization.fx._lower_to_native_backend import SPECIAL_PATTERN_LOWER_MODULE_MAP

    return frozenset(SPECIAL_PATTERN_LOWER_MODULE_MAP)


def _twin(cls: type) -> type:
    if cls not in _TWINS:
        _TWINS[cls] = type(f"FloatKept{cls.__name__}", (cls,), {"__module__": __name__, "_fxq_shielded": cls})
    return _TWINS[cls]


def shield(model: nn.Module, float_names: Iterable[str]) -> list[str]:
    """Disguise the named modules torch.ao would lower regardless of their qconfig; returns their names."""
    lowered = _lowered_types()
    shielded = []
    for name in float_names:
        module = model.get_submodule(name)
        if type(module) in lowered:
            module.__class__ = _twin(type(module))
            shielded.append(name)
    return shielded


def unshield(model: nn.Module) -> nn.Module:
    """Put back the own class of every module `shield` disguised (after convert); returns `model`."""
    for module in model.modules():
        original = type(module).__dict__.get("_fxq_shielded")  # set on the twin itself, not inherited
        if original is not None:
            module.__class__ = original
    return model
