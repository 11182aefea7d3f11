"""One-file save/load of int8 models: TorchScript, loadable without the user's model code.

The file also carries the int8 engine the model was built for (`torch.backends.quantized.engine` must
match for bit-identical outputs) and fxq's summary as JSON. The same file runs from C++ with
`torch::jit::load(path)` after setting the engine with `at::globalContext().setQEngine(...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxq.backend.engine import available_engines, using_engine
from fxq.backend.serving import serve_loaded
from fxq.calibration import output_tensors
from fxq.errors import SerializationError
from fxq.summary import QuantizationSummary, attach, summary_of

META_FILE = "fxq.json"


def save(model: nn.Module, path: str | os.PathLike, example_inputs: Any = None) -> Path:
    """Script `model` and write it atomically to `path` (no partial file on failure).

    A model whose Python code TorchScript cannot compile (Hugging Face transformers, for one) is traced
    instead when `example_inputs` are given (a tuple, or a dict of keyword inputs): the saved model then
    runs the code path those inputs took, returns its outputs as plain tensors, tuples and dicts, and
    must give the same outputs as `model` on them (else SerializationError).
    """
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
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if example_inputs is None:
            raise SerializationError(f"{type(model).__name__} cannot be scripted for saving: {reason}; pass "
                                     "example_inputs to fxq.save to save it traced") from exc
        scripted = _traced(model, example_inputs, reason)
        meta["saved_as"] = f"traced on the example inputs (scripting failed: {reason[:200]})"
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        torch.jit.save(scripted, temporary, _extra_files={META_FILE: json.dumps(meta)})
        os.replace(temporary, target)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        raise SerializationError(f"cannot save to {target}: {exc}") from exc
    return target


def _traced(model: nn.Module, example_inputs: Any, why_not_scripted: str) -> torch.jit.ScriptModule:
    """`model` traced on `example_inputs`, checked to give the same outputs on them."""
    keywords = dict(example_inputs) if isinstance(example_inputs, Mapping) else None
    positional = None if keywords is not None else (
        example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
    with torch.no_grad():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(model, positional, example_kwarg_inputs=keywords, strict=False,
                                         check_trace=False)
        except Exception as exc:
            raise SerializationError(f"{type(model).__name__} can be neither scripted ({why_not_scripted}) nor traced "
                                     f"for saving: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from exc
        expected = output_tensors(model(**keywords) if keywords is not None else model(*positional))
        actual = output_tensors(traced(**keywords) if keywords is not None else traced(*positional))
    if len(expected) != len(actual) or any(not torch.equal(e, a) for e, a in zip(expected, actual)):
        raise SerializationError(f"{type(model).__name__}: its traced form gives other outputs than the model on the "
                                 "example inputs (its forward branches on values); it cannot be saved faithfully")
    return traced


def _read_meta(source: Path) -> dict:
    """fxq's metadata from a saved file, read before the model is (TorchScript files are zip archives)."""
    try:
        with zipfile.ZipFile(source) as archive:
            names = [n for n in archive.namelist() if n.split("/", 1)[-1] == f"extra/{META_FILE}"]
            return json.loads(archive.read(names[0])) if names else {}
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError) as exc:
        raise SerializationError(f"{source} is not a model saved by fxq.save: {exc}") from exc


def load(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a model saved by `fxq.save` under the int8 engine it was built for, and leave that engine set.

    The engine must be current while loading, not only when running: loading packs the int8 weights for
    the current engine, and weights packed for another engine give different outputs (measured: a model
    built for x86 and loaded under qnnpack differs by up to 4e-3). If this CPU does not support the
    file's engine, the model is loaded under the current one, with a warning and a note in its summary.
    Each input shape the model is called with runs a copy of it with its own packed weights
    (backend.serving.serve_loaded), so it serves any mix of batch sizes at each size's speed.
    """
    source = Path(path)
    if not source.is_file():
        raise SerializationError(f"no saved model at {source}")
    meta = _read_meta(source)
    engine = meta.get("engine") or torch.backends.quantized.engine
    note = None
    if engine not in available_engines():
        note = (f"built for the '{engine}' int8 engine, which this CPU does not support (supported: "
                f"{', '.join(available_engines()) or 'none'}); it runs on '{torch.backends.quantized.engine}' "
                "and its outputs may differ from those measured when it was quantized; re-quantize on this "
                "machine for a faithful model")
        warnings.warn(f"{source}: {note}", RuntimeWarning, stacklevel=2)
        engine = torch.backends.quantized.engine
    try:
        with using_engine(engine):
            module = torch.jit.load(str(source), map_location="cpu")
    except Exception as exc:
        raise SerializationError(f"{source} is not a model saved by fxq.save: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from exc
    torch.backends.quantized.engine = engine
    serve_loaded(module, engine)
    if meta.get("summary"):
        fields = {field.name for field in dataclasses.fields(QuantizationSummary)}
        summary = QuantizationSummary(**{key: value for key, value in meta["summary"].items() if key in fields})
        unknown = sorted(set(meta["summary"]) - fields)
        if unknown:  # written by another fxq version; the model itself loads the same
            summary.notes.append(f"summary fields this fxq version does not know were left out: {', '.join(unknown)}")
        if note:
            summary.notes.append(note)
        attach(module, summary)
    return module
