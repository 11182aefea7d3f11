"""fxq's int8 models exported as ONNX QDQ (fxq.export_onnx), against each runtime's own int8 quantizer.

The accuracy issue's protocol (bench/protocol.py): ImageNet MobileNetV2 and ResNet-50 (torchvision, seeded
random weights, BatchNorm statistics re-estimated on photo crops: bench/models.py), 64 calibration crops
(seed 1), 256 evaluation crops (seed 2), logits computed 32 at a time. Rows per model: fxq's torch int8
model (defaults); its export in ONNX Runtime (CPU provider) and in OpenVINO (CPU), with onednn's conv +
residual add written each way (fxq/export/conv_add.py; "auto", which measures its choice in ONNX Runtime,
only there); ONNX Runtime's own `quantize_static` (QDQ, per-channel int8 weights, uint8 activations,
MinMax, after `quant_pre_process`) and OpenVINO's own `nncf.quantize` (default preset, one crop per
calibration item, bench/compare_flows.py) of the float model exported by torch.onnx.export; and each
runtime's float model for reference. Per row: logits SQNR against float (and for the exports, the
difference from the torch int8 model they were exported from), top-1 agreement with float, how many convs
run an int8 kernel in the runtime's optimized graph, batch-1 and batch-32 latency medians after warm-up
(the runners of one runtime timed in turns, one runtime after the other).

    OMP_WAIT_POLICY=PASSIVE python -m bench.onnx_runtimes [--models mobilenet_v2 resnet50] [--threads 2]
                                                          [--eval 256] [--markdown]
    (--markdown writes bench/onnx_runtimes.md; PASSIVE as in scripts/test.sh: on a shared machine torch's
    spinning OpenMP threads slow every runtime in the process)

OpenVINO rows need `openvino` (and `nncf` for its own int8 row); they say "not installed" otherwise.
OpenVINO's `CompiledModel.__call__` shares the caller's array by default and a later inference on another
request then wrote into it (measured: the evaluation crops changed under the bench); every call here
passes share_inputs=False.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tabulate import tabulate

import fxq
from bench.protocol import CALIBRATION_SEED, DATA_BATCH, EVAL_SEED, model_and_crops, sqnr_db, top1_agreement
from fxq.backend.engine import using_engine
from fxq.export import export_onnx
from fxq.report.latency import cpu_name, isa_limits

MARKDOWN = Path(__file__).resolve().with_name("onnx_runtimes.md")
EVAL_BATCH = 32  # logits are computed 32 at a time (the protocol's reference); the dynamic head depends on it
MODELS = ("mobilenet_v2", "resnet50")
ORT_INT8_CONVS = ("QLinearConv", "ConvInteger")
ORT_FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")

Runner = Callable[[np.ndarray], np.ndarray]  # float32 NCHW batch -> logits


# --- ONNX Runtime ---------------------------------------------------------------------------------------------

def ort_session(path: str | Path, threads: int = 2, optimized_path: str | Path | None = None) -> Any:
    """An ONNX Runtime CPU session with every graph optimization (QDQ fusion into int8 kernels) on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the NCHWc layout notice when the optimized graph is saved
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session: Any) -> Runner:
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def ort_optimized_ops(path: str | Path) -> collections.Counter:
    """Op types of the graph ONNX Runtime runs for `path` (its ORT_ENABLE_ALL optimized model)."""
    import onnx

    with tempfile.TemporaryDirectory() as directory:
        optimized = Path(directory) / "optimized.onnx"
        ort_session(path, optimized_path=optimized)
        return collections.Counter(node.op_type for node in onnx.load(optimized).graph.node)


def ort_int8_convs(ops: collections.Counter) -> str:
    int8 = sum(ops[op] for op in ORT_INT8_CONVS)
    return f"{int8}/{int8 + sum(ops[op] for op in ORT_FLOAT_CONVS)}"


def export_float_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The float model through torch.onnx.export (TorchScript exporter), batch dimension dynamic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def ort_quantize_static(float_path: Path, calibration: list[torch.Tensor], directory: Path) -> Path:
    """ONNX Runtime's own post-training quantization: QDQ, per-channel int8 weights, uint8 activations,
    MinMax ranges over the calibration batches."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": batch.numpy()} for batch in calibration])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    prepared, quantized = directory / "float_prepared.onnx", directory / "ort_static.onnx"
    quant_pre_process(str(float_path), str(prepared))
    quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return quantized


# --- OpenVINO -------------------------------------------------------------------------------------------------

def ov_compile(model_or_path: Any, threads: int = 2) -> Any:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY"})


def ov_runner(compiled: Any) -> Runner:
    request = compiled.create_infer_request()
    return lambda batch: request.infer(batch, share_inputs=False)[compiled.outputs[0]].copy()


def ov_int8_convs(compiled: Any) -> str:
    """'u8 or i8 convolutions / all convolutions' of the graph OpenVINO's CPU plugin runs."""
    infos = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
    precisions = [info["runtimePrecision"].astype(str) for info in infos
                  if "layerType" in info and info["layerType"].astype(str) == "Convolution"]
    return f"{sum(p in ('u8', 'i8') for p in precisions)}/{len(precisions)}"


def ov_nncf_quantize(float_path: Path, calibration: list[torch.Tensor]) -> Any:
    """OpenVINO's own int8 flow: nncf.quantize of the OpenVINO model, default preset, one crop per item."""
    import nncf
    import openvino as ov

    crops = [crop[None].numpy() for batch in calibration for crop in batch]
    return nncf.quantize(ov.Core().read_model(str(float_path)), nncf.Dataset(crops))


# --- measurement ----------------------------------------------------------------------------------------------

def logits(run: Runner, crops: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.from_numpy(np.asarray(run(batch.numpy().copy()))) for batch in crops.split(EVAL_BATCH)])


def latencies_ms(runners: dict[str, Runner], batch: np.ndarray, rounds: int, per_round: int = 3,
                 warmup: int = 3) -> dict[str, float]:
    """Median ms per call of each runner on `batch`, the runners timed in turns (a slow spell of the machine
    falls on all of them). Pass runners of one runtime at a time: each runtime's idle threads spin for a
    while after a call and take the cores of another's (torch's float MobileNetV2 at batch 1: 86 ms alone,
    139 ms right after ONNX Runtime calls, on this 2-core machine shared with other jobs).

    Each turn starts with one untimed call: a served model runs call after call on its own weights, in
    cache, while in turns the previous runner's weights (a float ResNet-50's 100 MB) have evicted them.
    Without it the first call of each turn was a third of the samples, and fxq's int8 ResNet-50 took 10.1 ms
    at batch 1 among the float rows against 6.7 ms timed in blocks of 20 calls."""
    for run in runners.values():
        for _ in range(warmup):
            run(batch)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            run(batch)
            for _ in range(per_round):
                start = time.perf_counter()
                run(batch)
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(samples)) for name, samples in times.items()}


def latencies_by_runtime(runners: dict[str, tuple[str, Runner]], batch: np.ndarray, rounds: int,
                         per_round: int) -> dict[str, float]:
    """`latencies_ms` for the runners of each runtime in turn, with a pause between runtimes for the
    previous one's threads to go idle."""
    medians: dict[str, float] = {}
    for runtime in dict.fromkeys(runtime for runtime, _ in runners.values()):
        time.sleep(1.0)
        medians |= latencies_ms({name: run for name, (owner, run) in runners.items() if owner == runtime}, batch,
                                rounds, per_round)
    return medians


def torch_runner(model: torch.nn.Module, engine: str | None = None) -> Runner:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            if engine is None:
                return model(torch.from_numpy(batch)).numpy()
            with using_engine(engine):
                return model(torch.from_numpy(batch)).numpy()
    return run


def _wait_policy() -> str:
    policy = os.environ.get("OMP_WAIT_POLICY")
    return f" (OMP_WAIT_POLICY={policy})" if policy else ""


def _runtime(row: str) -> str:
    return next(runtime for runtime in ("ONNX Runtime", "OpenVINO", "PyTorch") if runtime in row)


def model_rows(name: str, args: argparse.Namespace, directory: Path) -> tuple[list[list[str]], str]:
    """The table's rows for one model, and its data line."""
    has_openvino = importlib.util.find_spec("openvino") is not None
    has_nncf = importlib.util.find_spec("nncf") is not None
    model, calibration, evaluation, reference, weights = model_and_crops(name, 64, args.eval)
    example = evaluation[:1]
    directory = directory / name
    directory.mkdir()
    start = time.perf_counter()
    int8_model = fxq.quantize(model, (example,), calibration_data=calibration)
    print(f"{name}: fxq.quantize: {time.perf_counter() - start:.0f} s", flush=True)
    engine = fxq.summary_of(int8_model).engine
    start = time.perf_counter()
    exports = {"fused": export_onnx(int8_model, directory / "fxq_fused.onnx", example),
               "requantize": export_onnx(int8_model, directory / "fxq_requantize.onnx", example,
                                         conv_add="requantize", calibration_data=calibration)}
    print(f"{name}: exports 'fused' and 'requantize': {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    auto = export_onnx(int8_model, directory / "fxq_auto.onnx", example, conv_add="auto",
                       calibration_data=calibration)
    import onnx

    chosen = {prop.key: prop.value for prop in onnx.load(auto).metadata_props}["fxq.conv_add"]
    print(f"{name}: export 'auto' ({chosen}): {time.perf_counter() - start:.0f} s", flush=True)
    torch_row = f"fxq int8, PyTorch ({engine})"
    float_path = export_float_onnx(model, example, directory / "float.onnx")
    ort_static = ort_quantize_static(float_path, calibration, directory)

    # row name -> (runner, int8 convs in the runtime's graph, the torch row it exports, if it is an export)
    convs = sum(isinstance(module, torch.nn.Conv2d) for module in model.modules())
    int8_convs = sum("Conv" in type(module).__name__ and type(module).__module__.startswith("torch.ao.nn")
                     for module in int8_model.modules())
    rows: dict[str, tuple[Runner, str, str | None]] = {
        "PyTorch float (eager)": (torch_runner(model), f"0/{convs}", None),
        torch_row: (torch_runner(int8_model, engine), f"{int8_convs}/{convs}", None),
        "ONNX Runtime float": (ort_runner(ort_session(float_path, args.threads)), f"0/{convs}", None),
        "ONNX Runtime quantize_static (QDQ, per-channel, MinMax)":
            (ort_runner(ort_session(ort_static, args.threads)), ort_int8_convs(ort_optimized_ops(ort_static)), None),
    }
    for form, path in (exports | {"auto": auto}).items():
        rows[f"fxq export, conv_add='{form}', in ONNX Runtime"] = (
            ort_runner(ort_session(path, args.threads)), ort_int8_convs(ort_optimized_ops(path)), torch_row)
    missing = []
    if has_openvino:
        compiled_float = ov_compile(float_path, args.threads)
        rows["OpenVINO float"] = (ov_runner(compiled_float), ov_int8_convs(compiled_float), None)
        if has_nncf:
            compiled = ov_compile(ov_nncf_quantize(float_path, calibration), args.threads)
            rows["OpenVINO nncf.quantize (default preset)"] = (ov_runner(compiled), ov_int8_convs(compiled), None)
        else:
            missing.append("OpenVINO nncf.quantize (nncf not installed)")
        for form, path in exports.items():
            compiled = ov_compile(path, args.threads)
            rows[f"fxq export, conv_add='{form}', in OpenVINO"] = (ov_runner(compiled), ov_int8_convs(compiled), torch_row)
    else:
        missing.append("OpenVINO rows (openvino not installed)")

    runners = {row: (_runtime(row), runner) for row, (runner, _, _) in rows.items()}
    # batch 1 first: torch's onednn int8 kernels are rebuilt when the input shape changes (bench/accuracy.py)
    batch1 = latencies_by_runtime(runners, evaluation[:1].numpy().copy(), args.rounds, per_round=3)
    outputs = {row: logits(run, evaluation) for row, (_, run) in runners.items()}
    batch32 = latencies_by_runtime(runners, evaluation[:32].numpy().copy(), max(2, args.rounds // 2), per_round=1)
    table = []
    for row, (_, int8_convs, exported) in rows.items():
        table.append([f"{name}: {row}", f"{sqnr_db(reference, outputs[row]):.2f}",
                      f"{sqnr_db(reference, outputs[row]) - sqnr_db(reference, outputs[exported]):+.2f}"
                      if exported else "", f"{100 * top1_agreement(reference, outputs[row]):.1f}%", int8_convs,
                      f"{batch1[row]:.2f}", f"{batch32[row]:.1f}"])
    table += [[f"{name}: {row}", "-", "", "-", "-", "-", "-"] for row in missing]
    return table, f"{name} ({weights})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds (3 calls per runner each)")
    parser.add_argument("--markdown", action="store_true", help=f"also write {MARKDOWN.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = Path(tempfile.mkdtemp(prefix="fxq-onnx-runtimes-"))
    table, described = [], []
    for name in args.models:
        rows, description = model_rows(name, args, directory)
        table += rows
        described.append(description)
    headers = ["model: flow, runtime", "logits SQNR dB vs float", "vs its torch model (dB)", "top-1 agreement",
               "int8 convs", "batch 1 ms", "batch 32 ms"]
    import onnxruntime

    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        versions += f", openvino {openvino.__version__.split('-')[0]}"
    if importlib.util.find_spec("nncf") is not None:
        import nncf

        versions += f", nncf {nncf.__version__}"
    header = (f"{'; '.join(described)}; {args.eval} eval crops (seed {EVAL_SEED}), 64 calibration crops "
              f"(seed {CALIBRATION_SEED}, batches of {DATA_BATCH}), logits {EVAL_BATCH} at a time; CPU: {cpu_name()}"
              f"{isa_limits()}, {args.threads} threads{_wait_policy()}; {versions}; {datetime.date.today()}")
    print("\n" + header)
    print(tabulate(table, headers=headers, tablefmt="simple"))
    if args.markdown:
        command = (f"{'OMP_WAIT_POLICY=PASSIVE ' if _wait_policy() else ''}python -m bench.onnx_runtimes "
                   f"--models {' '.join(args.models)} --markdown")
        MARKDOWN.write_text(f"# fxq's ONNX export against each runtime's own int8 quantizer\n\n{header}.\n"
                            f"`{command}`; latencies are medians after warm-up, the runners of one runtime timed "
                            "in turns, one runtime after the other. \"vs its torch model\" is the export's SQNR "
                            "against float minus that of the fxq torch model it was exported from. Design notes: "
                            "docs/design/onnx-export.md.\n\n"
                            + tabulate(table, headers=headers, tablefmt="github") + "\n")


if __name__ == "__main__":
    main()
