"""Assemble a `QuantizationSummary` from what one pipeline run did: the engine choice, the layers and ops
left in float with the reason for each, and the summaries of parts quantized on their own (regions, the
traceable code inside untraceable modules), their names prefixed with the part's.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import fx, nn

from fxq.backend.engine import EngineChoice
from fxq.backend.op_kinds import TRANSPOSED_CONV_TYPES, is_shape_op, is_weighted_module, quantizes_op, \
    weighted_layers
from fxq.config import QuantOptions, covered_modules, key_covers
from fxq.frontend.islands import IslandPlan
from fxq.frontend.trace import FloatLeaf
from fxq.summary import QuantizationSummary


def engine_summary(options: QuantOptions, choice: EngineChoice, **fields: Any) -> QuantizationSummary:
    """A summary carrying the resolved options and the engine choice, with `fields` filled in."""
    return QuantizationSummary(options=options.describe(), engine=choice.engine, engine_reason=choice.reason,
                               reduce_range=choice.reduce_range, kernel_saturates=choice.kernel_saturates,
                               seven_bit_weights=choice.seven_bit_weights, **fields)


def dynamic_output_rewrites(names: Iterable[str]) -> list[str]:
    return [f"linear with no int8 neighbour as dynamic int8 (input range per call, float output): {name}"
            for name in names]


def _innermost(name: str, around: Iterable[FloatLeaf]) -> FloatLeaf | None:
    """The innermost untraceable module enclosing layer `name` (the empty name is the top-level forward)."""
    enclosing = [leaf for leaf in around if not leaf.module or key_covers([leaf.module], name)]
    return max(enclosing, key=lambda leaf: len(leaf.module)) if enclosing else None


def float_layers_after(quantized: nn.Module, around: list[FloatLeaf], keep_float: Iterable[Any],
                       plan: IslandPlan | None = None) -> list[tuple[str, str]]:
    """Every conv/linear call of the int8 model that runs in float, with the reason (`around`: the
    untraceable modules, innermost reason wins)."""
    island_reasons = {node: island.reason for island in (plan.islands if plan else ()) for node in island.nodes}
    modules = dict(quantized.named_modules())
    listed = []
    for name in weighted_layers(quantized).float:
        leaf = _innermost(name, [leaf for leaf in around if leaf.module])
        if leaf is not None:
            why = f"untraceable: {leaf.reason}"
        elif key_covers(keep_float, name, modules.get(name)):
            why = "keep_float"
        elif isinstance(modules.get(name), TRANSPOSED_CONV_TYPES):
            why = "transposed conv: torch.ao's static int8 flow takes no per-channel weights for it"
        else:  # a module of its own, an op inside an outlined island, or the conv of a fused container
            why = island_reasons.get(name) or island_reasons.get(name.rpartition(".")[2]) \
                or island_reasons.get(name.rpartition(".")[0]) or "no int8 pattern"
        listed.append((name, why))
    return listed


def untraceable_layers(model: nn.Module, around: list[FloatLeaf]) -> list[tuple[str, str]]:
    """Float conv/linear calls that run inside untraceable code, each with the reason of the innermost
    untraceable module around it."""
    listed = []
    for name in weighted_layers(model).float:
        leaf = _innermost(name, around)
        if leaf is not None:
            listed.append((name, leaf.reason if leaf.reason == "keep_float" else f"untraceable: {leaf.reason}"))
    return listed


def untraceable_ops(around: list[FloatLeaf], parts: Iterable[str]) -> list[tuple[str, str]]:
    """The untraceable modules themselves, as float code, with what was quantized inside them."""
    listed = []
    for leaf in around:
        inside = [p for p in parts if not leaf.module or key_covers([leaf.module], p)]
        what = f"{leaf.module or '(top-level forward)'}: runs as Python in float" + (
            f"; int8 inside: {_shown(inside, 4)}" if inside else "")
        listed.append((what, f"untraceable: {leaf.reason}"))
    return listed


def float_ops(gm: fx.GraphModule, plan: IslandPlan | None, leaves: list[FloatLeaf],
              keep_float: Iterable[Any] = ()) -> list[tuple[str, str]]:
    """Ops of the traced float graph that run in float in the int8 model, grouped by kind, with why
    (untraceable leaves, and conv/linear layers kept float, are listed with the float layers)."""
    leaf_names = {leaf.module for leaf in leaves}
    kept_names = set(covered_modules(gm, keep_float))
    no_kernel: dict[str, list[str]] = {}
    kept: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        target = str(node.target)
        if node.op == "call_module" and target in leaf_names:
            continue
        if node.op == "call_module" and target in kept_names and quantizes_op(gm, node) \
                and not is_weighted_module(gm.get_submodule(target)):
            kept.setdefault(type(gm.get_submodule(target)).__name__, []).append(target)
            continue
        if node.op in ("call_function", "call_method", "call_module") and not quantizes_op(gm, node) \
                and not is_shape_op(gm, node):
            kind = type(gm.get_submodule(target)).__name__ if node.op == "call_module" \
                else f".{node.target}()" if node.op == "call_method" else getattr(node.target, "__name__", target)
            no_kernel.setdefault(kind, []).append(target if node.op == "call_module" else node.name)
    listed = [(f"{kind}: {_shown(nodes)}", "no int8 kernel in torch.ao: runs in float between dequantize and quantize")
              for kind, nodes in no_kernel.items()]
    listed += [(f"{kind}: {_shown(names)}", "keep_float") for kind, names in kept.items()]
    for island in plan.islands if plan else ():
        listed.append((f"{', '.join(dict.fromkeys(island.ops))}: {_shown(island.nodes)}", island.reason))
    return listed


def _shown(names: list[str], most: int = 3) -> str:
    """The first `most` names, and how many there are in all when there are more."""
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def with_parts(summary: QuantizationSummary, parts: Mapping[str, QuantizationSummary]) -> QuantizationSummary:
    """`summary` extended with the summaries of parts quantized on their own, their names prefixed."""
    summary.patterns += [f"{r}.{p}" for r, s in parts.items() for p in s.patterns]
    summary.rewrites += [f"{r}: {w}" for r, s in parts.items() for w in s.rewrites]
    summary.float_layers += [(f"{r}.{n}", why) for r, s in parts.items() for n, why in s.float_layers]
    summary.float_ops += [(f"{r}: {what}", why) for r, s in parts.items() for what, why in s.float_ops]
    summary.eight_bit_weight_channels.update(
        {f"{r}.{n}": rows for r, s in parts.items() for n, rows in s.eight_bit_weight_channels.items()})
    summary.observer_choices.update(
        {f"{r}.{n}": c for r, s in parts.items() for n, c in s.observer_choices.items()})
    return summary


def regions_summary(options: QuantOptions, work: nn.Module, around: list[FloatLeaf],
                    parts: Mapping[str, QuantizationSummary], timings_s: dict[str, float],
                    note: str) -> QuantizationSummary:
    """The summary of a model quantized region by region: the parts' summaries merged, the untraceable
    code around them listed as float (a float layer inside a part is listed once, with the part's reason)."""
    first = next(iter(parts.values()), None)
    merged = QuantizationSummary(
        options=options.describe(), engine=first.engine if first else options.backend.value,
        engine_reason=first.engine_reason if first else "no region quantized",
        reduce_range=any(s.reduce_range for s in parts.values()),
        kernel_saturates=any(s.kernel_saturates for s in parts.values()),
        seven_bit_weights=any(s.seven_bit_weights for s in parts.values()),
        float_layers=[(name, why) for name, why in untraceable_layers(work, around) if not key_covers(parts, name)],
        float_ops=untraceable_ops(around, parts),
        conversions={k: sum(s.conversions.get(k, 0) for s in parts.values()) for k in ("quantize", "dequantize")},
        timings_s=dict(timings_s), notes=[note])
    return with_parts(merged, parts)
