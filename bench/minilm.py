"""A real transformer in int8: all-MiniLM-L6-v2 (6-layer BERT sentence encoder), every flow in one run.

Text: 64 calibration and 256 evaluation sentences of the Python docs (bench/sentences.py), max length 64
(padded), batches of 16. Per flow: embedding SQNR against float (mean-pooled, L2-normalized embeddings),
nearest-neighbour agreement (each sentence's nearest other sentence is the same as under float), batch-1
and batch-16 latency (medians after warm-up; the flows of one runtime are timed in turns, the batch
sizes on separate model objects), and quantize seconds.

Flows: PyTorch eager `quantize_dynamic` (the classic BERT recipe: torch.ao dynamic Linear, 7-bit inputs,
per-tensor weights); fxq dynamic and static, and static with `target_sqnr_db` (float layers listed);
ONNX Runtime's `quantize_dynamic` (per-channel, QInt8 weights) of the float model exported by
torch.onnx.export, next to ONNX Runtime's float model (its rows are timed against it, in one session
each).

    python -m bench.minilm [--threads 2] [--markdown] [--target 25]
    (--markdown writes bench/minilm.md; OpenMP's wait policy as a user has it: unset. With
    OMP_WAIT_POLICY=PASSIVE every batch-1 row was slower, onednn's most: fxq dynamic 1.08x float)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

import fxq
from bench import sentences
from fxq.analysis.metrics import sqnr_db
from fxq.report.latency import cpu_name, isa_limits

MARKDOWN = Path(__file__).resolve().with_name("minilm.md")
BATCH = 16


def _time_in_turns(calls: dict[str, Callable[[], Any]], rounds: int, per_round: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each flow, the flows timed in turns after a warm-up."""
    for call in calls.values():
        for _ in range(3):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(rounds):
            for name, call in calls.items():
                for _ in range(per_round):
                    start = time.perf_counter()
                    call()
                    samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def _eager_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


class _LastHiddenState(torch.nn.Module):
    """The Hugging Face model with positional inputs and one output, for torch.onnx.export."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _ort_flows(model: torch.nn.Module, tokenizer: Any, directory: Path, threads: int) -> tuple[dict[str, Any], str]:
    """ONNX Runtime sessions: the float export, and its own quantize_dynamic of it; or none and why (the
    float export is checked against the model first)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    example = sentences.encode(tokenizer, sentences.sentences(2, skip=400))
    float_path = directory / "minilm.onnx"
    model = copy.deepcopy(model)  # the TorchScript exporter leaves the model it traced changed (measured)
    with torch.no_grad():
        expected = model(**example).last_hidden_state
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_LastHiddenState(model), (example["input_ids"], example["attention_mask"]), str(float_path),
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                        "last_hidden_state": {0: "batch"}}, dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    exported = _OrtModel(ort.InferenceSession(str(float_path), options, providers=["CPUExecutionProvider"]))
    with torch.no_grad():
        difference = float((exported(**example)["last_hidden_state"] - expected).abs().max())
    if difference > 1e-3:
        return {}, (f"ONNX Runtime rows left out: torch.onnx.export (TorchScript exporter; the dynamo exporter needs "
                    f"onnxscript) of this BertModel gives other outputs than the model on the export's own inputs "
                    f"(max |difference| {difference:.2f})")
    int8_path = directory / "minilm.int8.onnx"
    quantize_dynamic(str(float_path), str(int8_path), per_channel=True, weight_type=QuantType.QInt8)
    return {"ONNX Runtime float": exported, "ONNX Runtime quantize_dynamic": _OrtModel(
        ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"]))}, ""


class _OrtModel:
    """An ONNX Runtime session called like the Hugging Face model (keyword inputs, last_hidden_state)."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        return {"last_hidden_state": torch.from_numpy(self.session.run(None, feeds)[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--target", type=float, default=25.0, help="target_sqnr_db of the mixed-precision row")
    parser.add_argument("--markdown", action="store_true", help=f"write {MARKDOWN.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tokenizer = sentences.load_minilm()
    calibration = sentences.batches(tokenizer, sentences.sentences(64), BATCH)
    evaluation = sentences.batches(tokenizer, sentences.sentences(256, skip=64), BATCH)
    single = sentences.encode(tokenizer, sentences.sentences(1, skip=400))
    reference = sentences.embeddings(model, evaluation)

    # per flow: name -> build(example inputs) -> model
    builds: dict[str, Callable[[dict], Any]] = {
        "float (eager)": lambda example: model,
        "PyTorch eager quantize_dynamic": lambda example: _eager_dynamic(model),
        "fxq dynamic": lambda example: fxq.quantize(model, example, mode="dynamic", calibration_data=calibration),
        "fxq static": lambda example: fxq.quantize(model, example, calibration_data=calibration),
        f"fxq static, target_sqnr_db={args.target:g}":
            lambda example: fxq.quantize(model, example, calibration_data=calibration, target_sqnr_db=args.target),
    }
    rows, timings, notes = [], {}, []
    built: dict[str, dict[int, Any]] = {}
    for name, build in builds.items():
        built[name] = {}
        for size, example in ((BATCH, calibration[0]), (1, single)):
            start = time.perf_counter()
            built[name][size] = build(example)
            seconds = time.perf_counter() - start
            if size == BATCH:
                timings[name] = seconds
        summary = fxq.summary_of(built[name][BATCH])
        if summary is not None and summary.float_layers:
            notes.append(f"{name}: float layers: " + ", ".join(f"{layer} ({why})" for layer, why in summary.float_layers))
        print(f"built {name} in {timings[name]:.1f} s", flush=True)

    latency: dict[str, dict[int, float]] = {name: {} for name in built}
    for size, example in ((1, single), (BATCH, calibration[1])):
        measured = _time_in_turns({name: (lambda m=models[size]: m(**example)) for name, models in built.items()},
                                  args.rounds)
        for name, value in measured.items():
            latency[name][size] = value

    with tempfile.TemporaryDirectory() as directory:
        ort_rows: dict[str, Any] = {}
        if importlib.util.find_spec("onnxruntime") is not None:
            ort_rows, why_not = _ort_flows(model, tokenizer, Path(directory), args.threads)
            if why_not:
                notes.append(why_not)
            for size, example in ((1, single), (BATCH, calibration[1])):
                if ort_rows:
                    measured = _time_in_turns({name: (lambda m=m: m(**example)) for name, m in ort_rows.items()},
                                              args.rounds)
                    for name, value in measured.items():
                        latency.setdefault(name, {})[size] = value
        else:
            notes.append("ONNX Runtime not installed: its rows are missing")
        flows = {**{name: models[BATCH] for name, models in built.items()}, **ort_rows}
        float_of = {name: "ONNX Runtime float" if name.startswith("ONNX") else "float (eager)" for name in flows}
        for name, flow in flows.items():
            embedded = sentences.embeddings(flow, evaluation)
            base = float_of[name]
            rows.append([name, f"{float(sqnr_db(reference, embedded)):.1f}",
                         f"{100 * sentences.neighbour_agreement(reference, embedded):.0f}%",
                         f"{latency[name][1]:.2f} ({latency[name][1] / latency[base][1]:.2f}x)",
                         f"{latency[name][BATCH]:.1f} ({latency[name][BATCH] / latency[base][BATCH]:.2f}x)",
                         f"{timings[name]:.1f}" if name in timings and name != "float (eager)" else ""])

    headers = ["flow", "embedding SQNR dB", "nearest-neighbour agreement", "batch 1 ms (vs float)",
               f"batch {BATCH} ms (vs float)", "quantize s"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    machine = (f"{cpu_name()} ({isa_limits()}), {args.threads} threads, torch {torch.__version__}, "
               f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(table)
    print("\n".join(notes))
    print(machine)
    if args.markdown:
        MARKDOWN.write_text(
            f"# all-MiniLM-L6-v2 in int8 ({datetime.date.today()})\n\n{machine}\n\n"
            f"`python -m bench.minilm --markdown`\n\n{table}\n\n"
            + "".join(f"- {note}\n" for note in notes)
            + "\nONNX Runtime rows are timed against ONNX Runtime's float model; the others against the float "
              "eager model.\n")


if __name__ == "__main__":
    main()
