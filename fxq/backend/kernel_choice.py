"""Pick the int8 kernel library by measuring it on the model, not by CPU flags.

The same int8 model (same scales, same int8 weights) is not computed the same way by every engine: one
engine's depthwise or saturating kernels can depart from the float simulation of the quantization by
several dB where another follows it. So with `backend="auto"` the model is converted for each candidate
engine, run on the first samples of a calibration batch next to the float simulation (torch.ao's
reference model), and the most faithful engine is kept; the numbers go into the summary (measurements:
docs/design/engines.md).

onednn comes first since it runs a conv and the residual add that reads it as one kernel
(backend.conv_add), which x86 cannot: x86 is kept only when onednn departs from the simulation by more
than TOLERANCE_DB more than x86 does. In a model where no conv feeds a residual add, x86 comes first
instead (`engine_for_graph`): nothing to fuse, faster linear layers; unless x86 would run depthwise convs
on fbgemm that time slower in int8 than in float.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
from typing import Callable, Sequence

from torch import fx, nn

from fxq.analysis.metrics import ErrorStats
from fxq.backend import engine
from fxq.calibration import Batch, leading_samples, output_tensors
from fxq.config import Backend, QuantOptions

# Preference order among equally faithful engines: onednn fuses residual adds into convs
# (backend.conv_add); x86 (PyTorch's default, fbgemm or onednn per op) is the other candidate.
X86_CANDIDATES = ("onednn", "x86")
# Engines whose output is within this many dB of the best one count as equally faithful.
TOLERANCE_DB = 1.0
# Samples of the calibration batch the engines are compared on. What sets engines apart (a saturating or
# differently rounding kernel) shows on every sample, and the float simulation and each candidate run on
# them: on 16 samples that was 1.1 of ResNet-50's quantize seconds.
FIDELITY_SAMPLES = 4


def candidate_engines(options: QuantOptions, choice: engine.EngineChoice) -> list[str]:
    """The engines `convert_on_most_faithful_engine` compares, `choice`'s first (kept when as faithful)."""
    if options.backend is not Backend.AUTO or platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return [choice.engine]
    order = [choice.engine] + [name for name in X86_CANDIDATES if name != choice.engine]
    return [name for name in order if name in engine.available_engines()] or [choice.engine]


def same_grid_engines(current: str) -> list[str]:
    """The engines of this CPU that take the same int8 grids as `current` (x86 CPUs: onednn and x86 where
    their kernels saturate alike), `current` first."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686") or current not in X86_CANDIDATES:
        return [current]
    saturates = engine.probe_kernel_saturation(current)
    return [current] + [name for name in X86_CANDIDATES if name != current and name in engine.available_engines()
                        and engine.probe_kernel_saturation(name) == saturates]


def engine_for_graph(choice: engine.EngineChoice, options: QuantOptions, has_conv_adds: bool,
                     fbgemm_depthwise: Callable[[], list[str]] = lambda: []) -> engine.EngineChoice:
    """x86 in place of onednn for a model in which no conv feeds a residual add.

    onednn comes first for its conv+add kernel (see the module docstring); without such a pair it has
    nothing to fuse, and x86 (PyTorch's default, fbgemm for linear layers) ran the same int8 models as
    fast or faster at the same SQNR (docs/design/engines.md). Kept when the two engines would need
    different weight grids, and when x86 would run depthwise convs on fbgemm that take longer in int8 than
    in float (`fbgemm_depthwise()` names them, timed only when it matters): fbgemm's depthwise kernels
    cover some shapes only, the others run 20-50x slower than float and become float islands (timm's
    convnext_nano on x86: 6 of its 47 layers float, on onednn none, at the same latency).
    """
    if (options.backend is not Backend.AUTO or choice.engine != "onednn" or has_conv_adds
            or "x86" not in candidate_engines(options, choice)
            or engine.probe_kernel_saturation("x86") != choice.kernel_saturates):
        return choice
    slow = fbgemm_depthwise()
    if slow:
        return dataclasses.replace(choice, reason=(
            f"{choice.reason}; onednn although no conv feeds a residual add: x86 would run {len(slow)} "
            f"depthwise conv(s) ({', '.join(slow[:3])}{', ...' if len(slow) > 3 else ''}) on fbgemm, slower "
            "in int8 than in float (timed)"))
    return dataclasses.replace(choice, engine="x86", reason=(
        f"{choice.reason}; x86 in place of onednn: no conv feeds a residual add, so onednn's conv+add "
        "kernel has nothing to fuse, and x86 runs int8 linear layers faster"))


def _fidelity_db(reference_outputs: list, model: nn.Module, batch: Batch, engine_name: str) -> float:
    stats = ErrorStats()
    with engine.using_engine(engine_name):
        outputs = output_tensors(model(*batch))
    for reference, test in zip(reference_outputs, outputs, strict=True):
        stats.update(reference, test)
    return stats.sqnr_db


def convert_on_most_faithful_engine(prepared: fx.GraphModule, options: QuantOptions, choice: engine.EngineChoice,
                                    batch: Batch, conv_adds: Sequence[str] = ()
                                    ) -> tuple[nn.Module, engine.EngineChoice, dict[str, float]]:
    """Convert `prepared` for the engine whose int8 output best matches the float simulation.

    The simulation is the one the recovery passes corrected, `choice`'s: with its conv-add fusions
    (`conv_adds`), which an engine without the kernel cannot follow. Returns the int8 model, the updated
    engine choice and each candidate's SQNR against the simulation.
    """
    candidates, full_batch = candidate_engines(options, choice), batch
    if len(candidates) == 1:
        return engine.convert(prepared, choice, conv_adds), choice, {}
    import torch

    with torch.no_grad():
        reference = engine.convert_reference(copy.deepcopy(prepared), choice, conv_adds)
        with engine.using_engine(choice.engine):
            try:
                batch = leading_samples(batch, FIDELITY_SAMPLES)
                reference_outputs = output_tensors(reference(*batch))
            except Exception:  # noqa: BLE001 - inputs not batched along their first dimension
                batch = full_batch
                reference_outputs = output_tensors(reference(*batch))
        converted, fidelity = {}, {}
        for name in candidates:
            option = dataclasses.replace(choice, engine=name)
            converted[name] = engine.convert(copy.deepcopy(prepared), option, conv_adds)
            fidelity[name] = round(_fidelity_db(reference_outputs, converted[name], batch, name), 2)
    best = max(fidelity.values())
    chosen = next(name for name in candidates if fidelity[name] >= best - TOLERANCE_DB)
    measured = ", ".join(f"{name} {value:.1f} dB" for name, value in fidelity.items())
    reason = f"{choice.reason}; kernel fidelity vs float simulation on a calibration batch: {measured}; " \
             f"kept {chosen}"
    return converted[chosen], dataclasses.replace(choice, engine=chosen, reason=reason), fidelity
