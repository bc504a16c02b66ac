"""From a folder of clips to a LoRA, on the tiny models: run/prepare_dataset.py's rate and the
compiles of a training run over two buckets.

    python benchmarks/bucketed_training.py                   # 12 clips: 6 of 25 frames at 16:9, 6 of 49 at 9:16
    python benchmarks/bucketed_training.py --clips 24 --max_steps 16

Writes --clips synthetic clips (``synthetic.moving_ball``, 24 fps mp4s through the project's video
writer, with captions), half 128x72 and 25 frames, half 72x128 and 49 frames; prepares them at 96p
(two buckets: 25x96x160 and 49x160x96) with the commands as a user types them, then trains the
tiny DiT's LoRA on the result. Prints what each command reported: clips/s of the preparation
(after its models load; the VAE's jax tiles compile inside it, once per tile shape), and the
training run's compiled steps, their total compile time, and the seconds per update in each bucket
(median, from metrics.jsonl). The commands use every CPU; a busy machine stops the run (--allow_busy).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timing
from hunyuan_tpu.synthetic import moving_ball
from hunyuan_tpu.video import write_mp4

RUN = Path(__file__).resolve().parent.parent / "run"


def write_clips(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        frames, height, width = (25, 72, 128) if i % 2 == 0 else (49, 128, 72)
        write_mp4(folder / f"clip{i:03d}.mp4", moving_ball(frames, height, width, seed=i))
        (folder / f"clip{i:03d}.txt").write_text(f"a ball number {i} crosses the frame")


def command(script: str, *args: str) -> tuple[str, float]:
    cmd = [sys.executable, str(RUN / script), *args]
    print("$ " + " ".join(cmd[1:]), flush=True)
    begin = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - begin
    if done.returncode != 0:
        sys.exit(f"{script} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stdout, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=12, help="(default: %(default)s)")
    p.add_argument("--max_steps", type=int, default=8, help="training updates (default: %(default)s)")
    p.add_argument("--allow_busy", action="store_true",
                   help=f"run even when the load average is over {timing.BUSY_LOAD}, marking the results BUSY")
    args = p.parse_args()
    print(timing.check_quiet(args.allow_busy))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_clips(root / "clips", args.clips)
        out, prepare_s = command("prepare_dataset.py", "--videos", str(root / "clips"), "--output_dir",
                                 str(root / "dataset"), "--max_frames", "49")
        print(out.strip())
        rate = re.search(r"([\d.]+) clips/s", out)
        out, train_s = command("train.py", "--data", str(root / "dataset"), "--output_dir", str(root / "run"),
                               "--lora", "--dtype", "float32", "--batch_size", "2", "--max_steps", str(args.max_steps),
                               "--learning_rate", "1e-4")
        print(out.strip())
        summary = json.loads((root / "run" / "run.json").read_text())["summary"]
        rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    per_bucket = {}
    for row in rows:
        per_bucket.setdefault(row["bucket"], []).append(row["seconds"])
    print("\n| clips | prepare: command s | clips/s (encoding) | steps compiled | compile s (all) | "
          + " | ".join(f"s/update {b} (median of {len(v)})" for b, v in sorted(per_bucket.items()))
          + " | train: command s |")
    print("| --- " * (6 + len(per_bucket)) + "|")
    print(f"| {args.clips} | {prepare_s:.1f} | {rate.group(1) if rate else '?'} | {summary['compiles']} | "
          f"{summary['compile_s']:.1f} | "
          + " | ".join(f"{statistics.median(v):.3f}" for _, v in sorted(per_bucket.items()))
          + f" | {train_s:.1f} |")


if __name__ == "__main__":
    main()
