"""onednn's fused conv + residual add (torch.ao's ConvAdd2d), as each runtime can run it in int8.

fxq's int8 model adds the residual to the conv's accumulator before the one requantization
(fxq/backend/conv_add.py). ONNX has no such op. Written exactly, DequantizeLinear -> Conv -> Add ->
QuantizeLinear ("fused", the default), OpenVINO fuses the unit into one int8 convolution with a sum
post-op, as onednn does, and matches fxq's torch model; ONNX Runtime has no int8 conv with a sum and runs
those convs in float (FusedConv), with layout transposes around them. With `conv_add="requantize"`,
the conv's output is rounded to 8 bits first, on a grid chosen here from calibration data, and ONNX
Runtime runs QLinearConv + QLinearAdd everywhere: this is the extra rounding fxq's fusion avoids.
`conv_add="auto"` requantizes too, but keeps the last units before the output fused (at most
AUTO_MAX_FUSED_UNITS) where ONNX Runtime, run on the calibration batches, shows that each brings the
model's outputs closer to fxq's torch model by at least AUTO_MIN_GAIN_DB (choose_fused_tail): little
after those units averages their rounding noise away.

On ImageNet MobileNetV2 (10 such convs) "requantize" costs 0.57 dB of logits SQNR against float in ONNX
Runtime, "fused" nothing; "fused" runs 1.1-1.8x slower than ONNX Runtime's own quantize_static model
there, "requantize" as fast. In OpenVINO both forms run every conv in u8. Figures and machine:
docs/design/onnx-export.md, bench/onnx_runtimes.md.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree  # private, but what fx itself uses to walk nested outputs

from fxq.analysis.metrics import ErrorStats
from fxq.backend.observers import AutoRangeObserver
from fxq.errors import InputError, MissingExtraError
from fxq.export.graph import ExportError

CONV_ADD_FORMS = ("fused", "requantize", "auto")
# "auto" keeps at most this many units fused, the last ones before the output, each only where ONNX Runtime's
# outputs on the calibration batches come at least AUTO_MIN_GAIN_DB closer to the torch model's for it.
# A unit kept fused runs a float conv in ONNX Runtime. On ImageNet MobileNetV2 each of the last two units
# gained 0.36 and 0.34 dB at no measurable cost (960 -> 160 channels at 7x7); on ResNet-50 (random weights)
# the last one gained 0.20 dB and cost 9% at batch 32 (512 -> 2048): the bar lies between the two.
AUTO_MAX_FUSED_UNITS = 2
AUTO_MIN_GAIN_DB = 0.25
CONV_ADD_CLASSES = ("torch.ao.nn.intrinsic.quantized.modules.conv_add.ConvAdd2d",
                    "torch.ao.nn.intrinsic.quantized.modules.conv_add.ConvAddReLU2d")


def _conv_output(module: nn.Module, quantized_input: torch.Tensor) -> torch.Tensor:
    """The fused module's conv output before the add, in float: what the requantized form rounds."""
    if module.padding_mode != "zeros":
        raise ExportError(f"conv + add with padding_mode={module.padding_mode!r}: pass conv_add='fused'")
    return F.conv2d(quantized_input.dequantize(), module.weight().dequantize(), module.bias(), module.stride,
                    module.padding, module.dilation, module.groups)


def conv_output_grids(gm: fx.GraphModule, names: list[str], calibration_batches: Iterable[tuple] | None,
                      run: Any, form: str = "requantize") -> dict[str, tuple[float, int]]:
    """{layer: (scale, zero point)} of the uint8 grid each named conv + add's conv output is rounded to:
    fxq's per-activation range choice (backend.observers.AutoRangeObserver) over the calibration batches.

    `run(batch)` runs the int8 model on one batch (on its own engine).
    """
    if calibration_batches is None:
        raise InputError(f"conv_add={form!r} rounds the output of {len(names)} conv(s) ({', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''}) to 8 bits on a new grid; pass calibration_data "
                         "(the batches the model was calibrated on) to choose it, or keep conv_add='fused'")
    observers = {name: AutoRangeObserver(dtype=torch.quint8) for name in names}

    def observe(module: nn.Module, args: tuple, name: str) -> None:  # returns None: the call's args stay as they are
        observers[name](_conv_output(module, args[0]))

    handles = [gm.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: observe(module, args, name)) for name in names]
    try:
        with torch.no_grad():
            for batch in calibration_batches:
                run(batch)
    finally:
        for handle in handles:
            handle.remove()
    grids = {}
    for name, observer in observers.items():
        scale, zero_point = observer.calculate_qparams()
        grids[name] = (float(scale), int(zero_point))
    return grids


def units_in_graph_order(gm: fx.GraphModule, names: list[str]) -> list[str]:
    """`names` in the order the graph calls them: the last is the unit nearest the output."""
    wanted = set(names)
    return [str(node.target) for node in gm.graph.nodes if node.op == "call_module" and node.target in wanted]


def choose_fused_tail(units: list[str], grids: dict[str, tuple[float, int]], write: Callable[[dict], Any],
                      batches: list[tuple], expected: list[Any], input_names: list[str]
                      ) -> tuple[dict[str, tuple[float, int]], list[str]]:
    """The requantized grids of `conv_add="auto"`: `grids` without the last k of `units` (in graph order),
    k <= AUTO_MAX_FUSED_UNITS chosen by ONNX Runtime's outputs on `batches` against `expected` (the torch
    int8 model's outputs on them). Units are added from the last one while each brings AUTO_MIN_GAIN_DB more;
    the first that does not stops the search.

    `write(grids)` builds the ONNX model; `input_names[i]` is the ONNX input fed by a batch's i-th tensor
    (None: not an input). Returns (grids, the units kept fused).
    """
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError("onnx", "conv_add='auto' (it runs ONNX Runtime)") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    sqnr_by_kept: list[float] = []  # SQNR dB against the torch model with the last k units fused
    best = 0
    for kept in range(min(AUTO_MAX_FUSED_UNITS, len(units)) + 1):
        candidate = {name: grid for name, grid in grids.items() if name not in units[len(units) - kept:]}
        session = onnxruntime.InferenceSession(write(candidate).SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        stats = ErrorStats()
        for batch, reference in zip(batches, expected):
            feeds = {name: value.numpy() for name, value in zip(input_names, batch) if name is not None}
            outputs = session.run(None, feeds)
            # the file returns every tensor output, dequantized; compare the floating-point ones
            references = [leaf.dequantize() if leaf.is_quantized else leaf
                          for leaf in pytree.tree_leaves(reference) if isinstance(leaf, torch.Tensor)]
            for reference_tensor, output in zip(references, outputs, strict=True):
                if reference_tensor.is_floating_point():
                    stats.update(reference_tensor, torch.from_numpy(output))
        sqnr_by_kept.append(stats.sqnr_db)
        if kept and stats.sqnr_db < sqnr_by_kept[kept - 1] + AUTO_MIN_GAIN_DB:
            break
        best = kept
    kept_fused = units[len(units) - best:]
    return {name: grid for name, grid in grids.items() if name not in kept_fused}, kept_fused
