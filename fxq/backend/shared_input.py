"""Dynamic int8 Linears that read one input, run as one kernel: an attention block's query, key and value.

Each dynamic int8 Linear finds its input's range, quantizes the input and runs a GEMM of its own. Three
Linears on the same tensor do the first two steps three times and run three small GEMMs; at batch 1 a
transformer spends as long on that as on the arithmetic. One Linear with the three weights stacked does
the same arithmetic (each output row keeps its own weight scale, and the input is quantized on the same
range) in one call.

The model keeps its module tree and its own Python code: each member Linear becomes a SharedInputLinear
that returns its columns of the group's output (a view: code that needs a contiguous output copies it).
The group computes on the first member's call and hands the other members their columns when they are
called on the same tensor (the same object, unchanged since: same version counter, or for an inference
tensor the same values) in the same thread. A member called on anything else computes the group again,
so an output is never stale. A trace of the model (backend.traced_serving, fxq.save) records the one kernel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxq.backend.dynamic_linear import DynamicLinear
from fxq.frontend.graph import replace_module


@dataclass
class _Pending:
    """One thread's last group output, and which members have taken their columns of it."""

    source: torch.Tensor
    version: int | None  # the source's version counter; None for an inference tensor, which has none
    snapshot: torch.Tensor | None  # a copy of an inference tensor's values, to see it unchanged
    outputs: tuple[torch.Tensor, ...]
    taken: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, source: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> "_Pending":
        if source.is_inference():
            return cls(source, None, source.clone(), outputs)
        return cls(source, source._version, None, outputs)

    def computed_on(self, x: torch.Tensor) -> bool:
        """Whether these outputs are the group's on `x` as it is now: the same tensor, unchanged since (for an
        inference tensor, which counts no versions, the same values: one pass over the input, against the
        members' GEMMs over it)."""
        if self.source is not x:
            return False
        return self.version == x._version if self.snapshot is None else torch.equal(self.snapshot, x)


class SharedInputGroup(DynamicLinear):
    """The stacked dynamic int8 Linear of a group of members (`sizes`: each member's output features)."""

    def __init__(self, in_features: int, sizes: list[int], bias_: bool = True, reduce_range: bool = True,
                 input_scale: torch.Tensor | None = None) -> None:
        super().__init__(in_features, sum(sizes), bias_, reduce_range=reduce_range, input_scale=input_scale)
        self.sizes = list(sizes)
        self._pending: dict[int, _Pending] = {}

    @classmethod
    def stacking(cls, stacked: DynamicLinear, sizes: list[int]) -> "SharedInputGroup":
        """The group running `stacked` (a DynamicLinear whose output rows are the members' in order)."""
        group = cls(stacked.in_features, sizes, reduce_range=stacked.reduce_range,
                    input_scale=stacked.input_scale if stacked.smoothed else None)
        group.set_weight_bias(stacked.weight(), stacked.bias())
        return group

    def output_for(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member `index`'s output on `x`: from this thread's last group output if that was computed on
        `x` as it is now and the member has not taken it yet, else from a new one."""
        thread = threading.get_ident()
        pending = self._pending.get(thread)
        if pending is None or index in pending.taken or not pending.computed_on(x):
            outputs = super().forward(x).split(self.sizes, dim=-1)  # views: a copy each costs ~10 us
            pending = self._pending[thread] = _Pending.of(x, outputs)
        pending.taken.add(index)
        if len(pending.taken) == len(self.sizes):
            del self._pending[thread]
        return pending.outputs[index]

    def _get_name(self) -> str:
        return "FxqSharedInputGroup"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sizes={self.sizes}"

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles start with no pending outputs
        state = dict(super().__getstate__())
        state["_pending"] = {}
        return state


class SharedInputLinear(nn.Module):
    """Member `index` of a SharedInputGroup: the Linear it replaced, as that Linear's columns of the
    group's output. The first member holds the group as a submodule; the others refer to it."""

    def __init__(self, group: SharedInputGroup, index: int, holds_group: bool) -> None:
        super().__init__()
        self.index = index
        self.in_features = group.in_features
        self.out_features = group.sizes[index]
        self._start = sum(group.sizes[:index])
        if holds_group:
            self.group = group
        else:  # not a submodule: the state dict and the module tree hold the group once
            object.__setattr__(self, "_group_ref", group)

    @property
    def shared(self) -> SharedInputGroup:
        return self._modules["group"] if "group" in self._modules else self._group_ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output_for(x, self.index)

    def weight(self) -> torch.Tensor:
        return self.shared.weight()[self._start:self._start + self.out_features]

    def bias(self) -> torch.Tensor | None:
        bias = self.shared.bias()
        return None if bias is None else bias[self._start:self._start + self.out_features]

    def _get_name(self) -> str:
        return "FxqSharedInputLinear"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, member {self.index}"


def install_group(model: nn.Module, members: list[str], group: SharedInputGroup) -> None:
    """Replace each of `members` (module paths of `model`, in the group's row order) by its
    SharedInputLinear, in place."""
    for index, name in enumerate(members):
        replace_module(model, name, SharedInputLinear(group, index, holds_group=index == 0))
