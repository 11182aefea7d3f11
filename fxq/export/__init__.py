"""Other runtimes' formats for fxq's int8 models (optional extra `fxq[onnx]`).

    fxq.export_onnx(int8_model, "model.onnx", example_inputs)

writes a standard ONNX QDQ model that ONNX Runtime, OpenVINO and TensorRT run with their int8 kernels.
"""

from fxq.export.graph import ExportError
from fxq.export.onnx_qdq import export_onnx

__all__ = ["export_onnx", "ExportError"]
