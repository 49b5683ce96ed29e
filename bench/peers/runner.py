"""A framework-neutral handle on one compiled/eager benchmark step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass
class Runner:
    """``step()`` launches one workload step and returns its outputs; ``block(outputs)`` waits
    until they are computed (lazy/async frameworks); ``to_numpy(outputs)`` gives
    ``(loss, [leaf, ...])`` in the canonical parameter order for the correctness check."""

    step: Callable[[], Any]
    block: Callable[[Any], None]
    to_numpy: Callable[[Any], tuple[float, list[np.ndarray]]]
    note: str = ""

    def run(self) -> Any:
        out = self.step()
        self.block(out)
        return out

    def result(self) -> tuple[float, list[np.ndarray]]:
        return self.to_numpy(self.run())
