"""How a model fxq quantized by regions or module swaps runs when called: through a trace per input signature.

A model whose own forward does not FX-trace (Hugging Face transformers, Python loops over layers) comes back
as the user's module with int8 parts swapped in, and its Python code runs between the kernels on every call:
mask building, reshapes, the attention function's dispatch, each submodule's `__call__`. At batch 1 that code
costs as much as the int8 Linears save. `torch.jit.trace` records the ops one call ran, on the same modules,
packed weights and parameters, and replays them without the Python.

A trace records one path through the Python code: the shapes, branches and constants of the call it saw. So
each input signature (positions and names of the arguments, tensor shapes and dtypes, the values of
non-tensor arguments) gets its own trace, made on the first call with that signature (which runs the Python
forward as well). The trace serves later calls only if
- it gives the Python forward's outputs bit for bit on that first call, and
- a second trace, of the same call with its tensors changed in value (rolled along the last dimension, floats
  negated), records the same graph: code that branches on tensor values records another one.
A signature that fails either check, or any beyond MAX_TRACES, runs the Python forward. So does every call
with hooks, grad or training mode, or under tracing and compiling (backend.serving.ModuleTreeState). After a
submodule, a parameter or an int8 weight of the model was replaced or changed in place, the traces are
dropped and made again.

onednn caches its int8 kernel for the first input shape a packed weight sees and rebuilds it on every call of
another shape (a dynamic 384 -> 1536 Linear on 64 tokens: 71 us, 131 us after a 16 x 64 call). The model's
own packed weights have run the calibration batches' shape, so every signature, the first included, runs a
copy of its trace whose weights are packed afresh (as backend.serving does per shape).
"""

from __future__ import annotations

import copy
import inspect
import operator
import re
import threading
import warnings
from itertools import chain
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxq.backend.engine import using_engine
from fxq.backend.serving import ModuleTreeState, same_values

__all__ = ["MAX_TRACES", "TracedForward", "serve_traced", "traced_forward_of"]

# Traces kept per model, one per input signature; calls of further signatures run the Python forward.
MAX_TRACES = 8

_CONSTANT_TYPES = (type(None), bool, int, float, str)
_MANGLED = re.compile(r"___torch_mangle_\d+\.")
_NO_TRACE = object()  # a signature whose trace failed a check
_TENSOR = object()  # an argument the trace takes as an input


def _signature_of(args: tuple, kwargs: dict) -> tuple | None:
    """The key of a call's trace: per argument its shape and dtype (tensors) or value (None, bool, int,
    float, str), keyword names in order; None for a call no trace can stand for."""
    key: list[Any] = []
    for name, value in chain(enumerate(args), kwargs.items()):
        if type(value) is torch.Tensor:
            if value.requires_grad and torch.is_grad_enabled():
                return None
            key.append((name, value.shape, value.dtype, value.device))
        elif type(value) in _CONSTANT_TYPES:
            key.append((name, type(value), value))
        else:
            return None
    return tuple(key)


class _Call(nn.Module):
    """The model called with one signature's tensors as positional inputs, its outputs as a flat tuple (what
    torch.jit.trace records)."""

    def __init__(self, model: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.model = model
        self.forward_of_model = forward
        # per argument: its position or name, and its value if not a tensor (the trace's inputs stand for those)
        self.positions = [(name, _TENSOR if type(value) is torch.Tensor else value)
                          for name, value in chain(enumerate(args), kwargs.items())]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = iter(tensors)
        values = {name: next(given) if value is _TENSOR else value for name, value in self.positions}
        args = [value for name, value in values.items() if isinstance(name, int)]
        kwargs = {name: value for name, value in values.items() if not isinstance(name, int)}
        return tuple(pytree.tree_leaves(self.forward_of_model(*args, **kwargs)))


def _tensors(args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    return tuple(value for value in chain(args, kwargs.values()) if type(value) is torch.Tensor)


def _changed_in_value(tensor: torch.Tensor) -> torch.Tensor:
    """The same shape and dtype with other values: rolled along the last dimension (integer ids and masks
    stay valid), floats also negated."""
    changed = tensor.roll(1, -1) if tensor.dim() else tensor.clone()
    return -changed if changed.is_floating_point() else changed


def _trace(call: _Call, tensors: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic; the checks below decide
        return torch.jit.trace(call, tensors, strict=False, check_trace=False)


def _graph_text(traced: torch.jit.ScriptModule) -> str:
    return _MANGLED.sub("", str(traced.inlined_graph))


class TracedForward:
    """Installed as the model's `forward` (an instance attribute): runs the trace of the call's input signature
    when that is the same computation, the class's Python forward otherwise."""

    def __init__(self, model: nn.Module, engine: str) -> None:
        self.model = model
        self.engine = engine
        self.python_forward = type(model).forward.__get__(model)
        self.__signature__ = inspect.signature(self.python_forward)  # torch.jit.trace and users read it
        self.state: _TracedState | None = None  # taken at the first call (a copy is built before its model)
        self.traces: dict[tuple, Any] = {}  # signature -> (trace, output structure) or _NO_TRACE
        self.refusals: dict[tuple, str] = {}
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = _signature_of(args, kwargs)
        if signature is None:
            return self.python_forward(*args, **kwargs)
        if self.state is None or not self.state.same_model():
            self._start_afresh()  # the traces hold modules, tensors or values the model no longer has
        if not self.state.plain_call():
            return self.python_forward(*args, **kwargs)
        served = self.traces.get(signature)
        if served is None:
            return self._first_call(signature, args, kwargs)
        if served is _NO_TRACE:
            return self.python_forward(*args, **kwargs)
        traced, structure = served
        return pytree.tree_unflatten(list(traced(*_tensors(args, kwargs))), structure)

    def _start_afresh(self) -> None:
        with self.lock:
            self.state = _TracedState(self.model)
            self.traces, self.refusals = {}, {}

    def _first_call(self, signature: tuple, args: tuple, kwargs: dict) -> Any:
        """Run the Python forward, and trace this signature for the next calls if the trace is faithful."""
        with self.lock:
            if signature in self.traces or len(self.traces) >= MAX_TRACES:
                return self.python_forward(*args, **kwargs)
            self.traces[signature] = _NO_TRACE  # until checked; a failing check leaves it so
            expected = self.python_forward(*args, **kwargs)
            why_not = self._try_trace(signature, args, kwargs, expected)
            if why_not:
                self.refusals[signature] = why_not
            return expected

    def _try_trace(self, signature: tuple, args: tuple, kwargs: dict, expected: Any) -> str:
        """Trace the call and keep the trace if both checks pass; else why not."""
        leaves, structure = pytree.tree_flatten(expected)
        if not all(type(leaf) is torch.Tensor for leaf in leaves):
            return "its outputs are not all tensors"
        call = _Call(self.model, self.python_forward, args, kwargs)
        tensors = _tensors(args, kwargs)
        try:
            traced = _trace(call, tensors)
            retraced = _trace(call, tuple(map(_changed_in_value, tensors)))
            with using_engine(self.engine):  # its own packed weights (module docstring)
                traced = copy.deepcopy(traced)
            with torch.no_grad():
                actual = traced(*tensors)
        except Exception as exc:  # the tracer's errors name the code it cannot record
            return f"torch.jit.trace fails on it ({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]})"
        if len(actual) != len(leaves) or not all(map(_equal, leaves, actual)):
            return "its trace gives other outputs than the Python forward"
        if _graph_text(traced) != _graph_text(retraced):
            return "its forward takes another path for other input values"
        self.traces[signature] = (traced, structure)
        return ""

    def __reduce__(self) -> tuple:
        # a copy of the model (deepcopy, pickle) traces afresh: its traces would hold the original's modules
        return (TracedForward, (self.model, self.engine))


class _TracedState(ModuleTreeState):
    """ModuleTreeState plus the model's parameters and buffers as they were, objects and version counters:
    traces hold the tensors they saw (and copies of them), so a replaced or changed one means tracing afresh."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__(root)
        self.tensor_dicts = [d for m in self.modules for d in (m._parameters, m._buffers) if d]
        self.tensors = list(chain.from_iterable(map(dict.values, self.tensor_dicts)))  # None for an absent bias
        self.present = [tensor for tensor in self.tensors if tensor is not None]
        self.versions = list(map(_VERSION, self.present))

    def same_model(self) -> bool:
        return (self.same_tree() and same_values(self.tensor_dicts, self.tensors)
                and list(map(_VERSION, self.present)) == self.versions)


_VERSION = operator.attrgetter("_version")


def _equal(expected: torch.Tensor, actual: torch.Tensor) -> bool:
    return expected.shape == actual.shape and expected.dtype == actual.dtype and torch.equal(expected, actual)


def serve_traced(model: nn.Module, example_inputs: tuple, engine: str) -> str:
    """Make calls of `model` run a trace per input signature (module docstring), after checking that the example
    inputs' trace passes. Returns a line for the summary saying how the model runs."""
    served = TracedForward(model, engine)
    with torch.no_grad():
        served(*example_inputs)
    refused = served.refusals.get(_signature_of(example_inputs, {}))
    if refused:
        return f"the returned module runs its Python forward: {refused}"
    model.__dict__["forward"] = served
    return ("the returned module runs a trace of its forward per input signature (shapes, dtypes, argument names), "
            f"made on the first call with it and checked against the Python forward, for up to {MAX_TRACES} "
            "signatures (fxq.quantize(..., serve_traced=False) keeps the Python forward)")


def traced_forward_of(model: nn.Module) -> TracedForward | None:
    """The traced forward installed on `model` by serve_traced, if any."""
    served = model.__dict__.get("forward")
    return served if isinstance(served, TracedForward) else None
