"""Other libraries' int8 flows for the comparison rows of bench/accuracy.py (optional extra `compare`).

Every flow takes (float_model, calibration_batches, example) and returns a callable whose output is the
logits; the float model is copied, never changed. torchao and nncf are imported inside the flows so that
this module imports without them (`FLOWS` names the package each flow needs).

    pip install -e '.[compare]'     # torchao, nncf; torch stays at the pinned version
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

Flow = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _pt2e_converted(float_model: nn.Module, calibration_batches: list[torch.Tensor],
                    example: torch.Tensor) -> torch.fx.GraphModule:
    """torch.export, prepare_pt2e with torchao's X86InductorQuantizer default config, calibration,
    convert_pt2e: a graph of float ops between quantize/dequantize ops (the 'reference' form).

    The batch dimension is exported dynamic so that any batch size runs; export is traced on two copies
    of the example because a batch of 1 is specialized to the constant 1 (0/1 specialization).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    traced_on = example.repeat(2, *[1] * (example.dim() - 1))
    exported = torch.export.export(copy.deepcopy(float_model).eval(), (traced_on,),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calibration_batches:
            prepared(batch)
    return convert_pt2e(prepared)


def torchao_pt2e_eager(float_model: nn.Module, calibration_batches: list[torch.Tensor],
                       example: torch.Tensor) -> nn.Module:
    """torchao PT2E, not lowered: the same int8 numerics as the compiled flow, but every quantized op
    runs as dequantize -> float kernel -> quantize, so it is slower than float (shown for that reason)."""
    return _pt2e_converted(float_model, calibration_batches, example)


class FrozenInductor(nn.Module):
    """torch.compile (inductor) of a PT2E-converted graph, each call under inductor's `freezing` option.

    Freezing is what turns the dequantize -> conv -> quantize patterns into oneDNN int8 kernels with
    prepacked weights (torchao registers those patterns as freezing passes). Passing it as
    torch.compile(options={"freezing": True}) fails here with 'UnsupportedOperatorException:
    onednn.qconv_prepack.default', and setting it globally would also freeze every later float
    torch.compile of the process, so it is patched around each call, which covers recompiles for new
    batch sizes too.
    """

    def __init__(self, converted: nn.Module):
        super().__init__()
        self.compiled = torch.compile(converted)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(inputs)


def torchao_pt2e(float_model: nn.Module, calibration_batches: list[torch.Tensor],
                 example: torch.Tensor) -> nn.Module:
    """torchao PT2E with X86InductorQuantizer, lowered by torch.compile (inductor, freezing): the int8
    deployment path torchao documents for x86 CPUs.

    The first call (compilation for the example's shape) happens here, so the caller's quantize time
    includes it; another batch size compiles once more on its first call.
    """
    lowered = FrozenInductor(_pt2e_converted(float_model, calibration_batches, example))
    with torch.no_grad():
        lowered(example)
    return lowered


def nncf_quantize(float_model: nn.Module, calibration_batches: list[torch.Tensor],
                  example: torch.Tensor) -> nn.Module:
    """OpenVINO NNCF's post-training quantization of the torch model (nncf.quantize, default preset:
    MinMax ranges, fast bias correction). The result holds fake-quantize ops around float kernels: torch
    has no int8 CPU kernel for it (int8 speed needs an OpenVINO export), so its latency is fake-quant's.

    The calibration Dataset has one crop per item: NNCF counts items as samples (subset_size, 300 by
    default) and estimates activation ranges from per-sample statistics, so batches of 16 passed as
    items gave a worse model here (11.7 dB, 69.9% agreement against 16.7 dB, 85.2% with single crops).
    """
    import nncf

    crops = [crop[None] for batch in calibration_batches for crop in batch]
    return nncf.quantize(copy.deepcopy(float_model).eval(), nncf.Dataset(crops)).eval()


# row name -> (package it needs, flow)
FLOWS: dict[str, tuple[str, Flow]] = {
    "torchao PT2E X86InductorQuantizer, eager (not lowered)": ("torchao", torchao_pt2e_eager),
    "torchao PT2E X86InductorQuantizer + torch.compile": ("torchao", torchao_pt2e),
    "nncf.quantize default preset (fake-quant)": ("nncf", nncf_quantize),
}
