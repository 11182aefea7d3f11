"""Benchmark suite (issue 5): float eager, float torch.compile, native FX int8 and fxq int8 on six torchvision
models, batch 1 and 32, 2 threads; writes bench/results.md.

    python -m bench.suite [--models resnet18 ...] [--batch-sizes 1 32] [--repeats 10] [--out bench/results.md]
    python -m bench.suite --quick --out /tmp/results.md      # smoke run: resnet18 at 64x64, 1 repeat, no compile

Per model: latency ratios against float eager (float eager and the other model timed alternately by
fxq.report.latency, medians after warm-up), serialized size ratios, logits SQNR against float on real
scikit-image crops (bench/protocol.py), and quantization wall time. Every model has random weights
(torch.manual_seed(0)) except mobilenet_v2, which loads torchvision's ImageNet checkpoint; the random models'
BatchNorm statistics are taken from crops (see reestimate_batchnorm; --init-bn keeps torchvision's). A flow
that fails on a model (torch.compile, native FX or fxq) is recorded in its cells as 'failed: reason' and its
traceback tail goes under '## Failures'; the run goes on. The contents of bench/coverage.md, when that file exists,
are appended under '## Coverage'.

OMP_WAIT_POLICY defaults to PASSIVE when the suite runs (`python -m bench.suite`; set before torch loads
OpenMP, and not for modules that import this one): on a machine shared with other jobs,
OpenMP threads that busy-wait at every barrier make 2-thread runs 5-10x slower (see
bench/experiments/bench_sensitivity.py).
"""

from __future__ import annotations

import os

import tempfile

# only when run as the suite: bench/serving.py imports this module and leaves the runtimes' settings alone
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch.compile times are cold-cache times: inductor gets an empty cache directory for the run unless the
# caller chose one (a warm cache turned this machine's 35-119 s compiles into 2-9 s).
FRESH_INDUCTOR_CACHE = __name__ == "__main__" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
if FRESH_INDUCTOR_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxq-suite-inductor-")

import argparse
import copy
import datetime
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torchvision
from tabulate import tabulate
from torch import nn

import fxq
from bench.protocol import (CALIBRATION_SEED, DATA_BATCH, EVAL_SEED, NATIVE_ENGINE, calibration_batches,
                            evaluation_crops, native_fx_default)
from fxq.backend.engine import using_engine
from fxq.report.latency import cpu_name, isa_limits, measure_latency, resize_batch
from fxq.report.report import compare_size, measure_error
from fxq.samples import pretrained_mobilenet_v2, random_crops

warnings.filterwarnings("ignore")

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0")
# Models with real weights; every other model is torchvision's random init under torch.manual_seed(0)
# (BatchNorm statistics from crops unless --init-bn).
PRETRAINED: dict[str, Callable[[], nn.Module]] = {"mobilenet_v2": pretrained_mobilenet_v2}
COMPILE, NATIVE, FXQ = "torch.compile", "native FX int8", "fxq int8"
# The BatchNorm statistics of random models come from a third draw of crops, disjoint from the protocol's
# calibration (seed 1) and evaluation (seed 2) crops.
BATCHNORM_SEED = 3
# --quick: a smoke run small enough for the test suite.
QUICK = dict(models=["resnet18"], batch_sizes=[1], repeats=1, warmup=1, resolution=64, calibration=8, eval=8,
             compile_timeout=0)
FULL = dict(models=list(MODELS), batch_sizes=[1, 32], repeats=10, warmup=3, resolution=224, calibration=32,
            eval=64, compile_timeout=300)


@dataclass
class Failure:
    """A flow that raised on a model: one line for the table cell, the traceback tail for the report."""

    model: str
    flow: str
    stage: str
    reason: str
    traceback_tail: str

    def __str__(self) -> str:
        return f"failed: {self.reason}"


@dataclass
class ModelResult:
    name: str
    weights: str
    float_mb: float | Failure | None = None
    quantize_s: dict[str, float | Failure] = field(default_factory=dict)
    sqnr_db: dict[str, float | Failure] = field(default_factory=dict)
    size_ratio: dict[str, float | Failure] = field(default_factory=dict)
    fxq_engine: str | Failure | None = None
    fxq_simulation_s: float | None = None
    compile_s: dict[int, float | Failure | str] = field(default_factory=dict)
    # batch size -> {"float eager ms": ..., flow: int8-or-compiled / eager median ratio, "fxq int8 ms": ...}
    latency: dict[int, dict[str, Any]] = field(default_factory=dict)


class CompileTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise CompileTimeout in the main thread after `seconds` (inductor compiles can run for many minutes)."""
    def raise_timeout(signum: int, frame: Any) -> None:
        raise CompileTimeout(f"compile exceeded the {seconds} s cap")

    previous = signal.signal(signal.SIGALRM, raise_timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def attempt(failures: list[Failure], model: str, flow: str, stage: str, run: Callable[[], Any]) -> Any:
    """run(), or a Failure recorded in `failures` (and printed) when it raises."""
    try:
        return run()
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        reason = f"{type(exc).__name__}: {first_line}"[:160]
        tail = "\n".join([line for line in traceback.format_exc().splitlines() if line.strip()][-12:])
        failure = Failure(model, flow, stage, reason, tail)
        failures.append(failure)
        print(f"  {flow} {stage}: {failure}", flush=True)
        return failure


def reestimate_batchnorm(model: nn.Module, crops: torch.Tensor) -> None:
    """Replace the BatchNorm running statistics with those of `crops`; weights stay as they are.

    With torchvision's initial statistics (mean 0, variance 1) the activations of a deep random net shrink
    layer after layer: measured float logits of about 2e-10 (mobilenet_v3_large) and 2e-14 (efficientnet_b0)
    on the crops, which both int8 flows output as exact zeros (SQNR 0 dB). Statistics taken from data give
    every layer unit-scale inputs, as training would.
    """
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    with torch.no_grad():
        for batch in crops.split(DATA_BATCH):
            model(batch)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
        bn.eval()


def build_float_model(name: str, batchnorm_crops: torch.Tensor | None) -> tuple[nn.Module, str]:
    """The float model in eval mode and a label for its weights; random models get BN statistics from
    `batchnorm_crops` unless it is None."""
    if name in PRETRAINED:
        return PRETRAINED[name](), "ImageNet"
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    if batchnorm_crops is None:
        return model, "random"
    reestimate_batchnorm(model, batchnorm_crops)
    return model, "random, BN from crops"


def timed(run: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def latency_ratio(float_model: nn.Module, other: nn.Module, inputs: torch.Tensor, batch_size: int,
                  args: argparse.Namespace) -> tuple[float, float, float]:
    """(float median ms, other median ms, other / float) with the two timed alternately."""
    (row,) = measure_latency(float_model, other, (inputs,), batch_sizes=(batch_size,), threads=args.threads,
                             warmup=args.warmup, repeats=args.repeats)
    return row.float_median_ms, row.int8_median_ms, row.int8_median_ms / row.float_median_ms


def compile_first_call(compiled: nn.Module, inputs: torch.Tensor, seconds: int) -> float:
    """Wall time of the first call of a torch.compile'd model (the compilation), capped at `seconds`."""
    start = time.perf_counter()
    try:
        with time_limit(seconds), torch.inference_mode():
            compiled(inputs)
    except BaseException as exc:
        # Drop half-built caches and stop compile workers still running g++, which would otherwise steal
        # the CPU from the timings that follow.
        torch._dynamo.reset()
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
        if "CompileTimeout" in repr(exc):  # inductor wraps exceptions raised inside it
            raise CompileTimeout(f"compile exceeded the {seconds} s cap") from exc
        raise
    return time.perf_counter() - start


def benchmark_model(name: str, calibration: list[torch.Tensor], evaluation: torch.Tensor,
                    batchnorm_crops: torch.Tensor | None, args: argparse.Namespace,
                    failures: list[Failure]) -> ModelResult:
    model, weights = build_float_model(name, batchnorm_crops)
    result = ModelResult(name, weights)
    eval_batches = list(evaluation.split(DATA_BATCH))
    example = (calibration[0][:1],)

    print(f"{name}: native FX", flush=True)
    native = attempt(failures, name, NATIVE, "quantize", lambda: timed(lambda: native_fx_default(model, calibration)))
    print(f"{name}: fxq", flush=True)
    quantized = attempt(failures, name, FXQ, "quantize",
                        lambda: timed(lambda: fxq.quantize(model, example, calibration_data=calibration)))
    int8_models: dict[str, tuple[nn.Module | Failure, str | None]] = {}
    for flow, outcome in ((NATIVE, native), (FXQ, quantized)):
        if isinstance(outcome, Failure):
            result.quantize_s[flow] = result.sqnr_db[flow] = result.size_ratio[flow] = outcome
            int8_models[flow] = (outcome, None)
            continue
        int8_model, result.quantize_s[flow] = outcome
        if flow == FXQ:
            summary = fxq.summary_of(int8_model)
            engine = summary.engine
            result.fxq_engine, result.fxq_simulation_s = engine, summary.timings_s.get("simulation_pass")
            print(f"  fxq steps (s): {summary.timings_s}, engine {engine}", flush=True)
        else:
            engine = NATIVE_ENGINE
        int8_models[flow] = (int8_model, engine)
        with using_engine(engine):
            error = attempt(failures, name, flow, "SQNR", lambda: measure_error(model, int8_model, eval_batches))
            result.sqnr_db[flow] = error if isinstance(error, Failure) else error.sqnr_db
            size = attempt(failures, name, flow, "serialize", lambda: compare_size(model, int8_model))
            result.size_ratio[flow] = size if isinstance(size, Failure) else size.ratio
            if not isinstance(size, Failure):
                result.float_mb = size.float_mb
        print(f"  {flow}: quantize {result.quantize_s[flow]:.1f} s, SQNR {result.sqnr_db[flow]}, "
              f"size ratio {result.size_ratio[flow]}", flush=True)

    compiled = torch.compile(model, dynamic=False) if args.compile_timeout > 0 else None
    compile_failure: Failure | None = None
    for batch_size in args.batch_sizes:
        inputs = resize_batch((evaluation,), batch_size)[0]
        row: dict[str, Any] = {}
        eager_ms: list[float] = []
        if compiled is None:
            result.compile_s[batch_size] = row[COMPILE] = "skipped"
        elif compile_failure is not None:  # the same cause would fail again: do not pay the cap twice
            result.compile_s[batch_size] = row[COMPILE] = compile_failure
        else:
            print(f"{name}: torch.compile batch {batch_size}", flush=True)
            seconds = attempt(failures, name, COMPILE, f"compile (batch {batch_size})",
                              lambda: compile_first_call(compiled, inputs, args.compile_timeout))
            result.compile_s[batch_size] = seconds
            if isinstance(seconds, Failure):
                compile_failure = row[COMPILE] = seconds
            else:
                timing = attempt(failures, name, COMPILE, f"latency (batch {batch_size})",
                                 lambda: latency_ratio(model, compiled, inputs, batch_size, args))
                row[COMPILE] = timing if isinstance(timing, Failure) else timing[2]
                if not isinstance(timing, Failure):
                    eager_ms.append(timing[0])
        for flow, (int8_model, engine) in int8_models.items():
            if isinstance(int8_model, Failure):
                row[flow] = int8_model
                continue
            print(f"{name}: {flow} latency batch {batch_size}", flush=True)
            with using_engine(engine):
                # a fresh copy per batch size: copying re-packs the int8 weights, and onednn (x86's convs
                # too, with VNNI) keeps the kernel built for the first input shape it sees and rebuilds it
                # on every call of another shape (fxq.backend.engine.repack_weights)
                fresh = copy.deepcopy(int8_model)
                timing = attempt(failures, name, flow, f"latency (batch {batch_size})",
                                 lambda: latency_ratio(model, fresh, inputs, batch_size, args))
            row[flow] = timing if isinstance(timing, Failure) else timing[2]
            if not isinstance(timing, Failure):
                eager_ms.append(timing[0])
                if flow == FXQ:
                    row["fxq int8 ms"] = timing[1]
        row["float eager ms"] = float(torch.tensor(eager_ms).median()) if eager_ms else None
        result.latency[batch_size] = row
        print(f"  batch {batch_size}: {row}", flush=True)
    if compiled is not None:
        torch._dynamo.reset()
    return result


# --- markdown -----------------------------------------------------------------------------------------

def cell(value: Any, spec: str) -> str:
    """A table cell: a number in `spec`, 'failed: reason' (no pipes or newlines), '-' when absent."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return " ".join(str(value).replace("|", "/").split())


def latency_table(results: list[ModelResult]) -> str:
    headers = ["model", "weights", "batch", "float eager ms", f"{COMPILE} / eager", f"{NATIVE} / eager",
               f"{FXQ} / eager", "fxq int8 ms"]
    rows = [[r.name, r.weights, batch, cell(row.get("float eager ms"), ".2f"), cell(row.get(COMPILE), ".2f"),
             cell(row.get(NATIVE), ".2f"), cell(row.get(FXQ), ".2f"), cell(row.get("fxq int8 ms"), ".2f")]
            for r in results for batch, row in r.latency.items()]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def model_table(results: list[ModelResult], batch_sizes: list[int]) -> str:
    headers = ["model", "weights", f"{NATIVE} SQNR dB", f"{FXQ} SQNR dB", "float MB", f"{NATIVE} size / float",
               f"{FXQ} size / float", f"{NATIVE} quantize s", f"{FXQ} quantize s", "fxq simulation pass s", "fxq engine"]
    headers += [f"{COMPILE} s (batch {b})" for b in batch_sizes]
    rows = [[r.name, r.weights, cell(r.sqnr_db.get(NATIVE), ".2f"), cell(r.sqnr_db.get(FXQ), ".2f"),
             cell(r.float_mb, ".2f"), cell(r.size_ratio.get(NATIVE), ".3f"), cell(r.size_ratio.get(FXQ), ".3f"),
             cell(r.quantize_s.get(NATIVE), ".1f"), cell(r.quantize_s.get(FXQ), ".1f"),
             cell(r.fxq_simulation_s, ".1f"), cell(r.fxq_engine, "")]
            + [cell(r.compile_s.get(b), ".0f") for b in batch_sizes] for r in results]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def compiler_description() -> str:
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        return "no C++ compiler found (inductor cannot build CPU kernels)"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()
    return f"{compiler} ({version[0] if version else 'unknown version'})"


def source_state() -> str:
    """The commit the run used and any uncommitted changes under fxq/ (others edit the same tree)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *command], capture_output=True, text=True,
                                  timeout=30).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "fxq").splitlines()]
    return f"fxq at commit {commit}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


def render(results: list[ModelResult], failures: list[Failure], args: argparse.Namespace, started: datetime.datetime,
           seconds: float, load_before: float, load_after: float, source: str) -> str:
    command = "python -m bench.suite" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [
        "# fxq benchmark suite" + (" (quick smoke run, not a measurement)" if args.quick else ""),
        "",
        f"`{command}` on {started:%Y-%m-%d}: CPU {cpu_name()}{isa_limits()} ({os.cpu_count()} logical cores), "
        f"{torch.get_num_threads()} threads (torch.set_num_threads), torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"{source}. "
        f"Total run time {seconds / 60:.1f} min. The machine was shared with other jobs (1-min load average "
        f"{load_before:.1f} at the start, {load_after:.1f} at the end), so latencies are noisy.",
        "",
        "- Weights: random init (torch.manual_seed(0)) for every model except mobilenet_v2, which has "
        "torchvision's ImageNet weights (column `weights`). "
        + ("Random models keep torchvision's initial BatchNorm statistics (--init-bn). " if args.init_bn else
           f"Random models get their BatchNorm running statistics from {args.calibration} other crops (seed "
           f"{BATCHNORM_SEED}): with torchvision's initial statistics the activations vanish layer after layer "
           f"(logits ~2e-10 in mobilenet_v3_large, ~2e-14 in efficientnet_b0) and both int8 flows output "
           f"zeros. ")
        + "SQNR on random weights says how faithfully int8 follows float, not how a trained model would fare.",
        f"- Data: {args.calibration} calibration crops (seed {CALIBRATION_SEED}, in batches of {DATA_BATCH}) and "
        f"{args.eval} evaluation crops (seed {EVAL_SEED}), {args.resolution}x{args.resolution}, from the "
        f"scikit-image photographs (fxq.samples.random_crops), ImageNet-normalized.",
        f"- Latency: median of {args.repeats} runs after {args.warmup} warm-up runs; each flow is timed "
        f"alternately with float eager (fxq.report.latency), and its ratio to eager comes from that same run "
        f"(below 1 is faster). `float eager ms` is the median of those eager medians.",
        f"- {COMPILE}: inductor, default mode, dynamic=False, first call per batch size capped at "
        f"{args.compile_timeout} s (`{COMPILE} s` columns: compile time, "
        + ("empty inductor cache at the start of the run" if FRESH_INDUCTOR_CACHE else
           f"inductor cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')} chosen by the caller, may be warm")
        + f"); C++ compiler: {compiler_description()}."
        if args.compile_timeout > 0 else f"- {COMPILE}: skipped (--compile-timeout 0).",
        f"- {NATIVE}: torch.ao prepare_fx/convert_fx with get_default_qconfig_mapping('{NATIVE_ENGINE}'), BN "
        f"fused by prepare_fx's default fusion, engine {NATIVE_ENGINE}.",
        f"- {FXQ}: fxq.quantize defaults (BN folding, equalization, bias correction, optimized rounding, engine "
        f"chosen by fidelity); `fxq simulation pass s` is the share of `{FXQ} quantize s` spent in the recovery "
        "walk (optimized rounding, weight refit, bias correction).",
        "- Size: serialized bytes, int8 TorchScript (torch.jit.save) over float state_dict (torch.save).",
        "- SQNR: logits against float eager over the evaluation crops, in dB.",
        "",
        "## Latency",
        "",
        latency_table(results),
        "",
        "## Size, output error, quantize time",
        "",
        model_table(results, args.batch_sizes),
        "",
    ]
    if failures:
        lines += ["## Failures", ""]
        for failure in failures:
            lines += [f"{failure.model}, {failure.flow}, {failure.stage}: {failure.reason}", "",
                      "```", failure.traceback_tail, "```", ""]
    coverage = Path(__file__).resolve().parent / "coverage.md"
    if coverage.is_file():
        lines += ["## Coverage", "", coverage.read_text().strip(), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--models", nargs="+", choices=MODELS, metavar="MODEL", help=f"default: all ({', '.join(MODELS)})")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default: 1 32")
    parser.add_argument("--repeats", type=int, help="timed runs per flow and batch size (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed runs before timing (default 3)")
    parser.add_argument("--resolution", type=int, help="crop side in pixels (default 224)")
    parser.add_argument("--calibration", type=int, help="calibration crops (default 32)")
    parser.add_argument("--eval", type=int, help="evaluation crops for SQNR (default 64)")
    parser.add_argument("--compile-timeout", type=int, help="cap in seconds on each torch.compile; 0 skips "
                                                              "torch.compile (default 300)")
    parser.add_argument("--init-bn", action="store_true",
                        help="keep torchvision's initial BatchNorm statistics in random models instead of "
                             "re-estimating them on crops (their logits then vanish to ~1e-10 or less)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet18, batch 1, 64x64, 8 crops, "
                                                             "1 repeat, no torch.compile")
    args = parser.parse_args(argv)
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0 or args.calibration < 1 or args.eval < 1:
        parser.error("batch sizes, --repeats, --calibration and --eval must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return run_suite(parse_args(argv))
    finally:  # also after --help or a usage error
        if FRESH_INDUCTOR_CACHE:
            shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


def run_suite(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    started, start, load_before = datetime.datetime.now(), time.perf_counter(), os.getloadavg()[0]
    source = source_state()
    print(f"CPU {cpu_name()}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load {load_before:.1f}", flush=True)
    calibration = calibration_batches(args.calibration, size=args.resolution)
    evaluation = evaluation_crops(args.eval, size=args.resolution)
    failures: list[Failure] = []
    batchnorm_crops = None if args.init_bn else random_crops(args.calibration, seed=BATCHNORM_SEED,
                                                              size=args.resolution)
    results = [benchmark_model(name, calibration, evaluation, batchnorm_crops, args, failures)
               for name in args.models]
    seconds = time.perf_counter() - start
    markdown = render(results, failures, args, started, seconds, load_before, os.getloadavg()[0], source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown)
    print(f"\n{markdown}\nwrote {args.out} in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
