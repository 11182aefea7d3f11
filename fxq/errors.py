"""fxq's exceptions: each names the offending module, node or option and says what to do."""

from __future__ import annotations


class FxqError(Exception):
    """Base class of every error fxq raises on purpose."""


class ConfigError(FxqError, ValueError):
    """An option has a value fxq does not know; the message lists the valid ones."""


class InputError(FxqError, ValueError):
    """The model, example inputs or calibration data cannot be used as given."""


class TraceError(FxqError):
    """Symbolic tracing failed at a module fxq could not isolate as a float leaf."""


class BackendError(FxqError):
    """The quantization engine rejected the model or the backend is unavailable on this CPU."""


class CalibrationError(FxqError):
    """Calibration data produced unusable values (empty, non-finite, mis-shaped)."""


class SerializationError(FxqError):
    """Saving or loading a quantized model failed."""


class MissingExtraError(FxqError, ImportError):
    """An optional dependency is needed for this feature."""

    def __init__(self, package: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs the optional package '{package}'; install it with pip")
