"""Dynamic int8 Linears reading one tensor run as one kernel (fxq/shared_inputs.py, backend/shared_input.py)."""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

import fxq
from fxq.backend.dynamic_linear import DynamicLinear
from fxq.backend.op_kinds import weighted_layers
from fxq.backend.shared_input import SharedInputGroup, SharedInputLinear
from fxq.backend.traced_serving import traced_forward_of
from helpers import sqnr


class Attention(nn.Module):
    """Query, key and value read LayerNorm's output; the forward branches on a value, so FX cannot trace
    it and dynamic mode swaps the Linears in place."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def key_view(self, k: torch.Tensor) -> torch.Tensor:
        return k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().max()) > 1e6:
            x = x / float(x.abs().max())
        h = self.norm(x)
        q, k, v = self.query(h), self.key_view(self.key(h)), self.value(h)
        attention = torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1)
        return x + self.out(attention @ v)


class FlatKey(Attention):
    """The same, but its code views the key's output as flat, which a column slice of a wider output is not."""

    def key_view(self, k: torch.Tensor) -> torch.Tensor:
        return k.view(-1).view(k.shape)


def _model(cls: type[Attention] = Attention) -> Attention:
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # a few large channels, as a transformer's residual stream has
        model.norm.weight.copy_(1 + 4 * (torch.rand(64) > 0.9))
    return model


def _batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(2, 32, 64) for _ in range(4)]


def _quantize(model: nn.Module, **options) -> nn.Module:
    batches = _batches()
    # dynamic_where_faster=False: layers this small might time slower than float and go back to it
    return fxq.quantize(model, batches[0], mode="dynamic", calibration_data=batches, dynamic_where_faster=False,
                        **options)


def test_query_key_value_run_as_one_kernel():
    model = _model()
    joined, separate = _quantize(model), _quantize(model, share_inputs=False)
    assert [type(joined.get_submodule(n)) for n in ("query", "key", "value")] == [SharedInputLinear] * 3
    assert type(joined.out) is DynamicLinear and type(separate.key) is DynamicLinear
    group = joined.query.group
    assert isinstance(group, SharedInputGroup) and group.sizes == [64, 64, 64]
    assert joined.key.shared is group and joined.value.shared is group
    assert "group" not in dict(joined.key.named_children())  # the module tree holds the group once
    summary = fxq.summary_of(joined)
    lines = [line for line in summary.rewrites if line.startswith("shared input")]
    assert len(lines) == 1 and "query, key, value run as one dynamic int8 kernel" in lines[0]
    assert not any(line.startswith("activation smoothing: key") for line in summary.rewrites)
    assert sorted(weighted_layers(joined).int8) == ["key", "out", "query", "value"]
    # as faithful as the separate kernels (the check allows 0.1 dB on the example; the layers' own error 10%)
    x = torch.randn(2, 32, 64)
    with torch.no_grad():
        reference = model(x)
        assert sqnr(reference, joined(x)) >= sqnr(reference, separate(x)) - 0.5
        assert sqnr(reference, joined(x)) >= 30.0


def test_a_member_called_on_another_tensor_computes_its_own_output():
    joined = _quantize(_model())
    group = joined.query.group
    h, other = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    with torch.no_grad():
        rows = group(h)
        assert torch.equal(joined.query(h), rows[..., :64])
        assert torch.equal(joined.key(other), group(other)[..., 64:128])  # not the pending output of h
        assert torch.equal(joined.value(h), rows[..., 128:])
        joined.query(h)
        h.mul_(2)  # changed in place after the group ran on it: computed again
        assert torch.equal(joined.key(h), group(h)[..., 64:128])
    assert not group._pending or all(len(p.taken) < 3 for p in group._pending.values())


def test_inference_tensors_are_shared_and_checked_by_their_values():
    """Under torch.inference_mode the layers' inputs count no versions: the group output is handed out while
    the input holds the same values, and computed again once it changed in place."""
    joined = _quantize(_model())
    group = joined.query.group
    x = torch.randn(2, 16, 64)  # a signature the served trace has not seen: the call runs the Python forward
    python_forward = traced_forward_of(joined).python_forward
    with torch.no_grad():
        expected = python_forward(x)
    with torch.inference_mode():
        assert torch.equal(python_forward(x.clone()), expected)
        h = torch.randn(2, 8, 64)
        rows = group(h)
        assert torch.equal(joined.query(h), rows[..., :64])
        pending = group._pending[threading.get_ident()]
        assert torch.equal(joined.key(h), rows[..., 64:128]) and 1 in pending.taken
        h.mul_(2)
        assert torch.equal(joined.value(h), group(h)[..., 128:])


def test_copies_traces_and_saved_files_keep_the_outputs(tmp_path):
    joined = _quantize(_model())
    x = torch.randn(2, 32, 64)
    with torch.no_grad():
        expected = joined(x)
        twin = copy.deepcopy(joined)
        assert twin.key.shared is twin.query.group and twin.query.group is not joined.query.group
        assert torch.equal(twin(x), expected)
        served = traced_forward_of(joined)
        assert served is not None and not served.refusals
        trace = next(iter(served.traces.values()))[0]
        assert str(trace.inlined_graph).count("quantized::linear_dynamic") == 2  # the group's and out's
        loaded = fxq.load(fxq.save(joined, tmp_path / "attention.pt", example_inputs=(x,)))
        assert torch.equal(loaded(x), expected)


def test_code_that_needs_contiguous_outputs_keeps_separate_kernels():
    model = _model(FlatKey)
    int8 = _quantize(model)
    assert type(int8.key) is DynamicLinear
    notes = fxq.summary_of(int8).notes
    assert any("kept as separate kernels: the model failed with them (RuntimeError" in note for note in notes)
    with torch.no_grad():
        x = torch.randn(2, 32, 64)
        assert sqnr(model(x), int8(x)) >= 30.0
