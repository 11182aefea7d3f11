"""Coverage benchmark of the drop-in issue: every torchvision model of the list through fxq.quantize.

For each model: the share of conv/linear calls that run int8 kernels, the int8/float latency ratio at
batch 1 (float and int8 timed alternately, medians, fxq.report.latency), and the output SQNR against float
on real photographic crops. Models have random weights made realistic (bench/models.py: BN statistics
re-estimated on photographs), except MobileNetV2, which uses torchvision's ImageNet checkpoint.
Each model runs in its own process (memory) and its row is appended to a JSON-lines file, so an
interrupted run resumes where it stopped; `--markdown` renders bench/coverage.md from those rows.

    OMP_WAIT_POLICY=PASSIVE python -m bench.coverage [--models resnet18,vit_b_16] [--threads 2]
    python -m bench.coverage --markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from bench.models import CLASSIFICATION, DETECTION, MODELS, SEGMENTATION, build, crops
from bench.protocol import CALIBRATION_SEED, EVAL_SEED, outputs_sqnr_db
from fxq.backend.op_kinds import weighted_layers
from fxq.report.latency import cpu_name, isa_limits, measure_latency
from fxq.samples import pretrained_mobilenet_v2

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "coverage.jsonl"
MARKDOWN = ROOT / "bench" / "coverage.md"
CALIBRATION_IMAGES, EVAL_IMAGES = 16, 16
# The same model quantized again with the accuracy passes off, for a second SQNR column: it separates what
# tracing and kernels cost from what equalization / bias correction / optimized rounding add or remove.
RECOVERY_OFF = dict(equalize=False, bias_correction=False, optimize_rounding=False)


def measure(name: str, threads: int, options: dict) -> dict:
    """Quantize one model and measure it; returns the result row."""
    warnings.filterwarnings("ignore")
    spec = MODELS[name]
    size = spec.bench_size
    model = pretrained_mobilenet_v2() if name == "mobilenet_v2" else build(name, size)
    detector = spec.kind == "detection"
    calibration = crops(spec, CALIBRATION_IMAGES // 2 if detector else CALIBRATION_IMAGES, seed=CALIBRATION_SEED,
                        size=size)
    evaluation = crops(spec, EVAL_IMAGES // 4 if detector else EVAL_IMAGES, seed=EVAL_SEED, size=size)
    # detectors take a list of images; one image per batch
    batches = [([image],) for image in calibration] if detector else list(calibration.split(4))
    example = ([evaluation[0]],) if detector else (evaluation[:1],)
    start = time.perf_counter()
    quantized = fxq.quantize(model, batches[0], calibration_data=batches, **options)
    quantize_s = time.perf_counter() - start
    # Latency first: the int8 kernels cache the first input shape they see (see engine.repack_weights).
    (row,) = measure_latency(model, quantized, example, batch_sizes=(1,), threads=threads,
                             repeats=10 if detector else 30)
    plain = fxq.quantize(model, batches[0], calibration_data=batches, **{**options, **RECOVERY_OFF})
    sqnr, sqnr_plain = (_sqnr_db(model, q, evaluation, detector) for q in (quantized, plain))
    layers = weighted_layers(quantized)
    summary = fxq.summary_of(quantized)
    float_model_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Conv1d))
                             for m in model.modules())
    return {
        "model": name, "weights": "ImageNet" if name == "mobilenet_v2" else "random (BN re-estimated)",
        "input": size, "int8_layers": len(layers.int8), "float_layers": len(layers.float),
        "model_layers": float_model_layers, "int8_fraction": round(layers.int8_fraction, 4),
        "float_ms": row.float_median_ms, "int8_ms": row.int8_median_ms,
        "latency_ratio": round(row.int8_median_ms / row.float_median_ms, 3), "sqnr_db": round(sqnr, 2),
        "sqnr_recovery_off_db": round(sqnr_plain, 2),
        "quantize_s": round(quantize_s, 1), "engine": summary.engine, "conversions": summary.conversions,
        "float_ops": len(summary.float_ops), "options": options, "threads": threads,
        "float_layer_reasons": sorted({why.split(":")[0] for _, why in summary.float_layers}),
        "cpu": cpu_name() + isa_limits(), "date": datetime.date.today().isoformat(),
    }


def _sqnr_db(model, quantized, images, detector: bool = False) -> float:
    """SQNR (dB) of all output tensors of `quantized` against `model`, one image at a time (batch 1, the
    shape the int8 kernels were first called with). For a detector, of the backbone's feature maps: its
    boxes are a discrete selection, not a signal to compare."""
    pairs = []
    with torch.no_grad():
        for image in images.split(1):
            if detector:
                features = model.transform(list(image))[0].tensors
                pairs.append((model.backbone(features), quantized.backbone(features)))
            else:
                pairs.append((model(image), quantized(image)))
    return outputs_sqnr_db(pairs)


def run_all(names: list[str], threads: int, options: dict, timeout_s: int) -> None:
    done = {json.loads(line)["model"] for line in RESULTS.read_text().splitlines()} if RESULTS.exists() else set()
    for name in names:
        if name in done:
            print(f"{name}: already measured, skipped", flush=True)
            continue
        command = [sys.executable, "-m", "bench.coverage", "--one", name, "--threads", str(threads),
                   "--options", json.dumps(options)]
        started = time.perf_counter()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"model": name, "error": result.stderr.strip()[-500:]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"timed out after {timeout_s} s"}
        with RESULTS.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(f"{name}: {row.get('error') or row} ({time.perf_counter() - started:.0f} s)", flush=True)


def render_markdown() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    table = []
    for row in rows:
        if "error" in row:
            table.append([row["model"], "error", "", "", "", "", "", "", "", row["error"].strip().splitlines()[-1][:80],
                          ""])
            continue
        reasons = ", ".join(row["float_layer_reasons"]) or ""
        options = ", ".join(f"{k}={v}" for k, v in row.get("options", {}).items())
        table.append([row["model"], row["input"], f"{row['int8_layers']}/{row['int8_layers'] + row['float_layers']}",
                      f"{row['int8_fraction']:.2f}", f"{row['latency_ratio']:.2f}",
                      f"{row['float_ms']:.1f} / {row['int8_ms']:.1f}", f"{row['sqnr_db']:.1f}",
                      f"{row['sqnr_recovery_off_db']:.1f}", row.get("engine", ""), reasons, options or "defaults"])
    threads = {row.get("threads") for row in rows if "threads" in row}
    # rows measured before they recorded their CPU and date are described by the machine rendering them
    cpus = sorted({row.get("cpu", cpu_name() + isa_limits()) for row in rows})
    dates = sorted({row.get("date", datetime.date.today().isoformat()) for row in rows})
    header = (f"# fxq coverage: torchvision models through `fxq.quantize`\n\n"
              f"{'; '.join(cpus)}, {', '.join(map(str, sorted(threads)))} threads, torch "
              f"{torch.__version__}, {' to '.join(dict.fromkeys([dates[0], dates[-1]]))}; latencies "
              f"are medians at batch 1, float and int8 timed alternately (ratios are steadier than times).\n"
              f"`python -m bench.coverage`, fxq's default options unless the last column says otherwise. Random "
              f"weights with BatchNorm statistics "
              f"re-estimated on photographs (bench/models.py), except mobilenet_v2 (ImageNet checkpoint); "
              f"SQNR of all outputs against float on {EVAL_IMAGES} photographic crops (detectors: of the backbone's "
              f"feature maps on {EVAL_IMAGES // 4} images; their own forward does not trace, so fxq quantizes the "
              f"traceable parts and the heads' Python code runs in float); latency at batch 1. The second SQNR "
              f"column quantizes again with equalization, bias correction and optimized rounding off. Random deep "
              f"networks amplify any perturbation, so low SQNRs here say little about accuracy (the MobileNetV2 "
              f"row has real weights).\n\n")
    body = tabulate(table, headers=["model", "input", "int8 conv/linear", "int8 fraction", "int8/float latency",
                                    "float / int8 ms", "SQNR dB", "SQNR dB, recovery off", "engine",
                                    "why layers stay float", "options"], tablefmt="pipe")
    return header + body + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: the whole list)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--options", default="{}", help="JSON of fxq.quantize options (default: fxq's defaults)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", action="store_true", help="render bench/coverage.md from the results")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.threads, json.loads(args.options))))
        return
    if args.markdown:
        MARKDOWN.write_text(render_markdown())
        print(MARKDOWN.read_text())
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # for the processes that measure
    names = args.models.split(",") if args.models else [spec.name for spec in CLASSIFICATION + SEGMENTATION
                                                         + DETECTION]
    run_all(names, args.threads, json.loads(args.options), args.timeout)


if __name__ == "__main__":
    main()
