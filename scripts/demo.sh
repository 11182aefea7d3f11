#!/usr/bin/env bash
# Install, then quantize the ImageNet MobileNetV2 and print fxq's report: size, latency, error, what stays float.
# Extra arguments go to the example (`--fast`: quicker options, less accurate). Latency is measured on this
# machine; on a busy one it is noisy.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install.sh
.venv/bin/python examples/quantize_mobilenet.py "$@"
