"""How the returned int8 GraphModule runs when called: through its TorchScript form, one packed copy per shape.

Two costs the int8 kernels do not need:
- At batch 1 the Python GraphModule's per-op dispatch (each module's __call__, the Python forward of every
  torch.ao quantized module, the op-overload checks) costs as much as the kernels' work; the TorchScript form
  of the same graph runs the same kernels on the same packed weights without it.
- onednn (and x86, which hands convs to onednn on VNNI CPUs) caches its kernel for the first input shape a
  packed weight sees and rebuilds it on every call of any other shape. A model that serves several batch sizes
  gets a copy of its TorchScript form per input shape (copying packs the weights afresh), each on its cached
  kernel. After MAX_SHAPE_COPIES shapes, further shapes share the first copy, as any torch int8 model does.

A model loaded with `fxq.load` (one TorchScript module) gets the same copies per shape (serve_loaded).

The user still holds the GraphModule: `summary_of`, `fxq.save`, `.graph`, hooks all work. Its Python forward
runs whenever the TorchScript form could differ from it: under tracing or compiling, with forward hooks on the
model or any submodule (or global ones), after the graph was recompiled, a submodule replaced or a packed
weight set, with keyword or non-tensor arguments, or with inputs that require grad.
"""

from __future__ import annotations

import copy
import operator
import threading
from itertools import chain
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.nn.modules import module as module_globals

from fxq.backend.engine import using_engine

__all__ = ["MAX_SHAPE_COPIES", "CallState", "ModuleTreeState", "same_values", "PerShapeCopies", "ScriptedForward",
           "serve_scripted", "scripted_forward_of", "LoadedForward", "serve_loaded", "loaded_forward_of"]

# Copies of the TorchScript form kept per distinct input shape (each holds its own packed weights).
MAX_SHAPE_COPIES = 8

_CALL_SLOT = "_wrapped_call"  # GraphModule.__call__ dispatches through self._wrapped_call(self, ...)


def _packed_weights(module: nn.Module) -> Any:
    """A layer's packed int8 weight (torch.ao keeps it as a plain attribute), or None."""
    return module.__dict__.get("_packed_params")


_PACKED = operator.attrgetter("_packed_params")


class CallState:
    """Whether a call of a module tree may run a copy made of it: no hooks, nothing tracing or compiling the
    call, the training flags as they were. The check runs on every call, so it is flattened into C-level
    loops (a few us for MobileNetV2's 150 modules)."""

    def __init__(self, root: nn.Module) -> None:
        modules = list(root.modules())
        self.modules = modules
        self.hook_dicts = [hooks for m in modules for hooks in (m._forward_hooks, m._forward_pre_hooks)]
        self.training = [m.training for m in modules]

    def unchanged(self) -> bool:
        return self.plain_call()

    def plain_call(self) -> bool:
        """No hooks, no tracing or compiling, the training flags as they were: a call the form can stand for."""
        return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or any(self.hook_dicts)
                    or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
                    or list(map(_TRAINING, self.modules)) != self.training)


class ModuleTreeState(CallState):
    """What a compiled form (TorchScript, a trace) of a Python module tree was made from, and whether calls
    may run it: CallState's conditions, and the tree's submodules and int8 packed weights as they were."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__(root)
        self.children_dicts = [m._modules for m in self.modules if m._modules]
        self.children = list(chain.from_iterable(map(dict.values, self.children_dicts)))
        self.packed_owners = [m for m in self.modules if _packed_weights(m) is not None]
        self.packed = list(map(_PACKED, self.packed_owners))

    def unchanged(self) -> bool:
        return self.plain_call() and self.same_tree()

    def same_tree(self) -> bool:
        """The same submodules and packed int8 weights as when the form was made."""
        return (same_values(self.children_dicts, self.children)
                and all(map(operator.is_, map(_PACKED, self.packed_owners), self.packed)))


def same_values(dicts: list[dict], snapshot: list[Any]) -> bool:
    """Whether `dicts` still hold exactly the objects of `snapshot` (their values, in order, when it was taken)."""
    return (sum(map(len, dicts)) == len(snapshot)
            and all(map(operator.is_, chain.from_iterable(map(dict.values, dicts)), snapshot)))


_TRAINING = operator.attrgetter("training")


class PerShapeCopies:
    """Deep copies of a TorchScript module, one per input shape, made on the first call of each shape under
    the engine the model was built for (a copy packs its weights afresh, so each caches its own kernels);
    past MAX_SHAPE_COPIES shapes, the first copy serves the rest."""

    def __init__(self, scripted: torch.jit.ScriptModule, engine: str) -> None:
        self.scripted = scripted
        self.engine = engine
        self.copies: dict[tuple, torch.jit.ScriptModule] = {}  # by input shapes, in the order first seen
        self.lock = threading.Lock()

    def _copy_for(self, shape: tuple) -> torch.jit.ScriptModule:
        copy_for_shape = self.copies.get(shape)
        if copy_for_shape is not None:
            return copy_for_shape
        with self.lock:
            if shape not in self.copies:
                if len(self.copies) >= MAX_SHAPE_COPIES:
                    return next(iter(self.copies.values()))
                with using_engine(self.engine):  # a copy's weights are packed afresh
                    self.copies[shape] = copy.deepcopy(self.scripted)
            return self.copies[shape]


class ScriptedForward(PerShapeCopies):
    """Callable installed as a GraphModule's `_wrapped_call`: runs the TorchScript copy for the call's input
    shapes when that is the same computation, the GraphModule's own Python forward otherwise.

    `scripted` itself serves no shape: it shares its packed weights with the GraphModule's modules, whose
    Python forward ran the calibration batches (and runs any call with hooks), so their kernels are cached
    for those shapes. Served at batch 1 after calibrating on batches of 4, it rebuilt its kernels on every
    call: timm's mnasnet_100 took 29.5 ms instead of 2.7."""

    def __init__(self, graph_module: fx.GraphModule, scripted: torch.jit.ScriptModule, engine: str,
                 python_call: Callable[..., Any]):
        super().__init__(scripted, engine)
        self.python_call = python_call
        self.code = graph_module.code
        self.state = ModuleTreeState(graph_module)
        # TorchScript returns a dict for an OrderedDict and a tuple for a namedtuple: the Python type back
        self.output_type: Callable[[Any], Any] = _unchanged

    def __call__(self, graph_module: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        if kwargs or not self._runs_same_computation(graph_module, args):
            return self.python_call(graph_module, *args, **kwargs)
        return self.output_type(self._copy_for(_shapes(args))(*args))

    def _runs_same_computation(self, graph_module: fx.GraphModule, args: tuple) -> bool:
        return _plain_tensors(args) and graph_module.code == self.code and self.state.unchanged()

    def __deepcopy__(self, memo: dict) -> None:
        # GraphModule's deepcopy rebuilds the module from its graph and drops this slot; copying the
        # TorchScript copies first would only cost time and memory
        return None

    def __reduce__(self) -> tuple:
        return (type(None), ())  # pickling a GraphModule rebuilds it from code; this slot is not kept


class LoadedForward(PerShapeCopies):
    """Callable installed as a loaded TorchScript module's `_compiled_call_impl` (what nn.Module's __call__
    runs in place of its own dispatch when set): each input shape runs a copy of the module with its own
    packed weights, as the returned GraphModule does. Calls with keyword or non-tensor arguments, inputs
    that require grad, tracing or compiling, or a training flag changed since loading run the module itself
    (TorchScript modules take no Python hooks, and their submodules cannot be swapped). A deep copy of the
    module is a plain TorchScript module (the slot is not copied)."""

    def __init__(self, module: torch.jit.ScriptModule, engine: str) -> None:
        super().__init__(module, engine)
        self.state = CallState(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.scripted
        if kwargs or not _plain_tensors(args) or not self.state.unchanged():
            return module._call_impl(*args, **kwargs)
        return self._copy_for(_shapes(args))(*args)


def serve_loaded(module: torch.jit.ScriptModule, engine: str) -> None:
    """Make calls of a loaded TorchScript int8 model run one copy per input shape (LoadedForward): onednn and
    x86 keep the kernel each packed weight built for its first input shape, and a loaded MobileNetV2 that
    had served batch 32 ran batch 1 in 6.7 ms against 3.4 ms for one that had not."""
    module._compiled_call_impl = LoadedForward(module, engine)


def _plain_tensors(args: tuple) -> bool:
    """Every argument a plain tensor, none needing grad where grad is on."""
    grad = torch.is_grad_enabled()
    return all(type(arg) is torch.Tensor and not (grad and arg.requires_grad) for arg in args)


def serve_scripted(graph_module: fx.GraphModule, example_inputs: tuple, engine: str) -> str:
    """Make calls of `graph_module` run its TorchScript form (module docstring). Returns a line for the
    summary saying how the model runs; scripting that fails, or that does not give bit-identical outputs on
    `example_inputs`, leaves the Python forward in place and says why."""
    try:
        with using_engine(engine):
            scripted = torch.jit.script(graph_module.eval())
    except Exception as exc:  # TorchScript's errors name the code it cannot compile
        return f"the returned module runs its Python forward: TorchScript cannot compile it ({str(exc).splitlines()[0][:160]})"
    python_call = type(graph_module)._wrapped_call
    served = ScriptedForward(graph_module, scripted, engine, python_call)
    with torch.no_grad(), using_engine(engine):
        expected = python_call(graph_module, *example_inputs)
        fresh_copy = copy.deepcopy(scripted)  # checked on a copy: the scripted form caches its first real shape
        try:
            actual = fresh_copy(*example_inputs)
        except Exception as exc:
            return ("the returned module runs its Python forward: its TorchScript form fails on the example "
                    f"inputs ({str(exc).splitlines()[0][:160]})")
        served.output_type = _output_type(expected, actual)
        if not _identical(expected, served.output_type(actual)):
            return "the returned module runs its Python forward: its TorchScript form gave different outputs"
    if all(type(arg) is torch.Tensor for arg in example_inputs):
        served.copies[_shapes(example_inputs)] = fresh_copy  # it has run the example shapes only
    graph_module.__dict__[_CALL_SLOT] = served
    return ("the returned module runs its TorchScript form, with its own packed weights for each of up to "
            f"{MAX_SHAPE_COPIES} input shapes (onednn and x86 cache a kernel per weight for one shape)")


def _shapes(args: tuple) -> tuple:
    """The key of the copy that serves a call: its tensor arguments' shapes."""
    return tuple(arg.shape for arg in args)


def scripted_forward_of(model: nn.Module) -> ScriptedForward | None:
    """The TorchScript forward installed on `model` by serve_scripted, if any."""
    served = model.__dict__.get(_CALL_SLOT)
    return served if isinstance(served, ScriptedForward) else None


def loaded_forward_of(module: nn.Module) -> LoadedForward | None:
    """The per-shape dispatch installed on a loaded model by serve_loaded, if any."""
    served = getattr(module, "_compiled_call_impl", None)
    return served if isinstance(served, LoadedForward) else None


def _unchanged(output: Any) -> Any:
    return output


def _output_type(expected: Any, actual: Any) -> Callable[[Any], Any]:
    """What turns the TorchScript form's output into the Python forward's container type (top level)."""
    if type(expected) is type(actual):
        return _unchanged
    container = type(expected)
    if isinstance(expected, tuple) and hasattr(container, "_fields"):  # a namedtuple
        return lambda output: container(*output)
    if isinstance(expected, (dict, tuple, list)):
        return container
    return _unchanged


def _identical(expected: Any, actual: Any) -> bool:
    """Same container types, keys, shapes and values, bit for bit."""
    if type(expected) is not type(actual):
        return False
    if isinstance(expected, torch.Tensor):
        return expected.shape == actual.shape and torch.equal(expected, actual)
    if isinstance(expected, (tuple, list)):
        return len(expected) == len(actual) and all(_identical(e, a) for e, a in zip(expected, actual))
    if isinstance(expected, dict):
        return expected.keys() == actual.keys() and all(_identical(expected[k], actual[k]) for k in expected)
    return expected == actual
