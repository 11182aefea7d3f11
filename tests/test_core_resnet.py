"""Static quantization of torchvision's ResNet-18: int8 kernels, size, a untouched user model, save/load.

Random-init weights (seeded): these tests check structure and behaviour, not accuracy (the MobileNetV2
tests do that with the real checkpoint). Optimized rounding is off to keep the suite fast: it does not
change which kernels run, the file size or the save/load path.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn

import fxq
from fxq.samples import random_crops
from helpers import assert_state_unchanged, state_snapshot

FAST_OPTIONS = dict(optimize_rounding=False)
INT8_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "fxq.backend.dynamic_linear")
MAX_SIZE_RATIO = 0.30  # int8 file / float32 state_dict file


def make_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def quantize_resnet(model: nn.Module, crops: torch.Tensor) -> nn.Module:
    return fxq.quantize(model, crops[:1], calibration_data=list(crops.split(4)), **FAST_OPTIONS)


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()}


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return random_crops(8, seed=3)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return make_resnet18()


@pytest.fixture(scope="module")
def quantized(resnet: nn.Module, crops: torch.Tensor) -> nn.Module:
    return quantize_resnet(resnet, crops)


def test_every_conv_becomes_an_int8_kernel(resnet, quantized):
    float_convs = [name for name, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(float_convs) == 20
    assert not [name for name, m in quantized.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    int8_convs = [name for name, m in quantized.named_modules()
                  if "Conv" in type(m).__name__ and type(m).__module__.startswith(INT8_MODULE_PREFIXES)]
    assert len(int8_convs) == len(float_convs)
    int8_linears = [name for name, m in quantized.named_modules()
                    if type(m).__name__ in ("Linear", "DynamicLinear") and type(m).__module__.startswith(INT8_MODULE_PREFIXES)]
    assert int8_linears == ["fc"]


def test_runs_float_in_float_out(quantized, crops):
    with torch.no_grad():
        output = quantized(crops)
    assert output.dtype == torch.float32 and output.shape == (8, 1000)
    assert torch.isfinite(output).all()


def test_saved_file_is_at_most_030x_the_float_state_dict(quantized, resnet, tmp_path):
    float_path = tmp_path / "float_state_dict.pt"
    torch.save(resnet.state_dict(), float_path)
    int8_path = fxq.save(quantized, tmp_path / "int8.pt")
    ratio = int8_path.stat().st_size / float_path.stat().st_size
    print(f"resnet18 int8/float size ratio: {ratio:.3f}")
    assert ratio <= MAX_SIZE_RATIO


def test_user_model_is_untouched(crops):
    model = make_resnet18()
    snapshot = state_snapshot(model)
    hooks_before = hook_counts(model)
    rng_before = torch.get_rng_state()
    quantized = quantize_resnet(model, crops)
    assert_state_unchanged(model, snapshot)
    assert torch.equal(torch.get_rng_state(), rng_before)
    # the one global setting fxq changes: int8 ops dispatch on it (onednn's conv2d_add runs on no other)
    assert torch.backends.quantized.engine == fxq.summary_of(quantized).engine
    assert not any(m.training for m in model.modules())
    assert hook_counts(model) == hooks_before
    assert all(isinstance(m, nn.Conv2d) for name, m in model.named_modules() if name.endswith("conv1"))


def test_train_mode_model_is_quantized_from_an_eval_copy(quantized, crops):
    model = make_resnet18().train()
    snapshot = state_snapshot(model)  # includes BatchNorm running stats, which a train-mode pass would move
    from_train_mode = quantize_resnet(model, crops)
    assert all(m.training for m in model.modules())
    assert_state_unchanged(model, snapshot)
    with torch.no_grad():
        assert torch.equal(from_train_mode(crops), quantized(crops))


LOAD_AND_RUN = textwrap.dedent("""
    import sys
    import torch
    import fxq

    model = fxq.load(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(inputs), sys.argv[3])
    print(torch.backends.quantized.engine)
""")


def test_save_then_load_in_a_fresh_process_is_bit_identical(quantized, crops, tmp_path):
    model_path = fxq.save(quantized, tmp_path / "resnet18_int8.pt")
    inputs_path, outputs_path = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(crops, inputs_path)
    script = tmp_path / "load_and_run.py"
    script.write_text(LOAD_AND_RUN)
    result = subprocess.run([sys.executable, str(script), str(model_path), str(inputs_path), str(outputs_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == fxq.summary_of(quantized).engine
    with torch.no_grad():
        expected = quantized(crops)
    assert torch.equal(torch.load(outputs_path), expected)


def test_loaded_model_keeps_the_summary(quantized, tmp_path):
    loaded = fxq.load(fxq.save(quantized, tmp_path / "model.pt"))
    original, restored = fxq.summary_of(quantized), fxq.summary_of(loaded)
    assert restored is not None
    assert restored.engine == original.engine
    assert restored.rewrites == original.rewrites
