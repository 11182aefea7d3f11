"""Where MobileNetV2's int8 error comes from: the cost of quantizing one activation at a time.

The float graph fxq quantizes (traced, BN folded, clamps fused, equalized) runs on the evaluation crops
with 8-bit per-tensor quantization (min/max range from the calibration crops) injected at a single
activation; the logits SQNR against the float graph is that activation's solo cost. Independent noises
add, so the last line (all solo noise powers summed) bounds what all-int8 activations allow.

    python -m bench.experiments.activation_budget [--top 20]
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
from torch import fx

from bench.protocol import calibration_batches, evaluation_crops, sqnr_db
from fxq import QuantOptions, pipeline
from fxq.backend import engine
from fxq.report.latency import cpu_name
from fxq.samples import pretrained_mobilenet_v2

warnings.filterwarnings("ignore")
LEVELS = 255


class RangeRecorder(fx.Interpreter):
    """Min and max of every floating-point node output over the batches it runs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.ranges: dict[fx.Node, tuple[float, float]] = {}

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            low, high = self.ranges.get(node, (0.0, 0.0))
            self.ranges[node] = (min(low, float(result.min())), max(high, float(result.max())))
        return result


class OneQuantizedActivation(fx.Interpreter):
    """Runs the graph with 8-bit asymmetric fake quantization at one node's output only."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, low: float, high: float) -> None:
        super().__init__(gm)
        self.node, self.scale = node, max(high - low, 1e-12) / LEVELS
        self.zero_point = round(-low / self.scale)

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if node is self.node:
            codes = torch.clamp(torch.round(result / self.scale) + self.zero_point, 0, LEVELS)
            result = (codes - self.zero_point) * self.scale
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=20, help="print the most costly activations")
    parser.add_argument("--eval", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    calibration = [(batch,) for batch in calibration_batches(64)]
    evaluation = evaluation_crops(args.eval)
    # the float graph fxq.quantize works on, built by its own pipeline
    example = calibration[0]
    traced = pipeline.trace_float_graph(pipeline.eval_copy(pretrained_mobilenet_v2(), example), example)
    gm = pipeline.build_float_graph(traced, example, calibration, QuantOptions(), engine.select_engine(QuantOptions()),
                                    pipeline.Timer()).traced.graph
    recorder = RangeRecorder(gm)
    with torch.no_grad():
        for batch in calibration:
            recorder.run(*batch)
        reference = gm(evaluation)
        costs = []
        for node, (low, high) in recorder.ranges.items():
            if node.op == "output":
                continue
            output = OneQuantizedActivation(gm, node, low, high).run(evaluation)
            costs.append((sqnr_db(reference, output), node.name, low, high))
    print(f"MobileNetV2, {args.eval} eval crops; CPU {cpu_name()}, threads {torch.get_num_threads()}")
    for db, name, low, high in sorted(costs)[:args.top]:
        print(f"{db:6.1f} dB  {name:28s} range [{low:.2f}, {high:.2f}]")
    total = sum(10 ** (-db / 10) for db, *_ in costs)
    print(f"{len(costs)} activations; all solo noise powers summed: {-10 * math.log10(total):.1f} dB")


if __name__ == "__main__":
    main()
