"""Float convs left in an int8 model run channels-last, unless that breaks the model or its outputs' layout."""

from __future__ import annotations

import torch
from torch import nn

import fxq
from fxq.backend.float_layout import float_convs_called_by_graphs
from fxq.frontend.rewrite import Clamp


class Stem(nn.Module):
    """A float stem (kept float) before int8 layers, ending in a flatten or a view."""

    def __init__(self, flatten_with_view: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16 * 8 * 8, 10)
        self.flatten_with_view = flatten_with_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        if self.flatten_with_view:  # NCHW-only: a view of a channels-last map fails
            return self.head(x.view(x.shape[0], -1))
        return self.head(torch.flatten(torch.relu(self.body(x)), 1))


def _quantize(flatten_with_view: bool) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Stem(flatten_with_view).eval()
    data = torch.randn(8, 3, 8, 8)
    quantized = fxq.quantize(model, (data[:1],), calibration_data=[(data,)], keep_float=["stem"])
    return model, quantized, data


def test_kept_float_conv_runs_channels_last_with_the_same_outputs():
    model, quantized, data = _quantize(flatten_with_view=False)
    convs = float_convs_called_by_graphs(quantized)
    assert list(convs) == ["stem"]
    assert convs["stem"].weight.is_contiguous(memory_format=torch.channels_last)
    assert next(model.parameters()).is_contiguous()  # the user's model is untouched
    with torch.no_grad():
        channels_last = quantized(data)
        convs["stem"].weight.data = convs["stem"].weight.data.contiguous()
        nchw = quantized(data)
    assert torch.allclose(channels_last, nchw, atol=1e-5)
    assert not any("NCHW" in note for note in fxq.summary_of(quantized).notes)


def test_a_view_after_the_float_conv_runs_as_a_reshape_so_the_conv_goes_channels_last():
    """fxq's graphs call x.reshape where the model wrote x.view (frontend.canonicalize.views_as_reshapes),
    so a flatten by view no longer pins the float stem to NCHW; the rewrite is listed."""
    model, quantized, data = _quantize(flatten_with_view=True)
    assert float_convs_called_by_graphs(quantized)["stem"].weight.is_contiguous(memory_format=torch.channels_last)
    summary = fxq.summary_of(quantized)
    assert any(line.startswith("views_as_reshapes: 1 x.view") for line in summary.rewrites), summary.rewrites
    assert not [note for note in summary.notes if "NCHW" in note]
    with torch.no_grad():
        assert quantized(data).shape == (8, 10)


def test_clamp_is_relu_then_per_channel_minimum():
    clamp = Clamp(0.0, 6.0)
    clamp.set_high(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1))
    x = torch.randn(2, 3, 4, 4) * 4
    assert torch.equal(clamp(x), torch.minimum(torch.relu(x), clamp.high))
    assert "low_bound" not in clamp.state_dict()


def test_float_layer_clamps_work_in_place_in_the_finished_model_with_the_same_outputs(tmp_path):
    model, quantized, data = _quantize(flatten_with_view=False)
    fxq.save(quantized, tmp_path / "model.pt")
    clamps = [module for module in quantized.modules() if isinstance(module, Clamp)]
    assert clamps and all(clamp.inplace for clamp in clamps)
    assert not any(isinstance(module, Clamp) for module in model.modules())  # the user's model is untouched
    with torch.no_grad():
        in_place = quantized(data)
        assert torch.equal(fxq.load(tmp_path / "model.pt")(data), in_place)  # TorchScript takes the branch
        for clamp in clamps:
            clamp.inplace = False
        assert torch.equal(in_place, quantized(data))


def test_an_in_place_clamp_leaves_its_input_alone_while_autograd_records():
    clamp = Clamp(0.0, 6.0)
    clamp.inplace = True
    x = torch.randn(2, 3, 4, 4, requires_grad=True) * 4  # a non-leaf that requires grad, as a conv output
    before = x.detach().clone()
    y = clamp(x)
    y.sum().backward()
    assert torch.equal(x.detach(), before) and y.data_ptr() != x.data_ptr()
    with torch.no_grad():
        z = x.detach().clone()
        assert clamp(z).data_ptr() == z.data_ptr() and float(z.max()) <= 6.0 and float(z.min()) >= 0.0


class FlattenByView(nn.Module):
    """A head that flattens a feature map with `view`, which only the contiguous layout allows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.head(x.view(x.shape[0], -1))


def test_fxq_passes_take_channels_last_batches_only_where_the_model_computes_the_same():
    from fxq.calibration import channels_last_batches

    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8),), (torch.randn(4, 3, 8, 8),)]
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    converted = channels_last_batches(plain, batches)
    assert all(batch[0].is_contiguous(memory_format=torch.channels_last) for batch in converted)
    assert all(torch.equal(new[0], old[0]) for new, old in zip(converted, batches))
    shuffled = channels_last_batches(FlattenByView().eval(), batches)
    assert all(new[0] is old[0] for new, old in zip(shuffled, batches))
    # and the model still quantizes, its passes on the batches as given
    quantized = fxq.quantize(FlattenByView().eval(), batches[0][0][:1], calibration_data=[b[0] for b in batches])
    with torch.no_grad():
        assert torch.isfinite(quantized(batches[0][0])).all()
