"""What a compiled program sends between devices, read from its optimized HLO text."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_OP = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>.+?)\s+(?P<kind>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # size of the result on one device
    group: int  # devices taking part (1 for collective-permute pairs)

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends, for the usual ring / pairwise algorithms."""
        n = self.group
        if self.kind == "all-reduce":
            return 2 * (n - 1) / n * self.bytes
        if self.kind in ("all-gather", "all-to-all"):
            return (n - 1) / n * self.bytes
        if self.kind == "reduce-scatter":
            return (n - 1) * self.bytes
        return float(self.bytes)  # collective-permute: the whole buffer to one peer


def _array_bytes(text: str) -> list[int]:
    return [_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _ARRAY.findall(text)]


def _group_size(line: str) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[[\d,]*?(\d+)\]<=", line)
    if m:
        return int(m.group(1))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    return 1


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective op of the module (async pairs counted once, at their start)."""
    found = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        sizes = _array_bytes(m.group("type"))
        # an async start returns (operand(s), result): the result is the last array
        nbytes = sizes[-1] if m.group("start") else sum(sizes)
        found.append(Collective(m.group("kind"), nbytes, _group_size(line)))
    return found


def summary(ops: list[Collective]) -> dict[str, tuple[int, int]]:
    """kind -> (count, result bytes), for every collective kind (zeros included)."""
    counts, sizes = Counter(), Counter()
    for op in ops:
        counts[op.kind] += 1
        sizes[op.kind] += op.bytes
    return {kind: (counts[kind], sizes[kind]) for kind in COLLECTIVES}
