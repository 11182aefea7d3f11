"""fxq's benchmarks, run from the repository root as modules (`python -m bench.accuracy --help`).

protocol.py holds what they share (crops, PyTorch's FX default baseline, metrics); models.py the coverage
model list; suite.py, accuracy.py, generalization.py, trained.py, coverage.py and probe.py are the maintained
benches; experiments/ holds one-off measurements, each with the result it gave.
"""
