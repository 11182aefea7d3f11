"""The examples run as a user would run them (fresh process) and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_dynamic_lstm_example():
    output = run_example("dynamic_lstm.py")
    assert "LSTM" in output and "Linear" in output
    assert float(re.search(r"SQNR vs float: ([\d.]+) dB", output).group(1)) > 25


def test_qat_digits_example():
    output = run_example("qat_digits.py")
    float_accuracy = float(re.search(r"float accuracy: ([\d.]+)", output).group(1))
    int8_accuracy = float(re.search(r"int8 accuracy: ([\d.]+)", output).group(1))
    assert float_accuracy > 0.95 and int8_accuracy >= float_accuracy - 0.01


def test_save_and_reload_example(tmp_path):
    output = run_example("save_and_reload.py", str(tmp_path / "model.pt"))
    assert "outputs identical after reload: True" in output
    assert (tmp_path / "model.pt").is_file()


@pytest.mark.slow
def test_quantize_mobilenet_example():
    output = run_example("quantize_mobilenet.py")
    assert "SQNR" in output
