#!/usr/bin/env bash
# Install, then quantize the ImageNet MobileNetV2 and print how close the int8 model is to the float one.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install.sh
.venv/bin/python examples/quantize_mobilenet.py "$@"
