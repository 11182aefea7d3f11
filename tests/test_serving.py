"""The returned int8 GraphModule runs its TorchScript form, one packed copy per input shape (backend.serving),
and its Python forward wherever that form could differ from it."""

from __future__ import annotations

import copy

import pytest
import torch

import fxq
from fxq.backend import serving
from tests.helpers import photo_batches, small_mobilenet


@pytest.fixture(scope="module")
def served(mobilenet):
    calibration, evaluation = photo_batches()
    model = small_mobilenet(mobilenet)
    quantized = fxq.quantize(model, evaluation[:1], calibration_data=calibration, optimize_rounding=False)
    return model, quantized, evaluation


def python_forward(quantized, *inputs):
    return serving.scripted_forward_of(quantized).python_call(quantized, *inputs)


def test_returned_module_runs_its_torchscript_form_and_says_so(served):
    _, quantized, evaluation = served
    forward = serving.scripted_forward_of(quantized)
    assert forward is not None
    assert any("runs its TorchScript form" in note for note in fxq.summary_of(quantized).notes)
    assert "serving" in fxq.summary_of(quantized).timings_s
    with torch.no_grad():
        assert torch.equal(quantized(evaluation[:1]), python_forward(quantized, evaluation[:1]))
        assert (evaluation[:5].shape,) not in forward.copies
        quantized(evaluation[:5])  # a new shape gets its copy of the TorchScript form
    assert (evaluation[:5].shape,) in forward.copies


def test_no_served_copy_shares_the_packed_weights_the_calibration_batches_ran(served):
    """The TorchScript form made from the GraphModule shares its modules' packed weights, whose kernels were
    cached for the calibration batches' shape: serving another shape on them rebuilds the kernels on every
    call (timm's mnasnet_100 calibrated on batches of 4 ran batch 1 in 29.5 ms instead of 2.7). Every
    shape, the first included, runs a copy packed afresh."""
    _, quantized, evaluation = served
    forward = serving.scripted_forward_of(quantized)
    with torch.no_grad():
        for batch in (evaluation[:2], evaluation[:1]):
            quantized(batch)
    assert {(evaluation[:2].shape,), (evaluation[:1].shape,)} <= set(forward.copies)
    assert all(copy_ is not forward.scripted for copy_ in forward.copies.values())


def test_each_batch_size_gets_its_own_packed_weights_and_the_same_outputs_as_the_saved_model(served, tmp_path):
    """A model that served batch 8 runs batch 1 on a kernel built for batch 1 (onednn and x86 keep the first
    shape's kernel per packed weight), and every size gives the saved model's outputs bit for bit."""
    _, quantized, evaluation = served
    loaded = fxq.load(fxq.save(quantized, tmp_path / "model.pt"))
    forward = serving.scripted_forward_of(quantized)
    with torch.no_grad():
        for batch in (evaluation, evaluation[:1], evaluation[:3], evaluation):
            assert torch.equal(quantized(batch), loaded(batch))
            assert torch.equal(quantized(batch), python_forward(quantized, batch))
    shapes = [(evaluation.shape,), (evaluation[:1].shape,), (evaluation[:3].shape,)]
    assert set(shapes) <= set(forward.copies)
    # each shape its own deep copy of the TorchScript form (a copy packs its weights afresh); the ids of
    # the packed weights cannot show it: each attribute read returns a new ScriptObject wrapper
    copies = [forward.copies[shape] for shape in shapes]
    assert len({id(copy_) for copy_ in copies}) == len(shapes) and forward.scripted not in copies


def test_shapes_beyond_the_limit_share_the_first_copy(mobilenet, monkeypatch):
    calibration, evaluation = photo_batches()
    quantized = fxq.quantize(small_mobilenet(mobilenet), evaluation[:1], calibration_data=calibration,
                             optimize_rounding=False)
    monkeypatch.setattr(serving, "MAX_SHAPE_COPIES", 2)
    forward = serving.scripted_forward_of(quantized)
    with torch.no_grad():
        for size in (1, 2, 3, 4):
            assert torch.equal(quantized(evaluation[:size]), python_forward(quantized, evaluation[:size]))
    assert len(forward.copies) == 2


def test_hooks_and_swapped_modules_run_the_python_forward(served):
    model, quantized, evaluation = served
    seen = []
    handle = quantized.get_submodule("0.0").register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        quantized(evaluation[:1])
    handle.remove()
    assert seen == [1]
    head = quantized.get_submodule("7")
    forward = serving.scripted_forward_of(quantized)
    try:
        quantized.add_submodule("7", torch.nn.Identity())
        assert not forward._runs_same_computation(quantized, (evaluation[:1],))
    finally:
        quantized.add_submodule("7", head)
    assert forward._runs_same_computation(quantized, (evaluation[:1],))


def test_a_copy_of_a_served_model_gives_its_outputs(served):
    """GraphModule's deepcopy rebuilds the module from its graph; the copy runs the Python forward."""
    _, quantized, evaluation = served
    twin = copy.deepcopy(quantized)
    assert serving.scripted_forward_of(twin) is None
    with torch.no_grad():
        assert torch.equal(twin(evaluation), quantized(evaluation))


def test_a_loaded_model_serves_each_batch_size_on_its_own_copy(served, tmp_path):
    """fxq.load returns the TorchScript module, whose calls run one copy per input shape (serving.serve_loaded):
    a loaded MobileNetV2 that had served batch 32 ran batch 1 at twice the time of one that had not."""
    _, quantized, evaluation = served
    path = fxq.save(quantized, tmp_path / "model.pt")
    loaded, fresh = fxq.load(path), fxq.load(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    forward = serving.loaded_forward_of(loaded)
    assert forward is not None
    with torch.no_grad():
        for batch in (evaluation, evaluation[:1], evaluation[:3]):
            assert torch.equal(loaded(batch), quantized(batch))
        assert torch.equal(loaded(evaluation[:1]), fresh.forward(evaluation[:1]))
    shapes = [(evaluation.shape,), (evaluation[:1].shape,), (evaluation[:3].shape,)]
    assert list(forward.copies) == shapes
    assert len({id(copy_) for copy_ in forward.copies.values()}) == 3 and loaded not in forward.copies.values()
    loaded.train()  # the copies were made in eval mode: a call in training mode runs the module itself
    with torch.no_grad():
        assert torch.equal(loaded(evaluation[:2]), loaded.forward(evaluation[:2]))
    loaded.eval()
    assert (evaluation[:2].shape,) not in forward.copies
    twin = copy.deepcopy(loaded)
    assert serving.loaded_forward_of(twin) is None
    with torch.no_grad():
        assert torch.equal(twin(evaluation[:1]), loaded(evaluation[:1]))
