"""Dynamic quantization of an LSTM + Linear model: int8 weights, activations quantized on every call.

No calibration data is needed. Prints which layers became dynamic int8 kernels, the output SQNR against
float and the serialized sizes. By default fxq keeps float any layer that times no faster in int8 on this
CPU (a small LSTM at batch 1 often does not); this example asks for every layer in int8, then shows what
the default keeps float here.

    python examples/dynamic_lstm.py
"""

from __future__ import annotations

import io

import torch
from torch import nn

import fxq


class SequenceClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(64, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(x)
        return self.head(output[:, -1])


def state_size_mb(model: nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6


def main() -> None:
    torch.manual_seed(0)
    model = SequenceClassifier().eval()
    sequences = torch.randn(16, 20, 64)
    int8_model = fxq.quantize(model, (sequences[:1],), mode="dynamic", dynamic_where_faster=False)
    with torch.no_grad():
        reference, result = model(sequences), int8_model(sequences)
    sqnr = float(20 * torch.log10(reference.norm() / (reference - result).norm()))
    dynamic = sorted({m._get_name() for m in int8_model.modules() if "DynamicQuantized" in m._get_name()})
    print(f"dynamic int8 modules: {', '.join(dynamic)}")
    print(f"output SQNR vs float: {sqnr:.1f} dB")
    print(f"state_dict size: float {state_size_mb(model):.2f} MB, int8 {state_size_mb(int8_model):.2f} MB")
    timed = fxq.quantize(model, (sequences[:1],), mode="dynamic")  # the default: int8 only where it is faster
    for layer, why in fxq.summary_of(timed).float_layers or [("none", "every layer is faster in int8 here")]:
        print(f"with defaults, float layer {layer}: {why}")


if __name__ == "__main__":
    main()
