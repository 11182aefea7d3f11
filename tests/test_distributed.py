"""fxq with several processes: QAT under DistributedDataParallel and calibration from DataLoader workers.

The DDP test launches examples/qat_ddp.py as a user would (torchrun, two ranks, gloo on the CPU, two
DataLoader workers per rank) and checks what it prints, PTQ from a DataLoader with workers included. The
other tests check that batches coming from worker processes calibrate exactly like the same batches from
a list (on the MobileNetV2 blocks and photographs of test_determinism.py), and that no worker outlives
the calibration.
"""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxq
from fxq.backend.op_kinds import is_weighted_quantized_module
from helpers import differing_entries, photo_batches, small_mobilenet

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "qat_ddp.py"
MIN_FLOAT_ACCURACY = 0.95
MAX_ACCURACY_DROP = 0.02


def printed(pattern: str, output: str) -> str:
    found = re.search(pattern, output, re.MULTILINE)
    assert found, f"{pattern!r} not in the output:\n{output}"
    return found.group(1)


def test_qat_under_ddp_with_two_ranks():
    # --standalone: a free local port, so concurrent runs on one machine do not collide on 29500
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    output = result.stdout
    assert printed(r"^ranks: (\d+)", output) == "2"
    assert printed(r"loader workers per rank: (\d+)", output) == "2"
    float_accuracy = float(printed(r"^float accuracy: ([\d.]+)", output))
    qat_accuracy = float(printed(r"^QAT int8 accuracy: ([\d.]+)", output))
    ptq_accuracy = float(printed(r"^PTQ int8 accuracy: ([\d.]+)", output))
    assert float_accuracy >= MIN_FLOAT_ACCURACY
    assert qat_accuracy >= float_accuracy - MAX_ACCURACY_DROP
    assert ptq_accuracy >= float_accuracy - MAX_ACCURACY_DROP
    assert printed(r"^QAT model identical on all ranks after training: (\w+)", output) == "True"
    kernels = dict(re.findall(r"((?:torch\.ao\.nn|fxq\.backend)\.[\w.]+) x(\d+)",
                              printed(r"^QAT int8 kernels: (.*)$", output)))
    assert kernels == {"torch.ao.nn.intrinsic.quantized.modules.conv_relu.ConvReLU2d": "2",
                       "fxq.backend.dynamic_linear.DynamicLinear": "1"}  # the returned head
    assert printed(r"^QAT layers left in float: (\d+)", output) == "0"


@pytest.fixture(scope="module")
def model(mobilenet) -> nn.Module:
    return small_mobilenet(mobilenet)


@pytest.fixture(scope="module")
def labelled_crops() -> TensorDataset:
    """32 photographic crops with their sample number as label, as a dataset of (image, label) pairs."""
    crops = torch.cat(photo_batches()[0] * 2)
    return TensorDataset(crops, torch.arange(len(crops)))


def test_calibration_from_dataloader_workers_matches_a_list_of_the_same_batches(model, labelled_crops):
    with_workers = DataLoader(labelled_crops, batch_size=8, num_workers=2)
    from_workers = fxq.quantize(model, labelled_crops.tensors[0][:1], calibration_data=fxq.inputs_only(with_workers))
    same_batches = [images for images, _ in DataLoader(labelled_crops, batch_size=8)]
    from_list = fxq.quantize(model, labelled_crops.tensors[0][:1], calibration_data=same_batches)
    assert sum(map(is_weighted_quantized_module, from_workers.modules())) >= 10
    assert differing_entries(from_workers.state_dict(), from_list.state_dict()) == []
    assert multiprocessing.active_children() == []  # the loader's workers were shut down


def test_calibration_stopping_early_shuts_the_dataloader_workers_down(model, labelled_crops):
    shuffled = DataLoader(labelled_crops, batch_size=4, shuffle=True, num_workers=2)
    quantized = fxq.quantize(model, labelled_crops.tensors[0][:1], calibration_data=fxq.inputs_only(shuffled),
                             max_calibration_batches=2, optimize_rounding=False)
    assert sum(map(is_weighted_quantized_module, quantized.modules())) >= 10
    assert multiprocessing.active_children() == []  # the unfinished loader iterator did not leak workers
