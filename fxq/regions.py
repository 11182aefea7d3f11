"""Models whose own forward does not trace: quantize the traceable submodules as regions.

Detection models loop over images or branch on data in their top-level forward, and some blocks branch
on data inside (a gate). Each traceable submodule is quantized on its own, calibrated on the arguments it
receives when the float model runs the calibration batches, and put back under its own name; the code
around the regions runs in float, and the summary says so. What that code reads of a part stays readable
on its int8 replacement: plain attributes, and the dtype, device and shape of the part's own weights.

The quantization of one part is the pipeline's, passed in as `quantize_part`, so this module sits below
the pipeline and never imports it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from fxq.calibration import Batch, check_float_outputs, few_samples_note, materialize
from fxq.config import QuantOptions, key_covers
from fxq.errors import FxqError, ReplacedTensorError, TraceError
from fxq.frontend.graph import replace_module
from fxq.frontend.trace import FloatLeaf, find_regions
from fxq.summary import QuantizationSummary, summary_of
from fxq.summary.assembly import regions_summary

# quantize_part(module, example arguments, calibration batches, options) -> its int8 module (with a summary)
QuantizePart = Callable[[nn.Module, Batch, list[Batch], QuantOptions], nn.Module]
# work_on_part(name, module, example arguments) -> whatever the caller builds for that part
WorkOnPart = Callable[[str, nn.Module, Batch], Any]


def capture_calls(work: nn.Module, parts: list[str], runs: list[Batch]) -> dict[str, list[list[tuple | None]]]:
    """Per part, per run: the positional arguments of each call (None for a call with keywords)."""
    calls: dict[str, list[list[tuple | None]]] = {name: [] for name in parts}
    handles = []
    for name in parts:
        def record(_module, args, kwargs, name=name):
            calls[name][-1].append(None if kwargs else tuple(args))
        handles.append(work.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            for run in runs:
                for name in parts:
                    calls[name].append([])
                work(*run)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def quantize_parts(work: nn.Module, target: nn.Module, parts: list[str], around: list[FloatLeaf],
                   runs: list[Batch], options: QuantOptions,
                   quantize_part: QuantizePart) -> dict[str, QuantizationSummary]:
    """Quantize each named traceable part of the float model `work` on the arguments it receives when
    `work` runs `runs` (the first run is the example), and put the int8 part into `target` under the same
    name. Parts that cannot be quantized are added to `around` with the reason."""
    calls = capture_calls(work, parts, runs)
    summaries = {}
    for name in parts:
        if key_covers(options.keep_float, name, work.get_submodule(name)):
            around.append(FloatLeaf(name, "keep_float"))
            continue
        example_calls = calls[name][0]
        part_batches = [args for run in calls[name][1:] for args in run]
        if not example_calls or None in example_calls or None in part_batches:
            around.append(FloatLeaf(name, "not called, or called with keyword arguments, on the example inputs"))
            continue
        try:
            quantized = quantize_part(work.get_submodule(name), example_calls[0], part_batches,
                                      options.scoped_to(name))
        except FxqError as failure:
            around.append(FloatLeaf(name, f"not quantized: {failure}"[:300]))
            continue
        keep_plain_attributes(work.get_submodule(name), quantized, name)
        summaries[name] = summary_of(quantized)
        options = options.replace(backend=summaries[name].engine)  # every part on the first one's engine
        replace_module(target, name, quantized)
    return summaries


def keep_plain_attributes(original: nn.Module, quantized: nn.Module, name: str = "") -> None:
    """Copy the plain attributes the model's own Python code may read from a part (ultralytics' layer loop
    reads `m.f`, `m.i`, `m.type` of each layer) onto its int8 replacement, and describe each of the part's
    own parameters and buffers the replacement lacks by a `FloatTensorDescription` (Hugging Face's ViTModel
    reads `patch_embeddings.projection.weight.dtype` to cast its input), so that they also survive a deep
    copy of a GraphModule (which keeps only what its meta's preserved-attributes entry names; torch.ao's
    `set_preserved_attributes` uses the same entry). `name` is the part's name in the model."""
    kept = {key: value for key, value in vars(original).items()
            if not key.startswith("_") and not hasattr(quantized, key)}
    tensors = [*original.named_parameters(recurse=False), *original.named_buffers(recurse=False)]
    kept.update({key: FloatTensorDescription(tensor, name or f"a {type(original).__name__}", key)
                 for key, tensor in tensors
                 if tensor is not None and not key.startswith("_") and not hasattr(quantized, key)})
    for key, value in kept.items():
        setattr(quantized, key, value)
    if kept and isinstance(quantized, fx.GraphModule):
        quantized.meta.setdefault(_PRESERVED_ATTRIBUTES, {}).update(kept)


class FloatTensorDescription:
    """What a float model's own code may still read of a parameter or buffer of a part that fxq replaced
    by its int8 version: dtype, device, shape. The values are not kept (the int8 part holds its own
    weights); code that uses them (`.data`, arithmetic, a torch function) gets a ReplacedTensorError
    naming the part, never numbers that differ from the float model's."""

    def __init__(self, tensor: torch.Tensor, part: str, attribute: str) -> None:
        self.dtype, self.device, self.shape = tensor.dtype, tensor.device, tensor.shape
        self.requires_grad, self.part, self.attribute = tensor.requires_grad, part, attribute

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def _unavailable(self, use: str) -> ReplacedTensorError:
        return ReplacedTensorError(
            f"{self.part}: the model's own code uses {use} of the module's float '{self.attribute}' "
            f"{tuple(self.shape)}, but fxq quantized the module on its own (the code around it does not trace) "
            "and its int8 version keeps only the dtype, device and shape of that tensor")

    def _arithmetic(self, *_other: Any) -> Any:
        raise self._unavailable("the values (in arithmetic or indexing)")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _arithmetic
    __matmul__ = __rmatmul__ = __pow__ = __neg__ = __getitem__ = __iter__ = _arithmetic

    def __getattr__(self, attribute: str) -> Any:  # only called for what the instance lacks
        if attribute.startswith("__") or attribute in ("part", "attribute"):  # copy/pickle protocol lookups
            raise AttributeError(attribute)
        raise self._unavailable(f"'.{attribute}'")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        use = f"the values (in {getattr(func, '__name__', func)})"
        given = [*args, *(kwargs or {}).values()]
        given += [item for value in given if isinstance(value, (list, tuple)) for item in value]  # torch.cat
        described = [value for value in given if isinstance(value, cls)]
        if not described:
            raise ReplacedTensorError(f"{use}: a parameter of a module fxq replaced by its int8 version")
        raise described[0]._unavailable(use)

    def __repr__(self) -> str:
        return (f"FloatTensorDescription({self.part}.{self.attribute}: {self.dtype}, {tuple(self.shape)}, "
                f"{self.device}; values not kept)")


# The GraphModule.meta key whose attributes GraphModule.__deepcopy__ sets again on the copy.
_PRESERVED_ATTRIBUTES = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


def quantize_regions(work: nn.Module, example_inputs: Batch, calibration_data: Iterable[Any] | None,
                     options: QuantOptions, error: TraceError, timings_s: dict[str, float],
                     quantize_part: QuantizePart) -> tuple[nn.Module, QuantizationSummary]:
    """Quantize each traceable submodule of `work` (whose own forward raised `error` when traced), in
    place, and return it with the merged summary. Raises `error` when nothing inside traces either."""
    reason = str(error.__cause__ or error).splitlines()[0][:200]
    regions, around = find_regions(work, reason)
    if not regions:
        raise error
    batches = materialize(calibration_data, example_inputs, options.max_calibration_batches)
    check_float_outputs(work, batches)
    summaries = quantize_parts(work, work, regions, around, [example_inputs] + batches, options, quantize_part)
    note = (f"{type(work).__name__}.forward does not trace ({reason}); quantized separately: "
            f"{', '.join(summaries) or 'nothing'}")
    summary = regions_summary(options, work, around, summaries, timings_s, note)
    summary.notes += [few] if (few := few_samples_note(batches)) else []
    return work, summary


def quantize_inside_leaves(work: nn.Module, quantized: nn.Module, leaves: list[FloatLeaf], runs: list[Batch],
                           options: QuantOptions, quantize_part: QuantizePart
                           ) -> tuple[list[FloatLeaf], dict[str, QuantizationSummary]]:
    """The traceable parts inside untraceable leaves (Gate.conv of a Gate whose forward branches on data),
    quantized on their own and put into the int8 model's leaves. Returns every untraceable module (leaves
    and the untraceable modules inside them) and the parts' summaries."""
    around: list[FloatLeaf] = []
    parts: list[str] = []
    for leaf in leaves:
        regions, inner = find_regions(work.get_submodule(leaf.module), leaf.reason)
        parts += [f"{leaf.module}.{region}" for region in regions]
        around += [FloatLeaf(f"{leaf.module}.{i.module}" if i.module else leaf.module, i.reason) for i in inner]
    summaries = quantize_parts(work, quantized, parts, around, runs, options, quantize_part) if parts else {}
    return around, summaries


def for_each_region(work: nn.Module, example_inputs: Batch, error: TraceError,
                    work_on_part: WorkOnPart) -> tuple[dict[str, Any], list[FloatLeaf]]:
    """`work_on_part` on each traceable region of `work` (whose own forward raised `error`), given the
    arguments the region receives when `work` runs the example inputs: the other modes' way through a
    model quantize handles with `quantize_regions` (QAT prepares each region, inspect lists its patterns).
    Returns the results by region and the untraceable modules around them. Raises `error` when nothing
    inside traces either."""
    reason = str(error.__cause__ or error).splitlines()[0][:200]
    regions, around = find_regions(work, reason)
    if not regions:
        raise error
    calls = capture_calls(work, regions, [example_inputs])
    results = {}
    for name in regions:
        first = calls[name][0][0] if calls[name][0] else None
        if first is None:
            around.append(FloatLeaf(name, "not called, or called with keyword arguments, on the example inputs"))
            continue
        results[name] = work_on_part(name, work.get_submodule(name), first)
    return results, around
