"""Float vs int8 comparison tables: size, latency, error, structure (`fxq.report`)."""

from fxq.report.report import OutputError, Report, SizeComparison, Structure, report

__all__ = ["report", "Report", "SizeComparison", "OutputError", "Structure"]
