"""Training-checkpoint save and restore: gathering every tensor onto every host (the project's
way before orbax) against orbax-checkpoint (each process writes and reads its own shards), on 1
and 2 processes of this machine.

    python benchmarks/checkpoint_io.py                       # widened tiny, hidden 1024, 2 blocks
    python benchmarks/checkpoint_io.py --hidden 1536 --depth 4

The state is a full fine-tune's: float32 weights and AdamW's two moments, split over 8 CPU
devices by the fsdp strategy (1 process x 8 devices, or 2 processes x 4, run as a job by
``hunyuan_tpu.launch``; every job has the machine's CPUs, and the two ways take turns, job by
job). For each way: the seconds until the save returns and until it is on
disk, the seconds of a restore onto the same placement, and the peak of each process's resident
memory above what it held before (sampled every 5 ms from /proc/self/statm; the largest of the
processes). The gathered way writes two safetensors files from process 0 and restores by reading
them whole on every process, as training_checkpoint.py did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import timing

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The peak resident memory of this process above its level at entry, in bytes."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def build_state(hidden: int, depth: int):
    import jax
    import torch

    from hunyuan_tpu import parallel
    from hunyuan_tpu.config import widened_tiny
    from hunyuan_tpu.objective import Objective
    from hunyuan_tpu.params import random_params
    from hunyuan_tpu.training import OptimizerSettings, Trainer

    config = widened_tiny(hidden, depth)
    placement = parallel.placement(config, "fsdp", {"fsdp": jax.device_count()}, batch=1)
    trainer = Trainer(config, Objective(), OptimizerSettings(name="adamw"), placement=placement)
    return trainer.init_state(random_params(config, torch.float32, shardings=trainer.base_shardings))


def gathered_save(folder: Path, trainable, opt_state) -> None:
    import jax
    from safetensors.numpy import save_file

    from hunyuan_tpu.runtime import gather_to_host

    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
    weights = {k: gather_to_host(v) for k, v in trainable.items()}
    optimizer = {k: gather_to_host(v) for k, v in leaves.items()}
    if jax.process_index() == 0:
        save_file(weights, str(folder / "trainable.safetensors"))
        save_file(optimizer, str(folder / "optimizer.safetensors"))


def gathered_restore(folder: Path, trainable, opt_state):
    import jax
    from safetensors.numpy import load_file

    weights = load_file(str(folder / "trainable.safetensors"))
    optimizer = load_file(str(folder / "optimizer.safetensors"))
    place = lambda a, like: jax.make_array_from_callback(a.shape, like.sharding, lambda i: a[i])  # noqa: E731
    params = {k: place(weights[k], v) for k, v in trainable.items()}
    paths, tree = jax.tree_util.tree_flatten_with_path(opt_state)
    leaves = [place(optimizer[jax.tree_util.keystr(p)], x) for p, x in paths]
    return params, jax.tree_util.tree_unflatten(tree, leaves)


def measure(args: argparse.Namespace) -> dict:
    """In each process of the job: one save (``--phase save``) or restore of one way. A job does
    one phase of one way, so that no freed buffer of another phase hides a peak."""
    import gc

    import jax
    from jax.experimental import multihost_utils

    from hunyuan_tpu import parallel
    from hunyuan_tpu.training_checkpoint import Checkpoints, RunPosition

    parallel.initialize_distributed()
    state = jax.block_until_ready(build_state(args.hidden, args.depth))
    shards = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards)
    gc.collect()
    sync = lambda name: multihost_utils.sync_global_devices(name) if jax.process_count() > 1 else None  # noqa: E731
    out: dict[str, float] = {"state_mb": sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20,
                             "own_shards_mb": shards / 2**20}
    target = Path(args.folder) / args.way
    checkpoints = Checkpoints(target, keep=1) if args.way == "orbax" else None
    sync("start")
    with PeakMemory() as memory:
        begin = time.perf_counter()
        if args.phase == "save" and checkpoints:
            checkpoints.save(RunPosition(1, 1, 0, "bench"), state.trainable, state.opt_state)
            out["save_returns_s"] = time.perf_counter() - begin
            checkpoints.wait()
        elif args.phase == "save":
            if jax.process_index() == 0:
                target.mkdir(parents=True, exist_ok=True)
            gathered_save(target, state.trainable, state.opt_state)
        elif checkpoints:
            restored = checkpoints.restore(1, state.trainable, state.opt_state)
        else:
            restored = gathered_restore(target, state.trainable, state.opt_state)
        if args.phase == "restore":
            jax.block_until_ready(restored)
            del restored
        sync("done")
        out[f"{args.phase}_s"] = time.perf_counter() - begin
    out[f"{args.phase}_peak_mb"] = memory.extra / 2**20
    if checkpoints:
        checkpoints.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="turns of the two ways (default: %(default)s)")
    p.add_argument("--allow_busy", action="store_true",
                   help=f"measure even when the load average is over {timing.BUSY_LOAD}, marking the results BUSY")
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)  # a process of the job: results here
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--way", choices=("gathered", "orbax"), help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("save", "restore"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = measure(args)
        import jax

        Path(f"{args.worker}.{jax.process_index()}").write_text(json.dumps(out))
        return

    from hunyuan_tpu.launch import Job

    quiet = timing.check_quiet(args.allow_busy)

    def job(processes: int, way: str, phase: str, scratch: Path) -> dict:
        result = scratch / f"{way}_{phase}_{processes}.json"
        command = [sys.executable, __file__, "--hidden", str(args.hidden), "--depth", str(args.depth),
                   "--worker", str(result), "--way", way, "--phase", phase, "--folder", str(scratch / "ckpt")]
        running = Job(command, processes, cpu_devices=8 // processes, logs=scratch / "logs", echo=False, timeout=1800)
        ended = running.wait()
        running.close()
        if ended.returncode:
            raise SystemExit(f"{way} {phase} on {processes} process(es): {ended.message}")
        each = [json.loads(Path(f"{result}.{i}").read_text()) for i in range(processes)]
        merged = dict(each[0])  # times agree (each phase ends at a barrier); peaks: the largest process's
        for key in (f"{phase}_peak_mb", "own_shards_mb"):
            merged[key] = max(e[key] for e in each)
        return merged

    # the two ways take turns, save and restore, repeat by repeat; the fastest time, the largest peak
    rows: dict[tuple[int, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="checkpoint_io_") as scratch:
        for _ in range(args.repeats):
            for processes in (1, 2):
                for way in ("gathered", "orbax"):
                    shutil.rmtree(Path(scratch) / "ckpt", ignore_errors=True)
                    measured = {**job(processes, way, "save", Path(scratch)),
                                **job(processes, way, "restore", Path(scratch))}
                    row = rows.setdefault((processes, way), measured)
                    for key, value in measured.items():
                        row[key] = (max if key.endswith("_mb") else min)(row[key], value)
    rows = [(processes, way, r) for (processes, way), r in rows.items()]
    print(f"state: widened tiny, hidden {args.hidden}, {args.depth} double blocks: {rows[0][2]['state_mb']:.0f} MB of "
          f"float32 weights and AdamW moments, fsdp over 8 CPU devices; best time and largest peak of "
          f"{args.repeats} turns; {quiet}, {timing.load():.2f} at the end")
    print("| way | processes x devices | a process's shards MB | save returns s | save on disk s | restore s | "
          "save peak MB | restore peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for processes, way, r in rows:
        returns = f"{r['save_returns_s']:.2f}" if "save_returns_s" in r else "= on disk"
        print(f"| {way} | {processes} x {8 // processes} | {r['own_shards_mb']:.0f} | {returns} | {r['save_s']:.2f} | "
              f"{r['restore_s']:.2f} | {r['save_peak_mb']:.0f} | {r['restore_peak_mb']:.0f} |")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
