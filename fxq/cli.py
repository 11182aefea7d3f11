"""Command line: `fxq quantize|report|sensitivity|bench` (also `python -m fxq`).

    fxq quantize torchvision:resnet18 --data skimage --out r18.pt
    fxq report torchvision:resnet18 --quantized r18.pt --format markdown

Errors a user can fix (bad model name, missing file, invalid option) print one line
`fxq: error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import fxq
from fxq import samples
from fxq.errors import FxqError
from fxq.export.conv_add import CONV_ADD_FORMS
from fxq.report.report import report as compare_models

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Batch size the calibration / evaluation samples are grouped into.
DATA_BATCH = 8
CALIBRATION_SEED, EVAL_SEED = 1, 2


# --- models ------------------------------------------------------------------------------------------

def load_model(spec: str, weights: str | None) -> nn.Module:
    """`torchvision:NAME` (random init unless --weights) or `package.module:callable`, in eval mode."""
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ValueError(f"model '{spec}' must be torchvision:NAME or package.module:callable")
    if source == "torchvision":
        if name == "mobilenet_v2" and weights == "imagenet":
            return samples.pretrained_mobilenet_v2()
        import torchvision

        try:
            model = torchvision.models.get_model(name)
        except ValueError:
            raise ValueError(f"torchvision has no model '{name}'; see torchvision.models.list_models()") from None
    else:
        try:
            factory = getattr(importlib.import_module(source), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load model '{spec}': {exc}") from None
        model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model '{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    if weights == "imagenet":
        raise ValueError("--weights imagenet is available for torchvision:mobilenet_v2 only; "
                         "pass a state_dict file for other models")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"no weights file {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not match {spec}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    return model.eval()


# --- data --------------------------------------------------------------------------------------------

def _read_folder(folder: Path, count: int, height: int, width: int) -> torch.Tensor:
    """Up to `count` images: resize (short side 256/224 of the crop), center crop, ImageNet-normalize."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        image = decode_image(str(file), mode=ImageReadMode.RGB)
        image = TF.resize(image, [round(min(height, width) * 256 / 224)], antialias=True)
        images.append(TF.center_crop(image, [height, width]).float() / 255.0)
    return samples.normalize_imagenet(torch.stack(images))


def load_data(source: str, count: int, input_shape: Sequence[int], seed: int) -> list[torch.Tensor]:
    """`count` samples from a folder of images, the scikit-image photographs, or seeded random tensors,
    grouped into batches."""
    if count < 1:
        raise ValueError(f"--calibration-size {count} must be >= 1")
    sample_shape = tuple(input_shape[1:])
    if source == "random":
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn((count, *sample_shape), generator=generator)
    elif source == "skimage":
        if len(sample_shape) != 3 or sample_shape[0] != 3 or sample_shape[1] != sample_shape[2]:
            raise ValueError(f"--data skimage gives square RGB images; --input-shape {input_shape} is not")
        images = samples.random_crops(count, seed=seed, size=sample_shape[1])
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"--data {source}: not a directory (or 'skimage', 'random')")
        if len(sample_shape) != 3 or sample_shape[0] != 3:
            raise ValueError(f"--data DIR gives RGB images; --input-shape {input_shape} is not (N,3,H,W)")
        images = _read_folder(folder, count, sample_shape[1], sample_shape[2])
    return list(images.split(DATA_BATCH))


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1,3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1,3,224,224")
    return shape


def _example_inputs(data: list[torch.Tensor], input_shape: Sequence[int]) -> torch.Tensor:
    return data[0][:input_shape[0]]


# --- subcommands ------------------------------------------------------------------------------------

def _render(result: Any, fmt: str) -> str:
    if fmt == "json":
        return result.to_json() if hasattr(result, "to_json") else str(result)
    if fmt == "markdown":
        return result.to_markdown() if hasattr(result, "to_markdown") else str(result)
    return str(result)


def _quantize_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"mode": args.mode, "backend": args.backend, "progress": True,
                               "optimize_rounding": args.optimize_rounding}
    if args.target_sqnr is not None:
        options["target_sqnr_db"] = args.target_sqnr
    return options


def run_quantize(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.weights)
    calibration = load_data(args.data, args.calibration_size, args.input_shape, CALIBRATION_SEED)
    example_inputs = _example_inputs(calibration, args.input_shape)
    quantized = fxq.quantize(model, example_inputs, calibration_data=calibration, **_quantize_options(args))
    saved = fxq.save(quantized, args.out)
    print(f"fxq: saved int8 model to {saved}", file=sys.stderr)
    if args.onnx:
        export_options = {"conv_add": args.onnx_conv_add}
        if args.onnx_conv_add != "fused":
            export_options["calibration_data"] = calibration
        path = fxq.export_onnx(quantized, args.onnx, example_inputs, **export_options)
        print(f"fxq: wrote ONNX QDQ model to {path}", file=sys.stderr)
    evaluation = load_data(args.data, args.calibration_size, args.input_shape, EVAL_SEED)
    print(_render(compare_models(model, quantized, example_inputs, eval_data=evaluation,
                                    threads=args.threads), args.format))
    return 0


def run_report(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.weights)
    quantized = fxq.load(args.quantized)
    evaluation = load_data(args.data, args.calibration_size, args.input_shape, EVAL_SEED)
    example_inputs = _example_inputs(evaluation, args.input_shape)
    print(_render(compare_models(model, quantized, example_inputs, eval_data=evaluation,
                                    threads=args.threads), args.format))
    return 0


def run_sensitivity(args: argparse.Namespace) -> int:
    if not hasattr(fxq, "sensitivity"):
        print("fxq: error: this fxq build has no fxq.sensitivity; the sensitivity subcommand is unavailable",
              file=sys.stderr)
        return 2
    model = load_model(args.model, args.weights)
    calibration = load_data(args.data, args.calibration_size, args.input_shape, CALIBRATION_SEED)
    evaluation = load_data(args.data, args.calibration_size, args.input_shape, EVAL_SEED)
    options = _quantize_options(args)
    options.pop("mode")  # sensitivity analyses static quantization only
    result = fxq.sensitivity(model, _example_inputs(calibration, args.input_shape), calibration_data=calibration,
                             eval_data=evaluation, **options)
    print(_render(result, args.format))
    return 0


# The benchmark suite lives in the source checkout (bench/), not in the installed package: it compares
# against torch.compile and native torch.ao flows that fxq itself never imports.
SUITE = Path(__file__).resolve().parents[1] / "bench" / "suite.py"


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite (`python -m bench.suite`) with the arguments after `bench`.

    In a process of its own: the suite sets OpenMP and inductor settings before torch loads.
    """
    import os
    import subprocess

    if not SUITE.is_file():
        raise FileNotFoundError(f"{SUITE} not found: the benchmark suite runs from a source checkout of fxq "
                                "(pip install -e .); see docs/results.md")
    root = str(SUITE.parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "bench.suite", *args.suite_args], env=env, cwd=root).returncode


# --- parser -----------------------------------------------------------------------------------------

def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="torchvision:NAME or package.module:callable")
    parser.add_argument("--weights", metavar="FILE",
                        help="state_dict file ('imagenet' for torchvision:mobilenet_v2); default: random init")
    parser.add_argument("--data", default="random", metavar="DIR|skimage|random",
                        help="calibration/evaluation data: a folder of images, the scikit-image "
                             "photographs, or seeded random tensors (default)")
    parser.add_argument("--calibration-size", type=int, default=32, metavar="N",
                        help="number of calibration (and evaluation) samples (default 32)")
    parser.add_argument("--input-shape", type=_input_shape, default=(1, 3, 224, 224), metavar="N,C,H,W",
                        help="example input shape (default 1,3,224,224)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the latency measurement")
    parser.add_argument("--format", choices=("table", "markdown", "json"), default="table")


def _add_quantize_arguments(parser: argparse.ArgumentParser, with_mode: bool = True) -> None:
    if with_mode:
        parser.add_argument("--mode", choices=("static", "dynamic"), default="static")
    parser.add_argument("--backend", choices=("auto", "x86", "fbgemm", "qnnpack", "onednn"), default="auto")
    parser.add_argument("--target-sqnr", type=float, default=None, metavar="DB",
                        help="keep the fewest layers in float that reach this output SQNR (dB)")
    parser.add_argument("--no-optimize-rounding", dest="optimize_rounding", action="store_false",
                        help="round weights to nearest instead of error-compensated rounding (much faster "
                             "on large models, usually a little less accurate)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxq", description="int8 quantization of PyTorch models (FX graph mode)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quantize = commands.add_parser("quantize", help="quantize a model, save it, print the report")
    _add_model_arguments(quantize)
    _add_quantize_arguments(quantize)
    quantize.add_argument("--out", required=True, metavar="FILE", help="where to save the int8 model (fxq.save)")
    quantize.add_argument("--onnx", metavar="FILE", help="also write the int8 model as ONNX QDQ (fxq.export_onnx; "
                                                          "extra [onnx])")
    quantize.add_argument("--onnx-conv-add", choices=CONV_ADD_FORMS, default="fused",
                          help="how --onnx writes onednn's fused conv + residual add: 'fused' (exact; OpenVINO runs "
                               "it in int8), 'requantize' (every conv int8 in ONNX Runtime; grids chosen on the "
                               "calibration data) or 'auto' ('requantize', the last units kept fused where ONNX "
                               "Runtime's outputs show it pays)")
    quantize.set_defaults(run=run_quantize)

    report = commands.add_parser("report", help="compare a saved int8 model with its float model")
    _add_model_arguments(report)
    report.add_argument("--quantized", required=True, metavar="FILE", help="int8 model saved by fxq quantize")
    report.set_defaults(run=run_report)

    sensitivity = commands.add_parser("sensitivity", help="per-layer int8 error of a model")
    _add_model_arguments(sensitivity)
    _add_quantize_arguments(sensitivity, with_mode=False)
    sensitivity.set_defaults(run=run_sensitivity, mode="static")

    # listed for --help only: main() hands everything after `bench` to the suite unparsed
    bench = commands.add_parser("bench", help="the benchmark suite (bench/suite.py; writes bench/results.md)")
    bench.set_defaults(run=run_bench, suite_args=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the suite, --help included
        args = argparse.Namespace(run=run_bench, suite_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FxqError, ValueError, FileNotFoundError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"fxq: error: {message}", file=sys.stderr)
        return 2
