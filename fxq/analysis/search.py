"""The search both accuracy targets share: the fewest float units (taken in ranked order) that pass a check.

A check is an end-to-end measurement of the model with the first `count` units kept float, so each costs
a forward pass over the data or a re-quantization, and the search spends as few as it can: 0 first, then
counts doubling from 1 until one passes, then bisection between the last that failed and the first that
passed (assuming a count that passes keeps passing with more units float).
"""

from __future__ import annotations

from typing import Callable


def fewest_passing(total: int, passes: Callable[[int], bool],
                   may_check_more: Callable[[], bool] = lambda: True) -> int | None:
    """The smallest count in 0..`total` for which `passes(count)` holds, None when `total` fails too. The
    bisection stops early, at the smallest count known to pass, once `may_check_more()` is False."""
    if passes(0):
        return 0
    low, count = 0, 1
    while True:
        count = min(count, total)
        if passes(count):
            high = count
            break
        if count == total:
            return None
        low, count = count, count * 2
    while high - low > 1 and may_check_more():
        middle = (low + high) // 2
        low, high = (low, middle) if passes(middle) else (middle, high)
    return high
