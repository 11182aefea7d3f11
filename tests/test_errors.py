"""Every user mistake ends in an fxq error a user can act on, and never touches the user's model.

No `from __future__ import annotations` here: fxq.save cannot yet script models whose forward has string
annotations (see test_serialize.py), and the save tests below need a model that scripts.
"""

import os
import platform
import warnings

import pytest
import torch
from torch import nn

import fxq
from helpers import assert_state_unchanged, sqnr, state_snapshot


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.relu(self.bn(self.stem(x)))), 1))


class LogOfNegative(nn.Module):
    """A leaf module whose output is NaN for the (negative) values it receives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class NaNInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shift = nn.Hardtanh(-3.0, -1.0)  # every value ends up negative
        self.broken_log = LogOfNegative()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.broken_log(self.shift(self.stem(x))))


def make(model_class: type[nn.Module] = SmallNet) -> nn.Module:
    torch.manual_seed(0)
    return model_class().eval()


def images(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def batches(count: int = 2) -> list[torch.Tensor]:
    return [images(4, seed) for seed in range(count)]


@pytest.fixture
def model() -> nn.Module:
    return make()


@pytest.fixture
def untouched(model: nn.Module):
    """Yields the model; afterwards checks that its parameters, buffers and mode did not change."""
    snapshot = state_snapshot(model)
    training = [m.training for m in model.modules()]
    yield model
    assert_state_unchanged(model, snapshot)
    assert [m.training for m in model.modules()] == training


def test_not_a_module_is_an_input_error():
    with pytest.raises(fxq.InputError, match="nn.Module"):
        fxq.quantize(lambda x: x, images(1), calibration_data=batches())
    with pytest.raises(fxq.InputError):
        fxq.quantize(make().state_dict(), images(1), calibration_data=batches())


def test_unknown_mode_lists_valid_values(untouched):
    with pytest.raises(fxq.ConfigError) as caught:
        fxq.quantize(untouched, images(1), calibration_data=batches(), mode="int4")
    message = str(caught.value)
    assert "int4" in message
    assert all(f"'{valid}'" in message for valid in ("static", "dynamic", "qat"))


def test_unknown_backend_is_a_config_error(untouched):
    with pytest.raises(fxq.ConfigError) as caught:
        fxq.quantize(untouched, images(1), calibration_data=batches(), backend="tensorrt")
    assert "tensorrt" in str(caught.value) and "'x86'" in str(caught.value)


def test_unknown_option_is_a_config_error(untouched):
    with pytest.raises(fxq.ConfigError, match="observr"):
        fxq.quantize(untouched, images(1), calibration_data=batches(), observr="minmax")


def test_empty_calibration_list_is_a_calibration_error(untouched):
    with pytest.raises(fxq.CalibrationError, match="empty"):
        fxq.quantize(untouched, images(1), calibration_data=[])


def test_missing_calibration_data_is_a_calibration_error(untouched):
    with pytest.raises(fxq.CalibrationError, match="calibration_data"):
        fxq.quantize(untouched, images(1))


def test_nan_in_calibration_batch_is_a_calibration_error(untouched):
    poisoned = batches(3)
    poisoned[2] = poisoned[2].clone()
    poisoned[2][1, 0, 3, 3] = float("nan")
    with pytest.raises(fxq.CalibrationError, match="batch 2"):
        fxq.quantize(untouched, images(1), calibration_data=poisoned)


def test_nan_produced_inside_the_model_names_the_module():
    model = make(NaNInside)
    snapshot = state_snapshot(model)
    with pytest.raises(fxq.CalibrationError, match="broken_log"):
        fxq.quantize(model, images(1), calibration_data=batches())
    assert_state_unchanged(model, snapshot)


class LogOfPeak(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.log(x.amax())  # NaN when every value is negative


class PeakNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.peak = LogOfPeak()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.stem(self.peak(x))))


@pytest.mark.parametrize("equalize", [True, False])
def test_nan_on_one_calibration_batch_names_the_module_and_the_batch(equalize):
    """The example inputs run fine; the second calibration batch makes NaN inside. The check rides on
    equalization's pass over the batches (or runs the batches itself without it) and names both."""
    poisoned = batches(3)
    poisoned[1] = -poisoned[1].abs() - 0.1
    with pytest.raises(fxq.CalibrationError, match="peak: produces NaN or Inf on calibration batch 1"):
        fxq.quantize(make(PeakNet), images(1), calibration_data=poisoned, equalize=equalize)


def test_example_inputs_of_wrong_shape_name_the_module(untouched):
    with pytest.raises(fxq.InputError) as caught:
        fxq.quantize(untouched, torch.randn(1, 5, 16, 16), calibration_data=batches())
    assert "stem" in str(caught.value)
    assert "(1, 5, 16, 16)" in str(caught.value)


def test_half_precision_model_is_an_input_error():
    model = make().half()
    snapshot = state_snapshot(model)
    with pytest.raises(fxq.InputError, match="float16"):
        fxq.quantize(model, images(1), calibration_data=batches())
    assert_state_unchanged(model, snapshot)
    assert model.stem.weight.dtype == torch.float16


def test_meta_device_model_is_an_input_error():
    with torch.device("meta"):
        model = make()
    snapshot = state_snapshot(model)
    with pytest.raises(fxq.InputError, match="meta"):
        fxq.quantize(model, images(1), calibration_data=batches())
    assert_state_unchanged(model, snapshot)
    assert model.stem.weight.is_meta


def test_calibration_batch_of_wrong_shape_names_the_module(untouched):
    wrong_channels = [torch.randn(4, 5, 16, 16)]
    with pytest.raises(fxq.InputError, match="stem"):
        fxq.quantize(untouched, images(1), calibration_data=wrong_channels)


def test_calibration_batches_shaped_unlike_example_inputs(untouched):
    labelled = [(batch, torch.zeros(4, dtype=torch.long)) for batch in batches()]
    with pytest.raises(fxq.InputError, match="inputs_only"):
        fxq.quantize(untouched, images(1), calibration_data=labelled)


def test_inputs_only_fixes_labelled_batches(untouched):
    labelled = [(batch, torch.zeros(4, dtype=torch.long)) for batch in batches()]
    quantized = fxq.quantize(untouched, images(1), calibration_data=fxq.inputs_only(labelled),
                             optimize_rounding=False)
    with torch.no_grad():
        assert quantized(images(2, seed=9)).shape == (2, 4)


def test_keep_float_with_an_unknown_name(untouched):
    with pytest.raises(fxq.InputError, match="stemm"):
        fxq.quantize(untouched, images(1), calibration_data=batches(), keep_float=["stemm"])


def test_save_to_a_missing_directory_leaves_no_file(untouched, tmp_path):
    quantized = fxq.quantize(untouched, images(1), calibration_data=batches(), optimize_rounding=False)
    target = tmp_path / "missing" / "model.pt"
    with pytest.raises(fxq.SerializationError, match="does not exist"):
        fxq.save(quantized, target)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_or_temporary_file(untouched, tmp_path):
    quantized = fxq.quantize(untouched, images(1), calibration_data=batches(), optimize_rounding=False)
    occupied = tmp_path / "model.pt"
    occupied.mkdir()  # the final rename onto a directory fails after the temporary file was written
    with pytest.raises(fxq.SerializationError, match="directory"):
        fxq.save(quantized, occupied)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert occupied.is_dir() and list(occupied.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_save_to_a_read_only_directory(untouched, tmp_path):
    quantized = fxq.quantize(untouched, images(1), calibration_data=batches(), optimize_rounding=False)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(fxq.SerializationError, match="not writable"):
            fxq.save(quantized, locked / "model.pt")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_load_of_a_non_model_file(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(fxq.SerializationError):
        fxq.load(junk)
    with pytest.raises(fxq.SerializationError):
        fxq.load(tmp_path / "absent.pt")


# --- a backend this CPU cannot run ---------------------------------------------------------------------

@pytest.fixture
def cpu_supports(monkeypatch):
    """Call with engine names to make torch report only those as supported on this CPU, for one test.

    torch.backends.quantized.supported_engines is a read-only property on the module's class; the class
    attribute is what gets replaced, so fxq reads the pretended list exactly where it reads the real one.
    """
    def pretend(*engines: str) -> None:
        monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", list(engines))
    return pretend


@pytest.mark.parametrize("entry", ["quantize", "prepare_qat"])
def test_backend_this_cpu_does_not_support(untouched, cpu_supports, entry):
    cpu_supports("qnnpack", "onednn")
    with pytest.raises(fxq.ConfigError) as caught:
        if entry == "quantize":
            fxq.quantize(untouched, images(1), calibration_data=batches(), backend="fbgemm")
        else:
            fxq.prepare_qat(untouched, images(1), backend="fbgemm")
    assert isinstance(caught.value, fxq.BackendError)
    message = str(caught.value)
    assert "backend='fbgemm'" in message and "not supported on this CPU" in message
    assert "lists qnnpack, onednn" in message
    assert "backend='auto'" in message and "backend='qnnpack' or backend='onednn'" in message


def test_build_without_any_int8_engine(untouched, cpu_supports):
    cpu_supports("none")
    with pytest.raises(fxq.BackendError, match="lists none; this PyTorch build has no int8 engine"):
        fxq.quantize(untouched, images(1), calibration_data=batches())


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 engine preference")
def test_auto_backend_uses_a_supported_engine_and_says_why(untouched, cpu_supports):
    cpu_supports("qnnpack", "x86")  # a build without onednn: x86 (fbgemm) is the next choice
    quantized = fxq.quantize(untouched, images(1), calibration_data=batches(), optimize_rounding=False)
    summary = fxq.summary_of(quantized)
    assert summary.engine == "x86"
    assert "onednn not supported here" in summary.engine_reason
    with torch.no_grad():
        assert sqnr(untouched(images(4, seed=7)), quantized(images(4, seed=7))) > 25


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 engine preference")
def test_auto_backend_without_a_preferred_engine_names_the_ones_to_pass(untouched, cpu_supports):
    cpu_supports("qnnpack")
    with pytest.raises(fxq.ConfigError, match="backend='auto' is not supported.*pass backend='qnnpack'"):
        fxq.quantize(untouched, images(1), calibration_data=batches())


def test_loading_a_model_built_for_an_engine_this_cpu_lacks(untouched, cpu_supports, tmp_path):
    quantized = fxq.quantize(untouched, images(1), calibration_data=batches(), optimize_rounding=False,
                             backend="x86")
    path = fxq.save(quantized, tmp_path / "model.pt")
    cpu_supports("qnnpack")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = fxq.load(path)
        assert any(issubclass(w.category, RuntimeWarning) and "built for the 'x86' int8 engine, which this CPU "
                   "does not support" in str(w.message) for w in caught)
        assert torch.backends.quantized.engine == "qnnpack"
        assert any("re-quantize on this machine" in note for note in fxq.summary_of(loaded).notes)
        with torch.no_grad():  # still runs, on qnnpack kernels: close to, not equal to, the x86 outputs
            assert sqnr(quantized(images(4, seed=7)), loaded(images(4, seed=7))) > 25
    finally:
        torch.backends.quantized.engine = previous


def test_eval_fn_without_max_drop_is_a_config_error(untouched):
    with pytest.raises(fxq.ConfigError, match="max_drop"):
        fxq.quantize(untouched, images(1), calibration_data=batches(), eval_fn=lambda model: 1.0)
    with pytest.raises(fxq.ConfigError, match="not both"):
        fxq.quantize(untouched, images(1), calibration_data=batches(), eval_fn=lambda model: 1.0, max_drop=0.1,
                     target_sqnr_db=30)
    with pytest.raises(fxq.ConfigError, match="max_drop"):
        fxq.quantize(untouched, images(1), calibration_data=batches(), eval_fn=lambda model: 1.0, max_drop=-1)
