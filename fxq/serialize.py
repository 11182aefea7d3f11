"""One-file save/load of int8 models: TorchScript, loadable without the user's model code.

The file also carries the int8 engine the model was built for (`torch.backends.quantized.engine` must
match for bit-identical outputs) and fxq's summary as JSON. The same file runs from C++ with
`torch::jit::load(path)` after setting the engine with `at::globalContext().setQEngine(...)`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from fxq.errors import SerializationError
from fxq.summary import QuantizationSummary, attach, summary_of

META_FILE = "fxq.json"


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Script `model` and write it atomically to `path` (no partial file on failure)."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise SerializationError(f"cannot save to {target}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise SerializationError(f"cannot save to {target}: directory {directory} is not writable")
    summary = summary_of(model)
    engine = summary.engine if summary else torch.backends.quantized.engine
    meta = {"format": 1, "engine": engine, "summary": summary.to_dict() if summary else None}
    try:
        scripted = torch.jit.script(model.eval())
    except Exception as exc:  # scripting failures name the offending code
        raise SerializationError(f"{type(model).__name__} cannot be scripted for saving: "
                                 f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from exc
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        torch.jit.save(scripted, temporary, _extra_files={META_FILE: json.dumps(meta)})
        os.replace(temporary, target)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        raise SerializationError(f"cannot save to {target}: {exc}") from exc
    return target


def load(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a model saved by `fxq.save`; sets the int8 engine it was built for."""
    source = Path(path)
    if not source.is_file():
        raise SerializationError(f"no saved model at {source}")
    extra = {META_FILE: ""}
    try:
        module = torch.jit.load(str(source), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise SerializationError(f"{source} is not a model saved by fxq.save: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from exc
    meta = json.loads(extra[META_FILE]) if extra[META_FILE] else {}
    engine = meta.get("engine")
    if engine and engine in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = engine
    if meta.get("summary"):
        attach(module, QuantizationSummary(**meta["summary"]))
    return module
