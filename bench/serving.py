"""Issue 29's serving table: one model served six ways on this CPU, accuracy and latency side by side.

Models: ImageNet MobileNetV2 (bench/protocol.py's mobilenet_protocol) and ResNet-50 (torchvision, seeded
random weights, BatchNorm statistics re-estimated on photo crops: bench/models.py's build). Rows:

- float eager;
- torch.compile of the float model (default inductor mode, dynamic=False: one graph per batch size, each
  compiled and warmed up before any timing; a failed or capped compile is the row's reason);
- fxq's returned module: `fxq.quantize(model, (example,), calibration_data=calibration)`, run as returned;
- fxq's TorchScript: that module through `fxq.save` and `fxq.load`;
- fxq's int8 model in OpenVINO and in ONNX Runtime: `fxq.export_onnx` (conv_add='fused' for OpenVINO, whose
  conv + add kernel takes it; 'auto' for ONNX Runtime, bench/onnx_runtimes.py), compiled / loaded there;
- OpenVINO int8: `nncf.quantize` (defaults) of the OpenVINO model read from torch.onnx.export's file,
  compiled for CPU;
- ONNX Runtime int8: `quantize_static` (QDQ, per-channel) of the same file, CPU provider.

The ONNX Runtime and OpenVINO flows are bench/onnx_runtimes.py's. Per row: logits SQNR against float
eager and top-1 agreement on the evaluation crops (seed 2; logits 32 at a time), batch-1 and batch-32
latency (medians after warm-up), batch 1 again after the batch-32 timings for the fxq rows (onednn builds
its int8 kernels for the first input shape it sees), and the seconds from the float model to a runnable
one (quantize, export, save/load or compile; torch.compile's seconds are cold only when inductor's cache
is: a warm cache turned MobileNetV2's 86 s into 6 s here, see bench/suite.py). Every runtime gets `--threads` threads (torch.set_num_threads,
ONNX Runtime intra_op_num_threads, OpenVINO INFERENCE_NUM_THREADS), with the runtimes' own thread
settings (OMP_WAIT_POLICY is left as the user has it). All rows of a model are timed in one process: the
rows of one runtime interleaved (each round calls every row in turn), the runtimes one after the other with
a pause between (bench/onnx_runtimes.py's latencies_by_runtime), because a runtime's spinning threads take
the cores of the next one's calls. (This bench's first run interleaved every row under
OMP_WAIT_POLICY=PASSIVE: fxq's MobileNetV2 TorchScript took 9.4 ms at batch 1 there, 2.3 ms timed alone.)

    python -m bench.serving [--models mobilenet_v2 resnet50] [--threads 2] [--calibration 64 --eval 256]
                            [--rounds 10] [--markdown]
    python -m bench.serving --quick     # smoke run: 16 calibration and 32 evaluation crops, 2 rounds
    (--markdown writes bench/serving.md)
"""

from __future__ import annotations

import os


import argparse
import copy
import datetime
import importlib.util
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

import fxq
from bench.onnx_runtimes import (EVAL_BATCH, Runner, export_float_onnx, latencies_by_runtime, latencies_ms, logits,
                                 ort_quantize_static,
                                 ort_runner, ort_session, ov_compile, ov_nncf_quantize, ov_runner, torch_runner)
from bench.protocol import (CALIBRATION_SEED, EVAL_SEED, model_and_crops, sqnr_db, top1_agreement)
from bench.suite import Failure, attempt, compile_first_call, timed
from fxq.export import export_onnx
from fxq.report.latency import cpu_name, isa_limits

warnings.filterwarnings("ignore")

MARKDOWN = Path(__file__).resolve().with_name("serving.md")
MODELS = ("mobilenet_v2", "resnet50")
FLOAT, COMPILE, FXQ, FXQ_SCRIPT, OPENVINO, ORT = (
    "float eager", "torch.compile float (inductor)", "fxq returned module", "fxq TorchScript (save + load)",
    "OpenVINO int8 (nncf.quantize)", "ONNX Runtime int8 (quantize_static QDQ, per-channel)")
FXQ_OPENVINO, FXQ_ORT = ("fxq int8 exported (export_onnx, conv_add='fused') in OpenVINO",
                         "fxq int8 exported (export_onnx, conv_add='auto') in ONNX Runtime")
# every other row runs on torch
RUNTIME = {OPENVINO: "openvino", ORT: "onnxruntime", FXQ_OPENVINO: "openvino", FXQ_ORT: "onnxruntime"}
AFTER_BATCH32 = (FXQ, FXQ_SCRIPT)  # rows timed at batch 1 again after batch 32 (onednn's per-shape kernels)
QUICK = {"calibration": 16, "eval": 32, "rounds": 2, "warmup": 1}


@dataclass
class Row:
    """One way of serving a model: its runner (or why it has none) and what it cost to build."""

    flow: str
    runner: Runner | Failure
    build_s: float | None = None
    build_note: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)  # "batch 1", "batch 32", "batch 1 after 32"
    sqnr_db: float | None = None
    top1: float | None = None


def fxq_rows(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], directory: Path,
             threads: int, failures: list[Failure], name: str) -> list[Row]:
    """fxq's returned module, its TorchScript form through fxq.save / fxq.load, and the same int8 model
    exported as ONNX QDQ and run by OpenVINO (conv_add='fused', its own conv + add kernel) and by ONNX Runtime
    (conv_add='auto'), as bench/onnx_runtimes.py measures them."""
    outcome = attempt(failures, name, FXQ, "quantize",
                      lambda: timed(lambda: fxq.quantize(model, (example,), calibration_data=calibration)))
    if isinstance(outcome, Failure):
        return [Row(flow, outcome) for flow in (FXQ, FXQ_SCRIPT, FXQ_OPENVINO, FXQ_ORT)]
    quantized, seconds = outcome
    summary = fxq.summary_of(quantized)
    note = f"engine {summary.engine}" + (f", {len(summary.float_layers)} layers float" if summary.float_layers else "")
    path = directory / f"{name}.fxq.pt"
    loaded = attempt(failures, name, FXQ_SCRIPT, "save + load",
                     lambda: timed(lambda: fxq.load(fxq.save(quantized, path, (example,)))))
    script_row = Row(FXQ_SCRIPT, loaded) if isinstance(loaded, Failure) else Row(
        FXQ_SCRIPT, torch_runner(loaded[0]), seconds + loaded[1], f"quantize + {loaded[1]:.1f} s save/load")
    return [Row(FXQ, torch_runner(quantized), seconds, note), script_row] + exported_rows(
        quantized, seconds, example, calibration, directory, threads, failures, name)


def exported_rows(quantized: nn.Module, quantize_s: float, example: torch.Tensor, calibration: list[torch.Tensor],
                  directory: Path, threads: int, failures: list[Failure], name: str) -> list[Row]:
    """fxq's int8 model exported as ONNX QDQ, compiled by OpenVINO and loaded by ONNX Runtime."""
    rows = []
    if importlib.util.find_spec("openvino") is None:
        rows.append(Row(FXQ_OPENVINO, Failure(name, FXQ_OPENVINO, "import", "openvino not installed", "")))
    else:
        built = attempt(failures, name, FXQ_OPENVINO, "export + compile", lambda: timed(lambda: ov_compile(
            export_onnx(quantized, directory / f"{name}.fxq_fused.onnx", example), threads)))
        rows.append(Row(FXQ_OPENVINO, built) if isinstance(built, Failure) else Row(
            FXQ_OPENVINO, ov_runner(built[0]), quantize_s + built[1], f"quantize + {built[1]:.1f} s export, compile"))
    built = attempt(failures, name, FXQ_ORT, "export + session", lambda: timed(lambda: ort_session(export_onnx(
        quantized, directory / f"{name}.fxq_auto.onnx", example, conv_add="auto", calibration_data=calibration),
        threads)))
    rows.append(Row(FXQ_ORT, built) if isinstance(built, Failure) else Row(
        FXQ_ORT, ort_runner(built[0]), quantize_s + built[1], f"quantize + {built[1]:.1f} s export, session"))
    return rows


def onnx_rows(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], directory: Path,
              threads: int, failures: list[Failure], name: str) -> list[Row]:
    """OpenVINO's and ONNX Runtime's own int8 flows, both from one torch.onnx.export of the float model."""
    # the TorchScript exporter can leave the model it traced changed (bench/minilm.py): export a copy
    exported = attempt(failures, name, "ONNX", "torch.onnx.export", lambda: timed(
        lambda: export_float_onnx(copy.deepcopy(model), example, directory / f"{name}.onnx")))
    if isinstance(exported, Failure):
        return [Row(OPENVINO, exported), Row(ORT, exported)]
    float_path, export_s = exported
    note = f"incl. {export_s:.1f} s torch.onnx.export"
    rows = []
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
        rows.append(Row(OPENVINO, Failure(name, OPENVINO, "import", "openvino or nncf not installed", "")))
    else:
        compiled = attempt(failures, name, OPENVINO, "nncf.quantize", lambda: timed(
            lambda: ov_compile(ov_nncf_quantize(float_path, calibration), threads)))
        rows.append(Row(OPENVINO, compiled) if isinstance(compiled, Failure) else
                    Row(OPENVINO, ov_runner(compiled[0]), export_s + compiled[1], note))
    session = attempt(failures, name, ORT, "quantize_static", lambda: timed(
        lambda: ort_session(ort_quantize_static(float_path, calibration, directory), threads)))
    rows.append(Row(ORT, session) if isinstance(session, Failure) else
                Row(ORT, ort_runner(session[0]), export_s + session[1], note))
    return rows


def compile_row(model: nn.Module, batches: list[torch.Tensor], timeout_s: int, failures: list[Failure],
                name: str) -> Row:
    """torch.compile of the float model, compiled (first call) at every batch size it will be timed at."""
    compiled = torch.compile(model, dynamic=False)

    def compile_all() -> float:
        return sum(compile_first_call(compiled, batch, timeout_s) for batch in batches)

    seconds = attempt(failures, name, COMPILE, "compile", compile_all)
    if isinstance(seconds, Failure):
        return Row(COMPILE, seconds)
    return Row(COMPILE, torch_runner(compiled), seconds, f"compile at batch {', '.join(str(len(b)) for b in batches)}")


def measure(rows: list[Row], evaluation: torch.Tensor, reference: torch.Tensor, args: argparse.Namespace) -> None:
    """Latencies, then logits SQNR and top-1 agreement, of every row that has a runner (in place).

    Order: batch 1 (every row, interleaved), the evaluation logits (batches of 32), batch 32, then batch 1
    again for AFTER_BATCH32 and float eager (its pair, so a change of machine load shows)."""
    runners = {row.flow: row.runner for row in rows if not isinstance(row.runner, Failure)}
    by_runtime = {flow: (RUNTIME.get(flow, "torch"), run) for flow, run in runners.items()}
    single, full = evaluation[:1].numpy().copy(), evaluation[:EVAL_BATCH].numpy().copy()
    batch1 = latencies_by_runtime(by_runtime, single, args.rounds, per_round=3)
    outputs = {flow: logits(run, evaluation) for flow, run in runners.items()}
    batch32 = latencies_by_runtime(by_runtime, full, max(2, args.rounds // 2), per_round=1)
    again = latencies_ms({flow: run for flow, run in runners.items() if flow in AFTER_BATCH32 + (FLOAT,)}, single,
                         args.rounds, per_round=3, warmup=args.warmup)
    for row in rows:
        if row.flow in runners:
            row.latency_ms = {"batch 1": batch1[row.flow], "batch 32": batch32[row.flow]}
            if row.flow in again:
                row.latency_ms["batch 1 after 32"] = again[row.flow]
            row.sqnr_db = sqnr_db(reference, outputs[row.flow])
            row.top1 = top1_agreement(reference, outputs[row.flow])


def benchmark(name: str, args: argparse.Namespace, failures: list[Failure]) -> tuple[list[Row], str]:
    """Every row of one model, measured; and a line describing the model."""
    model, calibration, evaluation, reference, weights = model_and_crops(name, args.calibration, args.eval)
    example = evaluation[:1]
    with tempfile.TemporaryDirectory(prefix="fxq-serving-") as name_dir:
        directory = Path(name_dir)
        print(f"{name}: fxq.quantize", flush=True)
        rows = [Row(FLOAT, torch_runner(model))] + fxq_rows(model, example, calibration, directory, args.threads,
                                                                   failures, name)
        print(f"{name}: OpenVINO and ONNX Runtime int8", flush=True)
        rows += onnx_rows(model, example, calibration, directory, args.threads, failures, name)
        print(f"{name}: torch.compile", flush=True)
        rows.insert(1, compile_row(model, [evaluation[:1], evaluation[:EVAL_BATCH]], args.compile_timeout, failures,
                                   name))
        print(f"{name}: timing", flush=True)
        measure(rows, evaluation, reference, args)
    return rows, f"{name} ({weights})"


def table_rows(model_line: str, rows: list[Row]) -> list[list[str]]:
    float_ms = next(row.latency_ms for row in rows if row.flow == FLOAT)

    def latency(row: Row, key: str, base: str) -> str:
        if isinstance(row.runner, Failure):
            return str(row.runner)
        if key not in row.latency_ms:
            return ""
        digits = 1 if base == "batch 32" else 2
        return f"{row.latency_ms[key]:.{digits}f} ({row.latency_ms[key] / float_ms[base]:.2f}x)"

    cells = []
    for row in rows:
        failed = isinstance(row.runner, Failure)
        cells.append([model_line, row.flow,
                      "-" if failed else f"{row.sqnr_db:.2f}", "-" if failed else f"{100 * row.top1:.1f}%",
                      latency(row, "batch 1", "batch 1"), "-" if failed else latency(row, "batch 32", "batch 32"),
                      "-" if failed else latency(row, "batch 1 after 32", "batch 1 after 32"),
                      "" if row.build_s is None else f"{row.build_s:.1f}" + (f" ({row.build_note})" if row.build_note else "")])
    return cells


HEADERS = ["model", "flow", "logits SQNR dB vs float", "top-1 agreement", "batch 1 ms (vs float)",
           f"batch {EVAL_BATCH} ms (vs float)", "batch 1 after batch 32 ms", "quantize / compile s"]


def versions() -> str:
    import onnxruntime

    names = [f"torch {torch.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    if importlib.util.find_spec("openvino") is not None:
        import openvino

        names.append(f"openvino {openvino.__version__.split('-')[0]}")
    if importlib.util.find_spec("nncf") is not None:
        import nncf

        names.append(f"nncf {nncf.__version__}")
    return ", ".join(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=64, help="calibration crops (seed 1)")
    parser.add_argument("--eval", type=int, default=256, help=f"evaluation crops (seed 2), a multiple of {EVAL_BATCH}")
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds (batch 1: 3 calls per row each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per row before each timing")
    parser.add_argument("--compile-timeout", type=int, default=600, help="cap in s on each torch.compile")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{key}={value}" for key, value in QUICK.items()))
    parser.add_argument("--markdown", action="store_true", help=f"also write {MARKDOWN.name}")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.eval % EVAL_BATCH:
        parser.error(f"--eval must be a multiple of {EVAL_BATCH}: torch.compile is warmed up at batch {EVAL_BATCH} only")
    torch.set_num_threads(args.threads)

    failures: list[Failure] = []
    table = []
    for name in args.models:
        rows, model_line = benchmark(name, args, failures)
        table += table_rows(model_line, rows)
    header = (f"{args.calibration} calibration crops (seed {CALIBRATION_SEED}), {args.eval} evaluation crops "
              f"(seed {EVAL_SEED}), logits {EVAL_BATCH} at a time; CPU: {cpu_name()}{isa_limits()}, "
              f"{args.threads} threads for every runtime (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); "
              f"{versions()}; {datetime.date.today()}")
    print("\n" + header)
    print(tabulate(table, headers=HEADERS, tablefmt="simple"))
    for failure in failures:
        print(f"\n{failure.model} {failure.flow} {failure.stage}: {failure.reason}\n{failure.traceback_tail}")
    if args.markdown:
        MARKDOWN.write_text(
            f"# Serving int8 models: fxq against torch.compile, OpenVINO and ONNX Runtime\n\n{header}.\n\n"
            f"`python -m bench.serving --markdown{' --quick' if args.quick else ''}`; latencies are medians after "
            f"warm-up, every row of a model timed interleaved in one process (batch 1: {args.rounds} rounds of 3 "
            f"calls; batch {EVAL_BATCH}: {max(2, args.rounds // 2)} rounds of 1; each turn after one untimed call, "
            "as a served model has its weights in cache), the ratio against float eager "
            "timed in the same rounds. Method: bench/serving.py's docstring.\n\n"
            + tabulate(table, headers=HEADERS, tablefmt="github") + "\n"
            + "".join(f"\n- {failure.model} {failure.flow} {failure.stage}: {failure.reason}" for failure in failures)
            + ("\n" if failures else ""))


if __name__ == "__main__":
    main()
