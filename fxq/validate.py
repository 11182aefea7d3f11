"""Checks at the API edge: the model and example inputs are usable before any work starts.

Inner code trusts what passes here. Every failure names the module or input at fault and what to do.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from fxq.errors import InputError


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself "
                         "(for a TorchScript or state_dict, rebuild the nn.Module first)")
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type != "cpu":
            raise InputError(f"{name or 'model'} is on {tensor.device}; int8 kernels run on the CPU: "
                             "pass model.cpu() (fxq never moves your model)")
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise InputError(f"{name} has dtype {tensor.dtype}; fxq quantizes float32 models: pass "
                             "model.float() (fxq never converts your model in place)")


def keywords_as_args(model: nn.Module, keywords: Mapping[str, Any]) -> tuple[Any, ...]:
    """The positional arguments of `model.forward` that a batch given by name stands for.

    Hugging Face users pass inputs as dicts ({"input_ids": ..., "attention_mask": ...}); fxq calls the
    model and its parts positionally, so names become positions, and a parameter skipped before the
    last named one takes its default.
    """
    parameters = list(inspect.signature(model.forward).parameters.values())
    names = [p.name for p in parameters]
    unknown = [name for name in keywords if name not in names]
    if unknown:
        raise InputError(f"{type(model).__name__}.forward has no parameter {', '.join(map(repr, unknown))}; its "
                         f"parameters are {', '.join(names)}")
    last = max(names.index(name) for name in keywords)
    args = []
    for parameter in parameters[:last + 1]:
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            raise InputError(f"{type(model).__name__}.forward takes '{parameter.name}' only by keyword (or as *args); "
                             "pass the inputs as a tuple in the order forward takes them")
        if parameter.name in keywords:
            args.append(keywords[parameter.name])
        elif parameter.default is not parameter.empty:
            args.append(parameter.default)
        else:
            raise InputError(f"{type(model).__name__}.forward needs '{parameter.name}', which the inputs do not name")
    return tuple(args)


def positional_batches(model: nn.Module, batches: Iterable[Any] | None) -> Iterator[Any] | None:
    """`batches` with each dict batch given as `model.forward`'s positional arguments (lazily)."""
    if batches is None or isinstance(batches, torch.Tensor):
        return batches
    return (keywords_as_args(model, batch) if isinstance(batch, Mapping) else batch for batch in batches)


def as_example_inputs(example_inputs: Any, model: nn.Module | None = None) -> tuple[Any, ...]:
    """Normalize example inputs to a tuple of positional arguments (a dict names `model.forward`'s)."""
    if isinstance(example_inputs, Mapping) and model is not None and example_inputs:
        example_inputs = keywords_as_args(model, example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise InputError(f"example_inputs must be a Tensor, a non-empty tuple of positional inputs or a dict of "
                         f"named inputs, got {type(example_inputs).__name__}")
    for position, value in enumerate(example_inputs):
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                raise InputError(f"example input {position} is on {value.device}; pass CPU tensors")
            if value.is_floating_point() and value.dtype != torch.float32:
                raise InputError(f"example input {position} has dtype {value.dtype}; pass float32 tensors")
    return example_inputs


def run_example(model: nn.Module, example_inputs: tuple[Any, ...], what: str = "the example inputs") -> Any:
    """Run the model once on `example_inputs`, naming the innermost module that rejects them."""
    stack: list[str] = []
    failed: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def enter(_module, _inputs, name=name):
            stack.append(name)

        def leave(_module, _inputs, _output):
            if stack:
                stack.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            return model(*example_inputs)
    except Exception as exc:
        failed = list(stack)
        where = failed[-1] if failed else type(model).__name__
        shapes = ", ".join(str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__
                           for v in example_inputs)
        raise InputError(f"{where}: the model fails on {what} ({shapes}): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; pass inputs "
                         "with the shape and dtype the model expects") from exc
    finally:
        for handle in handles:
            handle.remove()
