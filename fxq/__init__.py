"""fxq: automatic int8 quantization of PyTorch models through FX graph mode.

    qmodel = fxq.quantize(model, example_inputs, calibration_data=batches)

The public API is re-exported here; everything else is an implementation detail.
"""

from fxq.analysis.sensitivity import SensitivityReport, sensitivity
from fxq.api import Inspection, convert, freeze_bn_stats, freeze_observers, inspect, prepare_qat, quantize
from fxq.calibration import inputs_only
from fxq.config import QuantOptions
from fxq.export import export_onnx
from fxq.report import Report, report
from fxq.errors import (BackendError, CalibrationError, ConfigError, ExportError, FxqError, InputError,
                        MissingExtraError, ReplacedTensorError,
                        SerializationError, TraceError, UnsupportedBackendError)
from fxq.serialize import load, save
from fxq.summary import QuantizationSummary, summary_of

__version__ = "0.1.0"

__all__ = [
    "quantize", "prepare_qat", "convert", "freeze_observers", "freeze_bn_stats", "inspect", "Inspection",
    "sensitivity", "SensitivityReport", "report", "Report", "inputs_only", "save", "load", "summary_of",
    "QuantizationSummary", "QuantOptions", "export_onnx",
    "FxqError", "ConfigError", "InputError", "TraceError", "BackendError", "UnsupportedBackendError",
    "CalibrationError", "SerializationError", "MissingExtraError", "ExportError", "ReplacedTensorError",
]
