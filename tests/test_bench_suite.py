"""`python -m bench.suite --quick` runs as a user would run it (fresh process) and writes the promised tables."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Each '## heading' table of the markdown as a list of {column: cell} rows."""
    tables, heading, rows = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            heading, rows = line[3:].strip(), []
        elif line.startswith("|") and heading is not None:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if set("".join(cells)) <= set("-: "):
                continue  # the separator line under the header
            rows.append(cells)
            tables[heading] = rows
    return {name: [dict(zip(rows[0], row, strict=True)) for row in rows[1:]] for name, rows in tables.items()}


def test_quick_suite_writes_tables_with_numbers(tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, "-m", "bench.suite", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "2 threads" in text and f"torch {torch.__version__}" in text and "CPU " in text

    tables = markdown_tables(text)
    (latency,) = tables["Latency"]
    assert list(latency) == ["model", "weights", "batch", "float eager ms", "torch.compile / eager",
                             "native FX int8 / eager", "fxq int8 / eager", "fxq int8 ms"]
    assert (latency["model"], latency["weights"], latency["batch"]) == ("resnet18", "random, BN from crops", "1")
    assert latency["torch.compile / eager"] == "skipped"  # --quick leaves torch.compile out
    for column in ("float eager ms", "native FX int8 / eager", "fxq int8 / eager", "fxq int8 ms"):
        assert 0 < float(latency[column]) < math.inf, column

    (model,) = tables["Size, output error, quantize time"]
    # measured on this config: 18.7 dB native FX, 19.4 dB fxq (6.6 dB at commit 80dcb02, where equalization
    # alone took fxq from 21.3 to 6.6 dB)
    for column in ("native FX int8 SQNR dB", "fxq int8 SQNR dB"):
        assert float(model[column]) > 15, column
    # resnet18 holds 46.8 MB of float32 weights; int8 weights make the file about a quarter of that
    assert 40 < float(model["float MB"]) < 50
    for column in ("native FX int8 size / float", "fxq int8 size / float"):
        assert 0.2 < float(model[column]) < 0.35, column
    assert 0 < float(model["fxq simulation pass s"]) <= float(model["fxq int8 quantize s"])
    assert float(model["native FX int8 quantize s"]) > 0
    assert model["fxq engine"] in torch.backends.quantized.supported_engines
    assert "## Failures" not in text
