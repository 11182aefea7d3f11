"""Quantization-aware training under DistributedDataParallel on CPU (gloo), on scikit-learn's digits.

    torchrun --nproc_per_node=2 examples/qat_ddp.py

Each rank trains the float DigitsNet of qat_digits.py under DDP, prepares its copy with fxq.prepare_qat,
wraps the prepared model in DDP again and fine-tunes it with fake quantization (ranges and BatchNorm
statistics frozen in the last epoch, the standard recipe). Data comes through DataLoaders with a
DistributedSampler (each rank trains on its own half) and two worker processes per rank. Rank 0 then
converts the trained model to int8, also quantizes the float model post-training with a DataLoader as
calibration data, and prints the three accuracies on the held-out quarter of the digits.

Two things to know when combining fxq with DDP:
- prepare on every rank first, then wrap: DDP takes the GraphModule fxq.prepare_qat returns and
  broadcasts rank 0's parameters and buffers (fake-quant ranges, BatchNorm statistics) at construction
  and before every forward, so all ranks train, and end with, the same model (the example checks).
- fxq.convert takes the prepared model itself, `ddp_model.module`, not the DDP wrapper: fxq keeps what
  it needs for conversion keyed by the object prepare_qat returned, and rejects anything else.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fxq
from qat_digits import DigitsNet, accuracy, digits_split

FLOAT_EPOCHS = 6
QAT_EPOCHS = 3
BATCH_PER_RANK = 16  # two ranks: the same 32 samples per optimizer step as qat_digits.py
LOADER_WORKERS = 2
MAX_ACCURACY_DROP = 0.02


def digits_datasets() -> tuple[TensorDataset, TensorDataset]:
    """qat_digits.py's train and test split, as datasets for DataLoaders."""
    train_x, train_y, test_x, test_y = digits_split()
    return TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)


def train_loader(dataset: TensorDataset) -> tuple[DataLoader, DistributedSampler]:
    """This rank's shard of the training set, reshuffled per epoch through sampler.set_epoch."""
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH_PER_RANK, sampler=sampler, num_workers=LOADER_WORKERS,
                        persistent_workers=True)
    return loader, sampler


def train(model: nn.Module, loader: DataLoader, sampler: DistributedSampler, epochs: int, lr: float,
          freeze_last_epoch: bool = False, first_epoch: int = 0) -> None:
    """Adam on cross-entropy; with `freeze_last_epoch`, the QAT recipe's frozen ranges and BN statistics."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        if freeze_last_epoch and epoch == epochs - 1:
            fxq.freeze_observers(model.module)
            fxq.freeze_bn_stats(model.module)
        sampler.set_epoch(first_epoch + epoch)
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()


def kernel_counts(model: nn.Module) -> Counter:
    """How many int8 conv/linear kernels of each type the model holds (torch.ao.nn.*quantized modules and
    fxq's dynamic Linear)."""
    return Counter(f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()
                   if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                                                     "fxq.backend.dynamic_linear"))
                   and callable(getattr(m, "weight", None)))


def ranks_agree(model: nn.Module) -> bool:
    """True when every rank holds rank 0's parameters and buffers bit for bit (DDP kept them in sync)."""
    state = torch.cat([t.detach().flatten().double() for t in model.state_dict().values()])
    reference = state.clone()
    dist.broadcast(reference, src=0)
    agree = torch.tensor([int(torch.equal(state, reference))])
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    return bool(agree.item())


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train_set, test_set = digits_datasets()
    loader, sampler = train_loader(train_set)
    train_x, test_x, test_y = train_set.tensors[0], *test_set.tensors

    torch.manual_seed(0)
    float_model = DistributedDataParallel(DigitsNet())
    train(float_model, loader, sampler, FLOAT_EPOCHS, lr=3e-3)
    model = float_model.module.eval()

    qat_model = DistributedDataParallel(fxq.prepare_qat(model, train_x[:BATCH_PER_RANK]))
    train(qat_model, loader, sampler, QAT_EPOCHS, lr=3e-4, freeze_last_epoch=True, first_epoch=FLOAT_EPOCHS)

    in_sync = ranks_agree(qat_model.module)
    status = 0
    if rank == 0:
        int8_model = fxq.convert(qat_model.module)  # the prepared model, not the DDP wrapper
        calibration = DataLoader(train_set, batch_size=64, shuffle=False, num_workers=LOADER_WORKERS)
        ptq_model = fxq.quantize(model, train_x[:64], calibration_data=fxq.inputs_only(calibration))
        float_accuracy = accuracy(model, test_x, test_y)
        int8_accuracy = accuracy(int8_model, test_x, test_y)
        print(f"ranks: {world}, training samples per rank: {len(sampler)}, loader workers per rank: "
              f"{LOADER_WORKERS}")
        print(f"float accuracy: {float_accuracy:.4f}")
        print(f"QAT int8 accuracy: {int8_accuracy:.4f}")
        print(f"PTQ int8 accuracy: {accuracy(ptq_model, test_x, test_y):.4f}")
        print(f"PTQ layers left in float: {len(fxq.summary_of(ptq_model).float_layers)}")
        print(f"QAT model identical on all ranks after training: {in_sync}")
        print("QAT int8 kernels: " + ", ".join(f"{name} x{count}"
                                               for name, count in sorted(kernel_counts(int8_model).items())))
        print(f"QAT layers left in float: {len(fxq.summary_of(int8_model).float_layers)}")
        if int8_accuracy < float_accuracy - MAX_ACCURACY_DROP or not in_sync:
            print(f"failed: int8 accuracy more than {MAX_ACCURACY_DROP:.2f} below float, or ranks diverged",
                  file=sys.stderr)
            status = 1
    dist.barrier()
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    if "RANK" not in os.environ:
        sys.exit("launch with: torchrun --nproc_per_node=2 examples/qat_ddp.py")
    sys.exit(main())
