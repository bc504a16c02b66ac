"""Stage 2 twice with --compilation_cache_dir: the second run loads the step instead of compiling it.

    python benchmarks/compile_cache.py [stage-2 flags, e.g. --video_length 33 --height 256 --width 256]

Runs the weight-free demo in fresh processes against an empty cache folder, then again, and
prints each run's compile time as stage 2 records it in config.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STAGE2 = Path(__file__).resolve().parents[1] / "run" / "stage2_transformer.py"


def main() -> None:
    extra = sys.argv[1:]
    print(f"load average {os.getloadavg()[0]:.2f} at the start (a cold compile must come first: the runs cannot "
          "take turns)")
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        times = []
        for run in ("cold cache", "warm cache"):
            subprocess.run([sys.executable, str(STAGE2), "--demo", "--output_dir", str(out), "--warmup_steps", "0",
                            "--compilation_cache_dir", str(cache), *extra],
                           check=True, capture_output=True, text=True)
            record = json.loads((out / "config.json").read_text())["stage2"]
            times.append(record["compile_s"])
            print(f"{run}: compile {record['compile_s']:.2f} s, total {record['total_s']:.2f} s")
        print(f"the cache cut compile time by {times[0] / times[1]:.1f}x "
              f"({sum(f.stat().st_size for f in cache.rglob('*') if f.is_file()) / 2**20:.1f} MiB cached); "
              f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
