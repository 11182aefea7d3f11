"""Third-party coverage bench of issue 27: timm, efficientnet_pytorch, ultralytics (YOLOv8n) and Hugging Face
transformers models through fxq, against PyTorch's own default flow.

Image models: random weights (`pretrained=False`), zero-initialized weights re-drawn, BatchNorm statistics
re-estimated on photographic crops (bench/models.py's recipe), at the model's native input size. Per model,
in its own process: `fxq.quantize` with defaults on 16 calibration crops (batches of 4), output SQNR and
top-1 agreement against float on 16 evaluation crops, the same for PyTorch FX's default
(bench.protocol.native_fx_default), int8/float conv/linear counts, quantize/dequantize calls, why layers
stay float, paired int8/float latency at batch 1. transformers models (small configs) run in static,
dynamic and QAT modes with dict inputs; their SQNR is last_hidden_state's. A failure of either flow is
recorded in the row (exception type, first line, where it was raised), never stops the run.
Rows are appended to bench/thirdparty.jsonl (an interrupted run resumes); `--markdown` renders
bench/thirdparty.md.

    python -m bench.thirdparty [--models timm/resnet50d,...] [--timeout 600]
    python -m bench.thirdparty --markdown

OpenMP's wait policy is left as users have it (unset): the models run one at a time, so nothing needs the
cores their idle threads spin on, and OMP_WAIT_POLICY=PASSIVE (what scripts/test.sh sets for tests that
share the cores) wakes sleeping threads at every op, which made the small BertModel 3x slower in float
and 4x in int8 (its QAT row 1.31x float instead of 0.6x).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from tabulate import tabulate
from torch import nn

import fxq
# _redraw_zero_weights is private to bench.models; imported rather than copied (bench/models.py's recipe)
from bench.models import _redraw_zero_weights, recalibrate_batchnorm
from bench.protocol import CALIBRATION_SEED, EVAL_SEED, NATIVE_ENGINE, native_fx_default, outputs_sqnr_db, sqnr_db
from fxq.backend.engine import using_engine
from fxq.backend.op_kinds import weighted_layers
from fxq.calibration import output_tensors
from fxq.report.latency import cpu_name, isa_limits, measure_latency
from fxq.samples import random_crops
from fxq.validate import keywords_as_args

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "thirdparty.jsonl"
MARKDOWN = ROOT / "bench" / "thirdparty.md"
CALIBRATION_IMAGES, EVAL_IMAGES, CALIBRATION_BATCH = 16, 16, 4
BATCHNORM_SEED, BATCHNORM_IMAGES = 7, 16
# The goals, flagged per row in the table.
GOAL_INT8_FRACTION, GOAL_LATENCY_RATIO = 0.9, 0.7


@dataclass(frozen=True)
class ThirdPartyModel:
    """One model of the list: the package that builds it, what it is called there, its sizes and mode."""

    family: str  # "timm", "efficientnet_pytorch", "ultralytics" or "transformers"
    arch: str  # the package's name for it
    bench_size: int = 224  # the model's native input size (timm's pretrained_cfg)
    test_size: int = 96  # smallest size tests/test_thirdparty.py runs it at
    kwargs: dict[str, Any] = field(default_factory=dict)  # given to the package's builder
    test_kwargs: dict[str, Any] = field(default_factory=dict)  # added at the test size (a ViT's img_size)
    mode: str = "static"  # transformers rows: "static", "dynamic" or "qat"
    label: str = ""  # distinguishes two rows of one arch

    @property
    def name(self) -> str:
        suffix = f" ({self.label or self.mode})" if self.label or self.family == "transformers" else ""
        return f"{self.family}/{self.arch}{suffix}"


_SMALL_VIT = dict(img_size=96)
TIMM = [
    ThirdPartyModel("timm", "tf_efficientnet_b0"),
    ThirdPartyModel("timm", "tf_mobilenetv3_large_100"),
    ThirdPartyModel("timm", "efficientnet_b0"),
    ThirdPartyModel("timm", "mobilenetv3_large_100"),
    ThirdPartyModel("timm", "mixnet_s"),
    ThirdPartyModel("timm", "ghostnet_100"),
    ThirdPartyModel("timm", "rexnet_100"),
    ThirdPartyModel("timm", "resnet50d"),
    ThirdPartyModel("timm", "regnety_016"),
    ThirdPartyModel("timm", "cspresnet50", 256),
    ThirdPartyModel("timm", "dla34"),
    ThirdPartyModel("timm", "hrnet_w18_small"),
    ThirdPartyModel("timm", "convnext_nano"),
    ThirdPartyModel("timm", "repvgg_a0"),
    ThirdPartyModel("timm", "vit_small_patch16_224", test_kwargs=_SMALL_VIT),
    ThirdPartyModel("timm", "deit_small_patch16_224", test_kwargs=_SMALL_VIT),
    ThirdPartyModel("timm", "levit_128", test_kwargs=_SMALL_VIT),
    ThirdPartyModel("timm", "mobilevit_s", 256),
    ThirdPartyModel("timm", "efficientformer_l1", test_size=224),  # its last stage's attention is 7x7
    ThirdPartyModel("timm", "fastvit_t8", 256),
    ThirdPartyModel("timm", "resnet18d"),
    ThirdPartyModel("timm", "seresnet50"),
    ThirdPartyModel("timm", "densenet121"),
    ThirdPartyModel("timm", "mnasnet_100"),
    ThirdPartyModel("timm", "lcnet_100"),
    ThirdPartyModel("timm", "tinynet_a", 192),
    ThirdPartyModel("timm", "efficientvit_b0"),
    ThirdPartyModel("timm", "coat_lite_tiny", test_kwargs=_SMALL_VIT),
    ThirdPartyModel("timm", "poolformer_s12"),
    ThirdPartyModel("timm", "xcit_nano_12_p16_224", test_kwargs=_SMALL_VIT),
    ThirdPartyModel("timm", "mobileone_s0"),
    ThirdPartyModel("timm", "edgenext_xx_small", 256),
    ThirdPartyModel("timm", "resnetv2_50x1_bit"),  # StdConv2d: weight standardization in forward
]
EFFICIENTNET_PYTORCH = [
    # from_name's default: image_size 224 gives Conv2dStaticSamePadding (ZeroPad2d + F.conv2d)
    ThirdPartyModel("efficientnet_pytorch", "efficientnet-b0", test_size=64, test_kwargs=dict(image_size=64),
                    label="static SAME"),
    # image_size=None gives Conv2dDynamicSamePadding (F.pad computed from the input's shape in forward)
    ThirdPartyModel("efficientnet_pytorch", "efficientnet-b0", test_size=64, kwargs=dict(image_size=None),
                    label="dynamic SAME"),
]
# built from their yaml files (random weights); the compared outputs are the raw head tensors
ULTRALYTICS = [ThirdPartyModel("ultralytics", "yolov8n", 320), ThirdPartyModel("ultralytics", "yolov8n-seg", 320)]
TRANSFORMERS = [ThirdPartyModel("transformers", arch, mode=mode)
                for arch in ("BertModel", "DistilBertModel", "ViTModel") for mode in ("static", "dynamic", "qat")]
MODELS = {spec.name: spec for spec in TIMM + EFFICIENTNET_PYTORCH + ULTRALYTICS + TRANSFORMERS}

# transformers: hidden 128, 2 layers, 4 heads; token inputs of SEQUENCE_LENGTH with a padded tail
SEQUENCE_LENGTH, VOCABULARY = 32, 1000
_TRANSFORMER_CONFIGS = {
    "BertModel": ("BertConfig", dict(vocab_size=VOCABULARY, hidden_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=512)),
    "DistilBertModel": ("DistilBertConfig", dict(vocab_size=VOCABULARY, dim=128, n_layers=2, n_heads=4,
                                                 hidden_dim=512)),
    "ViTModel": ("ViTConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=512, image_size=224, patch_size=16)),
}


# --- building ------------------------------------------------------------------------------------------

def _create(spec: ThirdPartyModel, size: int) -> nn.Module:
    kwargs = dict(spec.kwargs, **(spec.test_kwargs if size < spec.bench_size else {}))
    if spec.family == "timm":
        import timm

        return timm.create_model(spec.arch, pretrained=False, **kwargs)
    if spec.family == "efficientnet_pytorch":
        from efficientnet_pytorch import EfficientNet

        return EfficientNet.from_name(spec.arch, **kwargs)
    if spec.family == "ultralytics":
        from ultralytics.nn.tasks import DetectionModel, SegmentationModel

        builder = SegmentationModel if spec.arch.endswith("-seg") else DetectionModel
        return builder(f"{spec.arch}.yaml", verbose=False, **kwargs)
    import transformers

    config_class, config = _TRANSFORMER_CONFIGS[spec.arch]
    return getattr(transformers, spec.arch)(getattr(transformers, config_class)(**config))


def _unzero_norm_scales(model: nn.Module) -> None:
    """timm's zero_init_last sets the last BatchNorm scale of every residual block to 0, which makes the
    block an identity; trained networks have nonzero scales, so give them PyTorch's default 1."""
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and \
                module.weight is not None and not module.weight.detach().any():
            nn.init.ones_(module.weight)


def build(spec: ThirdPartyModel, size: int | None = None) -> nn.Module:
    """The model in eval mode: seeded random weights, zero weights re-drawn, BatchNorm statistics
    re-estimated on photographic crops of `size` (default: its bench size)."""
    size = size or spec.bench_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _create(spec, size)
        _redraw_zero_weights(model)
        _unzero_norm_scales(model)
        if spec.family != "transformers":
            recalibrate_batchnorm(model, random_crops(BATCHNORM_IMAGES, seed=BATCHNORM_SEED, size=size))
    return model.eval()


def model_inputs(spec: ThirdPartyModel, count: int, seed: int, size: int | None = None) -> list[Any]:
    """`count` single-sample inputs: photographic crops for image models (ViTModel: {"pixel_values"}),
    {"input_ids", "attention_mask"} dicts of random tokens with a padded tail for text models."""
    size = size or spec.bench_size
    if spec.family != "transformers" or spec.arch == "ViTModel":
        images = list(random_crops(count, seed=seed, size=size).split(1))
        return [{"pixel_values": image} for image in images] if spec.family == "transformers" else images
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        ids = torch.randint(1, VOCABULARY, (1, SEQUENCE_LENGTH), generator=generator)
        mask = torch.ones_like(ids)
        mask[:, int(torch.randint(SEQUENCE_LENGTH // 2, SEQUENCE_LENGTH + 1, (1,), generator=generator)):] = 0
        samples.append({"input_ids": ids, "attention_mask": mask})
    return samples


def batched(samples: list[Any], batch_size: int = CALIBRATION_BATCH) -> list[Any]:
    """Single-sample inputs (tensors or dicts of tensors) concatenated `batch_size` at a time."""
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    if isinstance(samples[0], Mapping):
        return [{key: torch.cat([s[key] for s in chunk]) for key in chunk[0]} for chunk in chunks]
    return [torch.cat(chunk) for chunk in chunks]


def call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


# ultralytics' raw head outputs in eval mode, by key (the rest of its output is decoded from these, or is
# the neck's features)
_RAW_HEAD_OUTPUTS = ("boxes", "scores", "mask_coefficient", "proto")


def compared_output(spec: ThirdPartyModel, output: Any) -> Any:
    """The output the SQNR is taken on: logits for image classifiers, last_hidden_state for transformers,
    the raw head tensors for ultralytics (flattened per sample and joined)."""
    if spec.family == "transformers":
        return output.last_hidden_state
    if spec.family == "ultralytics":
        raw = output[1]
        missing = [key for key in _RAW_HEAD_OUTPUTS[:2] if key not in raw]
        if missing:
            raise KeyError(f"ultralytics' eval output has no {missing}; its keys: {sorted(raw)}")
        return torch.cat([raw[key].flatten(1) for key in _RAW_HEAD_OUTPUTS if key in raw], 1)
    return output


def _classifies(spec: ThirdPartyModel) -> bool:
    """Whether the model returns class logits (top-1 agreement is measured on those)."""
    return spec.family in ("timm", "efficientnet_pytorch")


# --- measuring -----------------------------------------------------------------------------------------

def _failure(exc: BaseException) -> dict[str, str]:
    """The exception type and first line, where it was raised, the innermost frame inside fxq/ and the
    innermost one in the model's package."""
    frames = traceback.extract_tb(exc.__traceback__)
    fxq_frames = [f for f in frames if f"{os.sep}fxq{os.sep}" in f.filename]

    def where(frame: traceback.FrameSummary) -> str:
        path = Path(frame.filename)
        for anchor in ("fxq", "site-packages"):
            if anchor in path.parts:
                path = Path(*path.parts[path.parts.index(anchor) + (anchor == "site-packages"):])
                break
        return f"{path}:{frame.lineno} ({frame.name})"

    # the model package's own code (a forward reading an attribute fxq replaced)
    package_frames = [f for f in frames if "site-packages" in Path(f.filename).parts
                      and Path(where(f)).parts[0] not in ("torch", "fxq")]
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    return {"error": f"{type(exc).__name__}: {first_line}", "raised_at": where(frames[-1]) if frames else "",
            "fxq_frame": where(fxq_frames[-1]) if fxq_frames else "",
            "package_frame": where(package_frames[-1]) if package_frames else ""}


def _sqnr_and_agreement(spec: ThirdPartyModel, model: nn.Module, quantized: nn.Module,
                        evaluation: list[Any]) -> tuple[float, float, float | None, bool]:
    """SQNR (dB) of the compared output against float over all samples, run one at a time (the shape the
    int8 kernels were first called with), and the median sample's own SQNR; top-1 agreement of image
    logits; whether every int8 output is finite. The SQNR over the set weighs samples by their outputs'
    energy, so with random weights one outlier crop can make it (bench/generalization.py); the median
    sample's shows the typical one."""
    pairs = []
    with torch.no_grad():
        for sample in evaluation:
            pairs.append((compared_output(spec, call(model, sample)), compared_output(spec, call(quantized, sample))))
    finite = all(torch.isfinite(t).all() for _, test in pairs for t in output_tensors(test))
    agreement = None
    if _classifies(spec):
        agreement = float(torch.tensor([bool((r.argmax(1) == t.argmax(1)).all()) for r, t in pairs]).float().mean())
    median = float(torch.tensor([sqnr_db(reference, test) for reference, test in pairs]).median())
    return outputs_sqnr_db(pairs), median, agreement, bool(finite)


def _pytorch_baseline(spec: ThirdPartyModel, model: nn.Module, calibration: list[Any]) -> tuple[nn.Module, str]:
    """PyTorch's default for the mode: FX prepare/convert with the default x86 qconfig mapping (static;
    given the first positional input, since prepare_fx takes no dict), eager quantize_dynamic (dynamic)."""
    if spec.mode == "dynamic":
        from torch.ao.quantization import quantize_dynamic

        with using_engine(NATIVE_ENGINE):
            return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8), "eager quantize_dynamic"
    tensors = [next(iter(batch.values())) if isinstance(batch, Mapping) else batch for batch in calibration]
    return native_fx_default(model, tensors), "FX default"


def _quantize_fxq(spec: ThirdPartyModel, model: nn.Module, example: Any, calibration: list[Any]) -> nn.Module:
    if spec.mode == "dynamic":
        return fxq.quantize(model, example, mode="dynamic")
    if spec.mode == "static":
        return fxq.quantize(model, example, calibration_data=calibration)
    prepared = fxq.prepare_qat(model, example)  # QAT: observers trained on the calibration batches, no steps
    prepared.train()
    with torch.no_grad():
        for batch in calibration:
            call(prepared, batch)
    fxq.freeze_observers(prepared)
    return fxq.convert(prepared)


def _measure_int8(spec: ThirdPartyModel, model: nn.Module, quantized: nn.Module, evaluation: list[Any],
                  threads: int) -> dict[str, Any]:
    """fxq's int8 model against float: latency, SQNR, which layers are int8 and why the others are not."""
    summary = fxq.summary_of(quantized)
    positional = keywords_as_args(model, evaluation[0]) if isinstance(evaluation[0], Mapping) else (evaluation[0],)
    with using_engine(summary.engine):
        # Latency first: the int8 kernels cache the first input shape they see (see engine.repack_weights).
        (latency,) = measure_latency(model, quantized, positional, batch_sizes=(1,), threads=threads, repeats=30)
        sqnr, median, agreement, finite = _sqnr_and_agreement(spec, model, quantized, evaluation)
    layers = weighted_layers(quantized)
    return {
        "sqnr_db": round(sqnr, 2), "median_sample_sqnr_db": round(median, 2), "top1_agreement": agreement,
        "finite": finite, "engine": summary.engine,
        "int8_layers": len(layers.int8), "float_layers": len(layers.float),
        "int8_fraction": round(layers.int8_fraction, 4), "float_layer_names": layers.float,
        "float_layer_reasons": [list(item) for item in summary.float_layers],
        "float_ops": [list(item) for item in summary.float_ops], "conversions": summary.conversions,
        "estimated_latency_us": summary.estimated_latency_us, "rewrites": len(summary.rewrites),
        "notes": summary.notes, "float_ms": latency.float_median_ms, "int8_ms": latency.int8_median_ms,
        "latency_ratio": round(latency.int8_median_ms / latency.float_median_ms, 3)}


def measure(spec: ThirdPartyModel, threads: int) -> dict:
    """Quantize one model with fxq and with PyTorch's default and measure both; returns the result row."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    model = build(spec)
    calibration = batched(model_inputs(spec, CALIBRATION_IMAGES, CALIBRATION_SEED))
    evaluation = model_inputs(spec, EVAL_IMAGES, EVAL_SEED)
    example = calibration[0]
    tokens = spec.family == "transformers" and spec.arch != "ViTModel"
    row: dict[str, Any] = {
        "model": spec.name, "family": spec.family, "mode": spec.mode,
        "input": f"{SEQUENCE_LENGTH} tokens" if tokens else spec.bench_size,
        "model_layers": sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in model.modules()),
        "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "cpu": cpu_name() + isa_limits(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "fxq": fxq_revision()}
    start = time.perf_counter()
    stage = "quantize"
    try:
        quantized = _quantize_fxq(spec, model, example, calibration)
        row["quantize_s"] = round(time.perf_counter() - start, 1)
        stage = "run"  # the int8 model can be returned and still fail when called
        row.update(_measure_int8(spec, model, quantized, evaluation, threads))
    except Exception as exc:  # recorded: the table shows which models fxq cannot take, and where
        row.update({"fxq_" + key: value for key, value in _failure(exc).items()}, fxq_stage=stage)
        row.setdefault("quantize_s", round(time.perf_counter() - start, 1))
    start = time.perf_counter()
    try:
        baseline, row["baseline"] = _pytorch_baseline(spec, model, calibration)
        row["baseline_quantize_s"] = round(time.perf_counter() - start, 1)
        with using_engine(NATIVE_ENGINE):
            baseline_sqnr, baseline_median, baseline_agreement, _ = _sqnr_and_agreement(spec, model, baseline,
                                                                                        evaluation)
        row.update({"baseline_sqnr_db": round(baseline_sqnr, 2),
                    "baseline_median_sample_sqnr_db": round(baseline_median, 2),
                    "baseline_top1_agreement": baseline_agreement})
    except Exception as exc:  # PyTorch's flow failing (mostly its tracer) is a result too
        row.setdefault("baseline", "eager quantize_dynamic" if spec.mode == "dynamic" else "FX default")
        row.update({"baseline_" + key: value for key, value in _failure(exc).items()})
    return row


def fxq_revision() -> str:
    """The commit fxq was measured at, "+edits" when fxq/ differs from it (rows of one run can span the
    lead's commits)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+edits" if git("status", "--porcelain", "fxq") else "")


def _done() -> set[str]:
    return {json.loads(line)["model"] for line in RESULTS.read_text().splitlines()} if RESULTS.exists() else set()


def run_all(names: list[str], threads: int, timeout_s: int) -> None:
    """Each model in a process of its own, one at a time; rows already in RESULTS are skipped."""
    done = _done()
    for name in names:
        if name in done:
            print(f"{name}: already measured, skipped", flush=True)
            continue
        command = [sys.executable, "-m", "bench.thirdparty", "--one", name, "--threads", str(threads)]
        started = time.perf_counter()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "model": name, "error": f"process exited with {result.returncode}: {result.stderr.strip()[-500:]}"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"timed out after {timeout_s} s"}
        row["wall_s"] = round(time.perf_counter() - started, 1)
        with RESULTS.open("a") as out:
            out.write(json.dumps(row) + "\n")
        summary = row.get("error") or row.get("fxq_error") or (
            f"SQNR {row.get('sqnr_db')} dB (baseline {row.get('baseline_sqnr_db', row.get('baseline_error'))}), "
            f"int8 {row.get('int8_layers')}/{row.get('int8_layers', 0) + row.get('float_layers', 0)}, "
            f"latency x{row.get('latency_ratio')}")
        print(f"{name}: {summary} ({row['wall_s']:.0f} s)", flush=True)


# --- rendering -----------------------------------------------------------------------------------------

def _missed_goals(row: dict) -> list[str]:
    """The issue's goals this row misses (a crash misses them all)."""
    if "error" in row or "fxq_error" in row:
        return ["crash"]
    missed = []
    if not row["finite"]:
        missed.append("non-finite")
    if row["int8_fraction"] < GOAL_INT8_FRACTION:
        missed.append(f"int8 < {GOAL_INT8_FRACTION:.0%}")
    if row["latency_ratio"] > GOAL_LATENCY_RATIO:
        missed.append(f"latency > {GOAL_LATENCY_RATIO}x")
    if "baseline_sqnr_db" in row and row["sqnr_db"] < row["baseline_sqnr_db"]:
        median_above = (row.get("median_sample_sqnr_db", -math.inf)
                        >= row.get("baseline_median_sample_sqnr_db", math.inf))
        missed.append("SQNR < PyTorch" + (" (median sample: above)" if median_above else ""))
    plan = row.get("estimated_latency_us") or {}
    if "fxq" in plan and "float" in plan and plan["fxq"] > plan["float"]:
        missed.append("plan slower than float")
    return missed


def _float_reasons(row: dict) -> str:
    """Why layers stay float, each reason's head with its count."""
    counts: dict[str, int] = {}
    for _, why in row["float_layer_reasons"]:
        head = why.split(":")[0]
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{head} ({count})" for head, count in counts.items())


def _sqnr_cell(row: dict, prefix: str = "") -> str:
    """SQNR over the set (median sample's) / top-1 agreement."""
    median = row.get(f"{prefix}median_sample_sqnr_db")
    agreement = row.get(f"{prefix}top1_agreement")
    return (f"{row[prefix + 'sqnr_db']:.1f}" + (f" ({median:.1f})" if median is not None else "")
            + (f" / {agreement:.0%}" if agreement is not None else ""))


def _baseline_cell(row: dict) -> str:
    if "baseline_sqnr_db" in row:
        return _sqnr_cell(row, "baseline_")
    return row.get("baseline_error", "").split(":")[0]


def render_markdown() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    order = {name: index for index, name in enumerate(MODELS)}
    latest = {row["model"]: row for row in rows}  # a model measured again: its last row
    table = []
    for row in sorted(latest.values(), key=lambda r: order.get(r["model"], len(order))):
        failure = row.get("error") or row.get("fxq_error")
        baseline = _baseline_cell(row) if "baseline" in row else ""
        if failure:
            where = (row.get("fxq_package_frame") if row.get("fxq_stage") == "run" else "") or \
                row.get("fxq_fxq_frame") or row.get("fxq_raised_at", "")
            table.append([row["model"], row.get("input", ""), row.get("baseline", ""), baseline,
                          f"**crash** ({row.get('fxq_stage', 'process')}): {failure[:90]}"
                          + (f" (`{where}`)" if where else ""),
                          "", "", "", "", row.get("quantize_s", ""), "", "crash"])
            continue
        conversions = row["conversions"]
        table.append([
            row["model"], row["input"], row["baseline"], baseline, _sqnr_cell(row),
            f"{row['int8_layers']}/{row['int8_layers'] + row['float_layers']}",
            f"{conversions.get('quantize', 0)} / {conversions.get('dequantize', 0)}",
            f"{row['latency_ratio']:.2f}", f"{row['float_ms']:.1f} / {row['int8_ms']:.1f}", row["quantize_s"],
            _float_reasons(row), ", ".join(_missed_goals(row))])
    complete = [row for row in rows if "threads" in row]
    cpus = sorted({row["cpu"] for row in complete})
    threads = sorted({row["threads"] for row in complete})
    dates = sorted({row["date"] for row in complete})
    revisions = sorted({row.get("fxq", "unrecorded") for row in complete})
    policies = sorted({row.get("omp_wait_policy", "PASSIVE") for row in complete})
    header = (
        "# fxq on third-party models: timm, efficientnet_pytorch, ultralytics, transformers\n\n"
        f"{'; '.join(cpus)}, {', '.join(map(str, threads))} threads, torch {torch.__version__}, "
        f"{' to '.join(dict.fromkeys([dates[0], dates[-1]])) if dates else ''}, fxq at {', '.join(revisions)}. "
        "Command: "
        "`python -m bench.thirdparty --timeout 600`, then `python -m bench.thirdparty --markdown`; each model "
        f"in a process of its own, one at a time, OMP_WAIT_POLICY {', '.join(policies)} (as users run).\n\n"
        "Random weights (`pretrained=False`), zero-initialized weights re-drawn (timm's zero_init_last BN "
        "scales set to 1), BatchNorm statistics re-estimated on 16 photographic crops (bench/models.py's "
        "recipe); otherwise each package's own init (ConvNeXt-style layer scales stay 1e-6, so those residual "
        "branches are small). Image models at their native input size, fxq.quantize with defaults on "
        f"{CALIBRATION_IMAGES} calibration crops (batches of {CALIBRATION_BATCH}), SQNR of the logits against "
        f"float and top-1 agreement on {EVAL_IMAGES} evaluation crops, one at a time. ultralytics: YOLOv8n and "
        "YOLOv8n-seg built from their yaml files, SQNR of the raw head tensors (box distributions, class "
        "scores; mask coefficients and prototypes for -seg) joined. transformers: small "
        "configs (hidden 128, 2 layers, 4 heads), dict inputs (`input_ids`, `attention_mask`: random tokens, "
        f"{SEQUENCE_LENGTH} long with a padded tail; ViTModel `pixel_values` crops), SQNR of last_hidden_state; "
        "QAT rows run prepare_qat, forward passes on the calibration batches (no training steps), "
        "freeze_observers and convert. PyTorch's default is FX prepare/convert with the default x86 qconfig "
        "mapping for static and QAT rows (a failure shows its exception type), eager quantize_dynamic for "
        "dynamic rows. Latency: medians at batch 1, float and int8 timed alternately (paired) after warm-up; "
        "the ratio is steadier than the times, as this machine's speed drifts. Goals of issue 27: at least "
        f"{GOAL_INT8_FRACTION:.0%} of conv/linear calls int8, int8 latency "
        f"at most {GOAL_LATENCY_RATIO}x float, SQNR at or above PyTorch's; \"median sample\" is not a goal but "
        "tells how the SQNR over the set is made: a random-weight network gives a few crops logits far larger "
        "than the rest, and those crops make most of the error (bench/generalization.py). With 16 calibration "
        "crops fxq's tight activation ranges clip such crops, where PyTorch's 7-bit activations leave twice "
        "the range as headroom: the rows marked \"median sample: above\" (checked at 96x96 on resnet50d, "
        "hrnet_w18_small, mnasnet_100, mobilenetv3_large_100: with 64 calibration crops fxq's SQNR over the "
        "set is ahead on all four). vit_small and deit_small are one architecture, so the same seed gives "
        "the same weights and rows. Random deep networks amplify any perturbation, so low SQNRs say little "
        "about trained accuracy; compare the two flows.\n\n")
    body = tabulate(table, headers=[
        "model", "input", "PyTorch flow", "PyTorch SQNR dB (median sample) / top-1",
        "fxq SQNR dB (median sample) / top-1",
        "int8 conv/linear", "quantize / dequantize per call", "int8/float latency", "float / int8 ms",
        "fxq quantize s", "why layers stay float (count)", "goals missed"], tablefmt="pipe")
    return header + body + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated row names, e.g. timm/resnet50d (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", action="store_true", help="render bench/thirdparty.md from the results")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(MODELS[args.one], args.threads)))
        return
    if args.markdown:
        MARKDOWN.write_text(render_markdown())
        print(MARKDOWN.read_text())
        return
    names = args.models.split(",") if args.models else list(MODELS)
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    run_all(names, args.threads, args.timeout)


if __name__ == "__main__":
    main()
