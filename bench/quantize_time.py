"""Issue 29's quantize-time table: how long fxq takes from a float model to an int8 one, step by step.

Rows, each run once in this process, one after another (run it with nothing else on the machine):

- MobileNetV2 (ImageNet weights) with `fxq.quantize` defaults, 64 calibration crops in batches of 16;
- ResNet-50 (torchvision, seeded random weights, BatchNorm statistics re-estimated on photo crops) the same;
- MobileNetV2 with `target_sqnr_db=30`;
- `fxq.sensitivity` on MobileNetV2, 32 calibration and 32 evaluation crops;
- a VGG16-BN U-Net (the encoder/decoder shape of text detectors such as CRAFT: torchvision's vgg16_bn
  features, a decoder of upsample + concat + two conv-BN-ReLU per scale, random weights with BatchNorm
  statistics from crops) at 160 x 160 and 320 x 320, 32 calibration crops: four times the pixels.

Each row gives the seconds, the steps that took the most (`summary.timings_s`), and logits SQNR against
float on evaluation crops (256 for the classifiers, 16 for the U-Net); PyTorch FX's default flow
(prepare_fx, calibration, convert_fx) on the same crops is timed beside the default rows as the peer.

    python -m bench.quantize_time [--threads 2] [--markdown]     (--markdown writes bench/quantize_time.md)
"""

from __future__ import annotations

import argparse
import datetime
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate
from torch import nn

import fxq
from bench.models import build, recalibrate_batchnorm
from bench.protocol import (calibration_batches, evaluation_crops, mobilenet_protocol, native_fx_default,
                            outputs_in_batches, outputs_sqnr_db)
from fxq.report.latency import cpu_name, isa_limits
from fxq.samples import random_crops

warnings.filterwarnings("ignore")

MARKDOWN = Path(__file__).resolve().with_name("quantize_time.md")
TOP_STEPS = 4  # steps listed per row, longest first


class VggUNet(nn.Module):
    """VGG16-BN encoder (5 scales) with a U-Net decoder and a 2-channel score map at the input resolution."""

    def __init__(self) -> None:
        super().__init__()
        features = torchvision.models.vgg16_bn(weights=None).features
        cuts = [index for index, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
        starts = [0] + [cut + 1 for cut in cuts[:-1]]
        self.stages = nn.ModuleList(features[start:cut] if start == 0 else features[start - 1:cut]
                                    for start, cut in zip(starts, cuts))
        widths = [64, 128, 256, 512, 512]
        self.ups = nn.ModuleList(self._block(widths[i + 1] + widths[i], widths[i]) for i in range(4))
        self.head = nn.Conv2d(64, 2, 1)

    @staticmethod
    def _block(channels_in: int, channels_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out),
                             nn.ReLU(inplace=True), nn.Conv2d(channels_out, channels_out, 3, padding=1),
                             nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        x = skips[-1]
        for index in range(3, -1, -1):
            x = F.interpolate(x, size=skips[index].shape[-2:], mode="bilinear", align_corners=False)
            x = self.ups[index](torch.cat([x, skips[index]], dim=1))
        return self.head(x)


def timed(run):
    """(run(), seconds). Not bench.suite's: importing that module sets OMP_WAIT_POLICY=PASSIVE, which made
    every row here slower (MobileNetV2 defaults 9.8 against 11.7 s)."""
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def unet(size: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VggUNet()
        recalibrate_batchnorm(model, random_crops(16, seed=7, size=size))
    return model.eval()


def slowest_steps(quantized: nn.Module) -> str:
    steps = sorted(fxq.summary_of(quantized).timings_s.items(), key=lambda item: -item[1])[:TOP_STEPS]
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in steps)


def default_row(name: str, model: nn.Module, calibration: list[torch.Tensor], evaluation: torch.Tensor,
                reference: torch.Tensor, **options) -> list[str]:
    quantized, seconds = timed(lambda: fxq.quantize(model, (calibration[0][:1],), calibration_data=calibration,
                                                    **options))
    sqnr = outputs_sqnr_db([(reference, outputs_in_batches(quantized, evaluation, 16))])
    native, native_s = timed(lambda: native_fx_default(model, calibration))
    native_sqnr = outputs_sqnr_db([(reference, outputs_in_batches(native, evaluation, 16))])
    label = ", ".join(f"{key}={value}" for key, value in options.items()) or "defaults"
    return [name, label, f"{seconds:.1f}", f"{sqnr:.2f}", slowest_steps(quantized), f"{native_s:.1f}",
            f"{native_sqnr:.2f}"]


def rows() -> list[list[str]]:
    table = []
    model, calibration, evaluation, reference = mobilenet_protocol()
    print("MobileNetV2 defaults", flush=True)
    table.append(default_row("MobileNetV2 (ImageNet)", model, calibration, evaluation, reference))
    print("MobileNetV2 target_sqnr_db=30", flush=True)
    table.append(default_row("MobileNetV2 (ImageNet)", model, calibration, evaluation, reference, target_sqnr_db=30))
    print("MobileNetV2 sensitivity", flush=True)
    report, seconds = timed(lambda: fxq.sensitivity(model, (calibration[0][:1],), calibration_data=calibration[:2],
                                                    eval_data=calibration[2:]))
    table.append(["MobileNetV2 (ImageNet)", "fxq.sensitivity, 32 + 32 crops", f"{seconds:.1f}",
                  f"{report.end_to_end_sqnr_db:.2f} (on its 32 crops)", "", "", ""])
    print("ResNet-50 defaults", flush=True)
    model = build("resnet50", size=224)
    evaluation = evaluation_crops(256)
    table.append(default_row("ResNet-50 (random, BN from crops)", model, calibration_batches(64), evaluation,
                             outputs_in_batches(model, evaluation, 16)))
    for size in (160, 320):
        print(f"U-Net {size}", flush=True)
        model = unet(size)
        evaluation = evaluation_crops(16, size=size)
        table.append(default_row(f"VGG16-BN U-Net {size}x{size} (random, BN from crops)", model,
                                 calibration_batches(32, size=size), evaluation,
                                 outputs_in_batches(model, evaluation, 16)))
    return table


HEADERS = ["model", "flow", "fxq s", "fxq SQNR dB", "slowest steps (s)", "PyTorch FX default s",
           "PyTorch FX default SQNR dB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = rows()
    text = tabulate(table, HEADERS, tablefmt="github")
    header = (f"Quantize time, `python -m bench.quantize_time --markdown` ({datetime.date.today()}): {cpu_name()}"
              f"{isa_limits()}, {args.threads} threads, torch {torch.__version__}. One run per row, one after "
              "another in one process; see the module docstring for the protocol.\n\n")
    print(header + text)
    if args.markdown:
        MARKDOWN.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
