"""`fxq` command line: quantize/report end to end, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fxq
from fxq.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["tests.cli_models:tiny", "--input-shape", "1,3,16,16", "--calibration-size", "4", "--threads", "1"]


def _run_fxq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "fxq", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_quantize_resnet18_subprocess(tmp_path):
    # 64x64 inputs and round-to-nearest keep the run short (error-compensated rounding of resnet18's
    # weights takes minutes on a shared 2-core machine); the graph and every conv are the 224x224 model's.
    result = _run_fxq("quantize", "torchvision:resnet18", "--data", "random", "--calibration-size", "2",
                      "--input-shape", "1,3,64,64", "--no-optimize-rounding", "--out", "r18.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SQNR dB" in result.stdout and "int8 modules" in result.stdout
    loaded = fxq.load(tmp_path / "r18.pt")
    assert fxq.summary_of(loaded).options["optimize_rounding"] is False


def test_unknown_model_subprocess(tmp_path):
    result = _run_fxq("quantize", "torchvision:no_such_net", "--out", "x.pt", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxq: error: ") and "no_such_net" in lines[0]
    assert not (tmp_path / "x.pt").exists()


def test_quantize_then_report_in_process(tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    assert main(["quantize", *TINY, "--out", str(out), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["size"]["ratio"] < 0.5 and data["structure"]["int8_modules"] > 0
    assert data["latency"][0]["threads"] == 1
    assert main(["report", *TINY, "--quantized", str(out), "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "|" in markdown and "SQNR dB" in markdown


def test_quantize_also_writes_onnx(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    assert main(["quantize", *TINY, "--out", str(tmp_path / "tiny.pt"), "--onnx", str(tmp_path / "tiny.onnx")]) == 0
    model = onnx.load(str(tmp_path / "tiny.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)


def test_onnx_conv_add_requantize_rounds_the_fused_conv_outputs(tmp_path, capsys):
    """With --onnx-conv-add requantize the conv that onednn fuses with its residual add gets its own
    QuantizeLinear before the add (ONNX Runtime then runs it as QLinearConv); by default it has none."""
    onnx = pytest.importorskip("onnx")
    residual = ["tests.cli_models:residual", *TINY[1:]]
    counts = {}
    for form in ("fused", "requantize"):
        path = tmp_path / f"{form}.onnx"
        assert main(["quantize", *residual, "--out", str(tmp_path / f"{form}.pt"), "--onnx", str(path),
                     "--onnx-conv-add", form]) == 0
        counts[form] = sum(node.op_type == "QuantizeLinear" for node in onnx.load(str(path)).graph.node)
    assert counts["requantize"] == counts["fused"] + 1


@pytest.mark.parametrize("argv, fragment", [
    (["quantize", "tests.cli_models:not_a_model", "--out", "x.pt"], "not a torch.nn.Module"),
    (["quantize", "tests.no_such_module:tiny", "--out", "x.pt"], "no_such_module"),
    (["quantize", "resnet18", "--out", "x.pt"], "torchvision:NAME"),
    (["quantize", *TINY, "--data", "no/such/dir", "--out", "x.pt"], "not a directory"),
    (["quantize", *TINY, "--weights", "missing.pth", "--out", "x.pt"], "missing.pth"),
    (["quantize", *TINY, "--weights", "imagenet", "--out", "x.pt"], "mobilenet_v2 only"),
    (["report", *TINY, "--quantized", "missing.pt"], "no saved model"),
])
def test_errors_are_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxq: error: ") and fragment in lines[0], captured.err


def test_sensitivity_without_api(monkeypatch, capsys):
    monkeypatch.delattr(fxq, "sensitivity", raising=False)
    assert main(["sensitivity", *TINY]) == 2
    assert "fxq.sensitivity" in capsys.readouterr().err


def test_bench_runs_the_suite_script(capfd, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the suite is found from fxq's checkout, not the working directory
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert main(["bench", "--help"]) == 0  # the suite's own options, passed through
    out = capfd.readouterr().out
    assert "--quick" in out and "--models" in out
