"""Calibration batches: normalize what users pass, check it once, and run it through a model.

A batch that is a Tensor is called as `model(batch)`, a tuple or list as `model(*batch)`. DataLoaders of
(inputs, labels) pairs go through `inputs_only` first.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from fxq.errors import CalibrationError, InputError
from fxq.validate import run_example

Batch = tuple[Any, ...]


def as_args(batch: Any) -> Batch:
    """The positional arguments a batch stands for."""
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    return (batch,)


def inputs_only(loader: Iterable[Any], input_index: int = 0) -> Iterator[Any]:
    """Yield the model inputs of a DataLoader that yields (inputs, labels, ...) tuples."""
    for item in loader:
        yield item[input_index] if isinstance(item, (tuple, list)) else item


def _structure(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dim(), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_structure(v) for v in value)
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    return type(value).__name__


def _describe(structure: Any) -> str:
    return repr(structure).replace("'tensor', ", "Tensor ")


def materialize(calibration_data: Iterable[Any] | None, example_inputs: Batch,
                limit: int | None = None) -> list[Batch]:
    """Collect up to `limit` batches as argument tuples, checking each against the example inputs."""
    if calibration_data is None:
        raise CalibrationError("static quantization needs calibration_data (an iterable of input batches); "
                               "pass a few hundred representative samples, or use mode='dynamic'")
    if isinstance(calibration_data, torch.Tensor):
        raise InputError("calibration_data is a single Tensor; pass an iterable of batches, e.g. "
                         "list(data.split(16)) or [data]")
    expected = _structure(example_inputs)
    batches = []
    iterator = iter(calibration_data)
    for index, batch in enumerate(itertools.islice(iterator, limit)):
        args = as_args(batch)
        if _structure(args) != expected:
            raise InputError(
                f"calibration batch {index} has structure {_describe(_structure(args))} but the example "
                f"inputs have {_describe(expected)}; batches must be shaped like example_inputs (a DataLoader "
                "of (inputs, labels) needs fxq.inputs_only(loader))")
        for position, value in enumerate(args):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise CalibrationError(f"calibration batch {index}, input {position} contains NaN or Inf; "
                                       "clean the data before calibrating")
        batches.append(args)
    if not batches:
        raise CalibrationError("calibration_data is empty; static quantization needs at least one batch")
    return batches


def first_nonfinite_module(model: nn.Module, batch: Batch) -> str | None:
    """Name of the first module (in execution order) whose output holds NaN or Inf for `batch`."""
    found: list[str] = []
    handles = []

    def hook(name: str):
        def check(_module, _inputs, output):
            if not found and isinstance(output, torch.Tensor) and output.is_floating_point() \
                    and not torch.isfinite(output).all():
                found.append(name)
        return check

    for name, module in model.named_modules():
        if name and not list(module.children()):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def run_batches(model: nn.Module, batches: Sequence[Batch], *, progress: bool = False,
                description: str = "calibrating") -> None:
    """Run every batch through `model` without gradients (observers record ranges as a side effect)."""
    iterable: Iterable[Batch] = batches
    if progress:
        from tqdm.auto import tqdm

        iterable = tqdm(batches, desc=description, unit="batch", leave=False)
    with torch.no_grad():
        for batch in iterable:
            model(*batch)


def outputs(model: nn.Module, batches: Sequence[Batch]) -> list[Any]:
    """The model's outputs for each batch, without gradients."""
    with torch.no_grad():
        return [model(*batch) for batch in batches]


def output_tensors(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, or nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        if value.is_quantized:
            return [value.dequantize()]
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in output_tensors(item)]
    return []


def check_float_outputs(model: nn.Module, batches: Sequence[Batch]) -> None:
    """Every calibration batch must run through the float model and give finite outputs."""
    for index, batch in enumerate(batches):
        try:
            (output,) = outputs(model, [batch])
        except Exception:  # rerun with hooks to name the module that rejects the batch
            run_example(model, batch, what=f"calibration batch {index}")
            raise
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in output_tensors(output)):
            where = first_nonfinite_module(model, batch) or "the model's own forward"
            raise CalibrationError(f"{where}: produces NaN or Inf on calibration batch {index}; fix the "
                                   "model or the data (int8 ranges cannot be computed from non-finite values)")


# Below this many calibration samples the summary warns: activation ranges come from these samples alone.
FEW_CALIBRATION_SAMPLES = 32


def few_samples_note(batches: Sequence[Batch]) -> str | None:
    """A note for the summary when the calibration batches hold fewer than FEW_CALIBRATION_SAMPLES samples
    (counted along the first dimension of each batch's first tensor), else None."""
    samples = 0
    for batch in batches:
        first = next((value for value in batch if isinstance(value, torch.Tensor)), None)
        samples += int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    if samples >= FEW_CALIBRATION_SAMPLES:
        return None
    return (f"calibrated on {samples} sample(s): activation ranges come from these alone, and inputs that go "
            f"beyond them are clipped; {FEW_CALIBRATION_SAMPLES} or more representative samples (a few hundred "
            "where you have them) give ranges that hold on new data")

