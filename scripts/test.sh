#!/usr/bin/env bash
# Install, then run the test suite. Extra arguments go to pytest (e.g. `-m slow`, `-k resnet`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The optional extras are tested too: third-party model code (timm, efficientnet_pytorch, transformers)
# and the ONNX export's runtimes (onnx, onnxruntime, openvino).
FXQ_EXTRAS="${FXQ_EXTRAS:-test,models,onnx}" bash scripts/install.sh
# On a shared or busy machine, OpenMP threads that spin while waiting slow everything down (a
# sensitivity benchmark took 242 s instead of 28 s); PASSIVE makes them sleep.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
.venv/bin/python -m pytest -q "$@"
