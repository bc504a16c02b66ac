"""Run a script as an N-process JAX job on this machine: what the hosts of a pod slice do,
here over 127.0.0.1 (a test of multi-host code without a pod, or several processes sharing
one machine's devices).

    python run/launch.py --processes 2 --cpu_devices 4 -- run/stage2_transformer.py --demo
    python run/launch.py --processes 2 --cpu_devices 4 -- run/train.py --demo --mesh fsdp=8

Each process gets JAX_COORDINATOR_ADDRESS (a free port on 127.0.0.1), JAX_NUM_PROCESSES and
JAX_PROCESS_ID; the script joins the job itself (every script of run/ does). On a TPU pod
slice there is nothing to launch: run the script on every host (README: Pods).
"""

from __future__ import annotations

import argparse
import sys

from hunyuan_tpu.launch import Job
from stage_cli import Parser, run_main


def build_parser() -> Parser:
    p = Parser(description="Run a Python script as a multi-process JAX job on this machine.")
    p.add_argument("--processes", type=int, default=2, metavar="N", help="processes in the job (default: %(default)s)")
    p.add_argument("--cpu_devices", type=int, metavar="N",
                   help="virtual CPU devices per process (default: the platform's own devices)")
    p.add_argument("--timeout", type=float, metavar="S", help="stop every process after S seconds (exit 124)")
    p.add_argument("--logs", metavar="DIR", help="where processes 1..N-1 write process_<i>.out/.err "
                   "(default: a temporary folder, removed at the end)")
    p.add_argument("script", help="the Python script every process runs")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def run(args: argparse.Namespace) -> int:
    job = Job([sys.executable, args.script, *args.script_args], args.processes, cpu_devices=args.cpu_devices,
              logs=args.logs, timeout=args.timeout)
    try:
        ended = job.wait()
    finally:
        job.close()
    # process 0's own error line is already on the terminal
    if ended.returncode and not (ended.process == 0 and job.echo and ended.returncode < 128):
        sys.stderr.write(f"error: {ended.message}\n")
    return ended.returncode


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
