#!/usr/bin/env bash
# Install, then run the test suite. Extra arguments go to pytest (e.g. `-m slow`, `-k resnet`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install.sh
.venv/bin/python -m pytest -q "$@"
