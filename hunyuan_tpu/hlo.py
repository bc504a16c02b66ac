"""What a compiled program sends between devices and computes, read from its optimized HLO text.

An op inside a loop runs once per iteration: each computation is counted as many times as
the program runs it (a while body of known trip count n, as the scanned double blocks are,
n times per run of the computation holding the loop). XLA's own ``cost_analysis`` counts a
loop body once, whatever its trip count.
"""

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


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>\S+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLEE = re.compile(r"\b(?P<role>calls|to_apply|body|condition|true_computation|false_computation)=%(?P<name>[^\s,)]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>\S+)\s*=\s*(?P<type>\S+)\s+(?P<op>[\w-]+)\((?P<operands>[^)]*)\)")
_PARAM = re.compile(r"(?P<name>[\w.-]+):\s*(?P<type>\w+\[[\d,]*\])")


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines, in the order of the text (callees first)."""
    found: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = found.setdefault(m.group("name"), [line])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return found


def multiplicity(hlo_text: str) -> dict[str, int]:
    """Computation name -> how many times one run of the program runs it: a while body of
    known trip count n runs n times per run of its caller (an unknown count: once)."""
    comps = computations(hlo_text)
    runs = Counter()
    entry = next((m.group(1) for m in re.finditer(r"^ENTRY\s+%(\S+)", hlo_text, re.M)), None)
    runs[entry] = 1
    for name in reversed(list(comps)):  # callers come after their callees in the text
        for line in comps[name][1:]:
            trips = _TRIP_COUNT.search(line)
            callees = [(m.group("role"), m.group("name")) for m in _CALLEE.finditer(line)]
            callees += [("branch", n.strip().lstrip("%")) for m in _BRANCHES.finditer(line)
                        for n in m.group("names").split(",")]
            for role, callee in callees:
                factor = int(trips.group(1)) if role == "body" and trips else 1
                runs[callee] += runs[name] * factor
    return {name: runs[name] for name in comps}


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
    """Every collective op as one run of the module runs them (async pairs counted once, at
    their start; one inside a loop once per iteration)."""
    runs = multiplicity(hlo_text)
    found = []
    for name, lines in computations(hlo_text).items():
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            sizes = _array_bytes(m.group("type"))
            # an async start returns (operand(s), result): the result is the last array
            nbytes = sizes[-1] if m.group("start") else sum(sizes)
            found += [Collective(m.group("kind"), nbytes, _group_size(line))] * runs[name]
    return found


def _dims(array_type: str) -> list[int]:
    return [int(d) for d in array_type[array_type.index("[") + 1:array_type.index("]")].split(",") if d]


def dot_flops(hlo_text: str) -> float:
    """FLOPs of the module's dots as one run runs them: 2 per multiply-add, each loop
    iteration counted (what ``cost_analysis`` reports for an unrolled program, less the
    elementwise work)."""
    runs = multiplicity(hlo_text)
    total = 0.0
    for name, lines in computations(hlo_text).items():
        types = {m.group("name"): m.group("type") for m in _PARAM.finditer(lines[0])}
        for line in lines[1:]:
            m = _DEF.match(line)
            if not m:
                continue
            types[m.group("name")] = m.group("type")
            if m.group("op") != "dot":
                continue
            lhs = _dims(types[m.group("operands").split(",")[0].split()[-1].lstrip("%")])  # "[type] %name"
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
            depth = math.prod(lhs[int(d)] for d in contracting.split(",") if d)
            total += 2.0 * math.prod(_dims(m.group("type"))) * depth * runs[name]
    return total


def summary(ops: list[Collective]) -> dict[str, tuple[int, int]]:
    """kind -> (count, result bytes), for every collective kind (zeros included)."""
    counts, sizes = Counter(), Counter()
    for op in ops:
        counts[op.kind] += 1
        sizes[op.kind] += op.bytes
    return {kind: (counts[kind], sizes[kind]) for kind in COLLECTIVES}
