"""Other runtimes' formats for fxq's int8 models (optional extra `fxq[onnx]`).

    fxq.export_onnx(int8_model, "model.onnx", example_inputs)

writes a standard ONNX QDQ model (uint8 activations, int8 per-channel weights) that ONNX Runtime and
OpenVINO run with their int8 kernels. Design and measurements: docs/design/onnx-export.md.
"""

from fxq.errors import ExportError
from fxq.export.onnx_qdq import export_onnx

__all__ = ["ExportError", "export_onnx"]
