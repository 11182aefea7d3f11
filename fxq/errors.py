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


class ReplacedTensorError(FxqError, AttributeError):
    """The model's own code used the values of a parameter or buffer of a part fxq replaced by its int8
    version (only its dtype, device and shape are kept). An AttributeError too, as the attribute is gone."""


class BackendError(FxqError):
    """The quantization engine rejected the model or the backend is unavailable on this CPU."""


class UnsupportedBackendError(BackendError, ConfigError):
    """The backend is a valid name, but this CPU or PyTorch build cannot run its int8 kernels.

    Both a BackendError (the engine is unavailable) and a ConfigError (the user's `backend=` option cannot
    be honoured here), so either `except` clause catches it.
    """

    def __init__(self, backend: str, supported: list[str], machine: str) -> None:
        self.backend, self.supported, self.machine = backend, list(supported), machine
        choices = " or ".join(f"backend='{name}'" for name in supported)
        if not supported:
            advice = ("this PyTorch build has no int8 engine on this CPU; install an official CPU build of torch "
                      "(it ships x86/fbgemm, onednn and qnnpack)")
        elif backend == "auto":
            advice = f"none of them is one backend='auto' picks on this CPU; pass {choices}"
        else:
            advice = f"pass backend='auto' (picks the best engine supported here) or {choices}"
        super().__init__(f"backend='{backend}' is not supported on this CPU ({machine}): "
                         f"torch.backends.quantized.supported_engines lists "
                         f"{', '.join(supported) if supported else 'none'}; {advice}")

    def __reduce__(self):  # rebuilt from its fields when it crosses a process boundary (DataLoader, DDP)
        return type(self), (self.backend, self.supported, self.machine)


class CalibrationError(FxqError):
    """Calibration data produced unusable values (empty, non-finite, mis-shaped)."""


class SerializationError(FxqError):
    """Saving or loading a quantized model failed."""


class MissingExtraError(FxqError, ImportError):
    """An optional dependency is needed for this feature."""

    def __init__(self, package: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs the optional package '{package}'; install it with pip")


class ExportError(FxqError):
    """The int8 model holds something the ONNX export cannot write faithfully; the message names it."""
