"""Quantize a torchvision model, save it to one file, reload it and check the outputs are identical.

The file is TorchScript: it loads without this script's model code (also from C++ with torch::jit::load).

    python examples/save_and_reload.py [OUT_FILE]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torchvision

import fxq
from fxq.samples import random_crops


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().eval()
    crops = random_crops(8, seed=1, size=128)
    int8_model = fxq.quantize(model, crops[:1], calibration_data=[crops])
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "mobilenet_v3_small_int8.pt"
    fxq.save(int8_model, out)
    reloaded = fxq.load(out)
    images = random_crops(4, seed=2, size=128)
    with torch.no_grad():
        identical = torch.equal(int8_model(images), reloaded(images))
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB), engine {fxq.summary_of(reloaded).engine}")
    print(f"outputs identical after reload: {identical}")


if __name__ == "__main__":
    main()
