"""DeepCache as the official code ships it: which steps run the whole DiT, which reuse features.

A full step runs every block and saves the (img, txt) streams entering the first kept block;
a cached step starts from the streams the last full step saved, so it runs only the kept
blocks (the last ``keep_blocks``) and the final layer, with its own timestep embedding.
Full steps: ``[0, start) + range(start, end, interval) + [end, total)``.
"""

from __future__ import annotations

import dataclasses

from .files import InputError


@dataclasses.dataclass(frozen=True)
class CacheSchedule:
    """The official defaults: 25 full steps of 50, the last block kept."""

    start: int = 11
    end: int = 45
    interval: int = 4
    keep_blocks: int = 1

    def check(self, total_steps: int, depth: int) -> None:
        """Raise an InputError naming the flag that makes this schedule invalid for the run."""
        if self.start < 0:
            raise InputError(f"{{cache_start_step}} {self.start} must be >= 0")
        if self.interval < 1:
            raise InputError(f"{{cache_step_interval}} {self.interval} must be >= 1")
        if self.start > self.end:
            raise InputError(f"{{cache_start_step}} {self.start} is after {{cache_end_step}} {self.end}")
        if self.end > total_steps:
            raise InputError(f"{{cache_end_step}} {self.end} is past the last step ({{num_inference_steps}} {total_steps})")
        if not 1 <= self.keep_blocks <= depth:
            raise InputError(f"{{cache_keep_blocks}} {self.keep_blocks} must be between 1 and the model's {depth} blocks")

    def split(self, depth: int) -> int:
        """The first kept block: where a full step saves the streams and a cached step starts."""
        return depth - self.keep_blocks

    def is_full(self, step: int) -> bool:
        return step < self.start or step >= self.end or (step - self.start) % self.interval == 0

    def full_steps(self, total_steps: int) -> list[int]:
        return [i for i in range(total_steps) if self.is_full(i)]
