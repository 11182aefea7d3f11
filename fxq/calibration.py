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


def finite(output: Any) -> bool:
    """Whether every floating-point tensor of a model output is finite."""
    return all(bool(torch.isfinite(t).all()) for t in output_tensors(output))


def check_float_outputs(model: nn.Module, batches: Sequence[Batch]) -> None:
    """Every calibration batch must run through the float model and give finite outputs."""
    for index, batch in enumerate(batches):
        try:
            (output,) = outputs(model, [batch])
        except Exception:  # rerun with hooks to name the module that rejects the batch
            run_example(model, batch, what=f"calibration batch {index}")
            raise
        if not finite(output):
            where = first_nonfinite_module(model, batch) or "the model's own forward"
            raise CalibrationError(f"{where}: produces NaN or Inf on calibration batch {index}; fix the "
                                   "model or the data (int8 ranges cannot be computed from non-finite values)")


def check_example_outputs(model: nn.Module, example_inputs: Batch, example_outputs: Any,
                          batches: Sequence[Batch]) -> None:
    """Raise a CalibrationError naming the module at fault when the float model's outputs on the example
    inputs are not finite (before anything compares a rewritten graph with them)."""
    if finite(example_outputs):
        return
    check_float_outputs(model, batches)
    where = first_nonfinite_module(model, example_inputs) or "the model's own forward"
    raise CalibrationError(f"{where}: produces NaN or Inf on the example inputs; fix the model or pass other "
                           "example inputs")


class OutputCheck:
    """check_float_outputs on the outputs of a pass over the batches that runs anyway (equalization's),
    so that the check costs no pass of its own. `seen(index, output)` takes each batch's output and
    raises at the first non-finite one, before the pass's results are used (equalization would rescale
    weights by NaN); `finish()` runs check_float_outputs on the model when a batch was not seen.
    check_float_outputs names the module at fault."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch]) -> None:
        self.model, self.batches = model, batches
        self.passed: set[int] = set()

    def seen(self, index: int, output: Any) -> None:
        if not finite(output):
            check_float_outputs(self.model, self.batches)
            raise CalibrationError(f"the traced float graph produces NaN or Inf on calibration batch {index}, "
                                   "where the model does not; please report the model")
        self.passed.add(index)

    def finish(self) -> None:
        if len(self.passed) < len(self.batches):
            check_float_outputs(self.model, self.batches)


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



def leading_samples(batch: Batch, count: int) -> Batch:
    """The batch cut to its first `count` samples (tensors sliced along their first dimension). A model whose
    inputs are not batched along it may reject the result: callers fall back to the whole batch."""
    return tuple(value[:count] if isinstance(value, torch.Tensor) and value.dim() else value for value in batch)


def _channels_last(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _same_outputs(expected: Any, got: Any) -> bool:
    expected, got = output_tensors(expected), output_tensors(got)
    return len(expected) == len(got) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()) + 1e-6)
        for a, b in zip(expected, got))


def channels_last_batches(model: nn.Module, batches: Sequence[Batch]) -> list[Batch]:
    """`batches` with their 4-D float tensors in channels-last layout, where `model` computes the same
    on them (probed on one sample); else `batches` as they are.

    fxq's own passes over the calibration batches (equalization's ranges, calibration, the simulation
    walk) spend most of their time in convs, which oneDNN runs faster channels-last, and a conv keeps
    its input's layout for the ops after it. A model may `view` an activation in a way only the
    contiguous layout allows (`x.view(n, -1)` of a feature map), hence the probe. Observers and fxq's
    statistics do not depend on the layout, only on the values, which agree up to summation order.
    """
    converted = [tuple(_channels_last(value) for value in batch) for batch in batches]
    if all(new is old for batch, new_batch in zip(batches, converted) for old, new in zip(batch, new_batch)):
        return list(batches)
    sample = leading_samples(batches[0], 1)
    try:
        with torch.no_grad():
            same = _same_outputs(model(*sample), model(*(_channels_last(value) for value in sample)))
    except Exception:  # noqa: BLE001 - a layout the model's code cannot take: keep the batches as given
        return list(batches)
    return converted if same else list(batches)
