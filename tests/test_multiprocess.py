"""Multi-process JAX jobs on this machine (run/launch.py's ``Job``): 2 processes over 127.0.0.1
with real collectives, as the hosts of a pod slice run. Each process gets its own working
folder, standing for a host's own disk: relative paths land apart, so what process 1 writes
(nothing) and what it reads (its own copy of the inputs) are seen."""

import dataclasses
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import cli_runner
from hunyuan_tpu import parallel
from hunyuan_tpu.checkpoint import save_transformer
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.dataset import write_dataset
from hunyuan_tpu.files import InputError
from hunyuan_tpu.launch import Job
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.synthetic import training_samples

STAGE2 = "stage2_transformer.py"
TRAIN = "train.py"
TIMEOUT = 240  # seconds a job may run before every process is stopped
CFG = DiTConfig.preset("tiny")
ONE_BLOCK = dataclasses.replace(CFG, mm_double_blocks_depth=1)


def job(script: str, *args, processes: int = 2, cpu_devices: int = 4, workdirs=None, logs: Path) -> Job:
    return Job(cli_runner.command(script, *args), processes, cpu_devices=cpu_devices, logs=logs, echo=False,
               workdirs=workdirs, environ=cli_runner.environment(), timeout=TIMEOUT)


def finish(running: Job) -> None:
    ended = running.wait()
    running.close()
    assert ended.returncode == 0, ended.message + "\n" + (running.logs / "process_0.err").read_text()[-3000:]


def latents(folder: Path) -> np.ndarray:
    return load_file(str(folder / "latents.safetensors"))["latents"].numpy()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> list[Path]:
    """Two 'hosts', each with its copy of stage 1's demo outputs under in/."""
    demo = tmp_path_factory.mktemp("demo")
    cli_runner.call(STAGE2, "--demo", "--output_dir", demo, "--num_inference_steps", 4, "--warmup_steps", 0)
    folders = [tmp_path_factory.mktemp(f"host{i}") for i in range(2)]
    for folder in folders:
        shutil.copytree(demo, folder / "in")
    return folders


def test_stage2_on_two_processes_equals_one(hosts, tmp_path):
    """2 processes x 4 devices give the latents of 1 process x 8, bit for bit, for the default
    strategy and fsdp; process 0 alone writes."""
    args = ("--input_dir", "in", "--warmup_steps", 0, "--num_inference_steps", 4)
    default = job(STAGE2, *args, "--output_dir", "default", workdirs=hosts, logs=tmp_path / "default")
    fsdp = job(STAGE2, *args, "--output_dir", "fsdp", "--sharding", "fsdp", workdirs=hosts, logs=tmp_path / "fsdp")
    # fsdp's layer norms sum partial results across devices, in gloo's order once JAX runs as a job:
    # the 1 x 8 reference is a 1-process job, so that both sum alike
    reference = job(STAGE2, *args, "--output_dir", tmp_path / "fsdp_1x8", "--sharding", "fsdp", processes=1,
                    cpu_devices=8, workdirs=hosts[:1], logs=tmp_path / "reference")
    for running in (default, fsdp, reference):
        finish(running)
    one_process = tmp_path / "default_1x8"
    cli_runner.call(STAGE2, "--input_dir", hosts[0] / "in", "--output_dir", one_process, *args[2:],
                    devices=8)

    first, second = hosts
    assert np.array_equal(latents(first / "default"), latents(one_process))
    assert np.array_equal(latents(first / "fsdp"), latents(tmp_path / "fsdp_1x8"))
    record = json.loads((first / "fsdp" / "config.json").read_text())["stage2"]
    assert (record["sharding"], record["mesh"], record["devices"]["count"]) == ("fsdp", "fsdp=8", 8)
    assert sorted(p.name for p in (first / "fsdp").iterdir()) == ["config.json", "latents.safetensors"]
    assert not (second / "default").exists() and not (second / "fsdp").exists()  # process 1 wrote nothing


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_process_fails_the_job(hosts, tmp_path, failing):
    """One host lacks an input file: the job ends with that process's line, the other is stopped,
    and no output is left."""
    workdirs = []
    for i, host in enumerate(hosts):
        workdirs.append(tmp_path / f"host{i}")
        shutil.copytree(host / "in", workdirs[-1] / "in")
    (workdirs[failing] / "in" / "embeddings.safetensors").unlink()
    running = job(STAGE2, "--input_dir", "in", "--output_dir", "out", "--num_inference_steps", 4, workdirs=workdirs,
                  logs=tmp_path / "logs")
    begin = time.monotonic()
    ended = running.wait()
    running.close()
    assert ended.returncode == 2 and ended.process == failing, ended
    assert ended.message.startswith(f"process {failing} of 2 exited with 2: error: ") and \
        "embeddings.safetensors" in ended.message and "\n" not in ended.message
    assert time.monotonic() - begin < 120
    for folder in workdirs:
        assert not (folder / "out").exists() or not any((folder / "out").iterdir())


def test_a_process_killed_mid_run_stops_the_job(hosts, tmp_path):
    """A host lost while the others wait for it in a collective: the job ends at once, naming it;
    the last checkpoint is whole, and nothing else was written."""
    running = job(STAGE2, "--input_dir", hosts[0] / "in", "--output_dir", tmp_path / "out", "--num_inference_steps",
                  400, "--checkpoint_every", 5, logs=tmp_path / "logs")
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "out" / "stage2_checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    running.processes[1].send_signal(signal.SIGKILL)
    begin = time.monotonic()
    ended = running.wait()
    running.close()
    assert (ended.returncode, ended.message) == (137, "process 1 of 2 was killed by signal 9 (SIGKILL)")
    assert time.monotonic() - begin < 30
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["stage2_checkpoint.safetensors"]
    assert load_file(str(tmp_path / "out" / "stage2_checkpoint.safetensors"))["latents"].shape[0] == 1


@pytest.fixture(scope="module")
def training(tmp_path_factory) -> list:
    """A one-block model, 8 samples, and the arguments of a short fsdp run over 2 devices. (No
    persistent compilation cache: a step from it ran 6x slower in a job on this CPU.)"""
    folder = tmp_path_factory.mktemp("training")
    model = randomize_like_trained_(HunyuanVideo15DiT(ONE_BLOCK), seed=0)
    samples, empty = training_samples(CFG, count=8, latent=(3, 4, 6), seed=3)
    args = ["--dtype", "float32", "--optimizer", "adamw", "--learning_rate", "1e-3", "--batch_size", 2,
            "--no-gradient_checkpointing", "--model", save_transformer(model, folder / "one_block"),
            "--data", write_dataset(folder / "data", samples, shard_size=4, empty_prompt=empty),
            "--max_steps", 8, "--checkpoint_every", 2, "--keep_checkpoints", 2, "--text_dropout", 0.3]
    return args


def curve(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def final_weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(folder / "final" / "diffusion_pytorch_model.safetensors")).items()}


def test_training_on_two_processes_killed_and_resumed(training, tmp_path):
    """Killed (both processes, SIGKILL) after a checkpoint, resumed on 2 processes: the losses and
    the final weights equal an uninterrupted 2-process run's bit for bit; the same checkpoint
    resumed on 1 process x 8 devices (another mesh) continues the same curve."""
    args = training
    two = dict(processes=2, cpu_devices=1)
    killed = tmp_path / "killed"
    logs = tmp_path / "killed_logs"
    running = job(TRAIN, *args, "--mesh", "fsdp=2", "--output_dir", killed, logs=logs, **two)
    deadline = time.monotonic() + TIMEOUT
    while not (killed / "checkpoints" / "step_000004").exists() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in running.processes), (logs / "process_0.err").read_text()
        time.sleep(0.05)
    for p in running.processes:
        p.send_signal(signal.SIGKILL)
    running.close()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    shutil.copytree(killed, tmp_path / "on_one_process")

    # one job at a time: two jobs' collectives on two cores wait for each other's time slices
    finish(job(TRAIN, *args, "--mesh", "fsdp=2", "--output_dir", tmp_path / "whole", logs=tmp_path / "whole_logs",
               **two))
    finish(job(TRAIN, *args, "--mesh", "fsdp=2", "--output_dir", killed, "--resume", logs=tmp_path / "logs", **two))
    assert "resuming at update " in (tmp_path / "logs" / "process_0.err").read_text()
    assert curve(killed) == curve(tmp_path / "whole") and len(curve(killed)) == 8
    reference = final_weights(tmp_path / "whole")
    again = final_weights(killed)
    assert reference.keys() == again.keys() and all(np.array_equal(reference[k], again[k]) for k in reference)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    assert (killed / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = cli_runner.call(TRAIN, *args, "--mesh", "fsdp=8", "--output_dir", tmp_path / "on_one_process", "--resume",
                           devices=8)
    assert "resuming at update " in proc.stderr
    losses = [[row["loss"] for row in curve(folder)] for folder in (killed, tmp_path / "on_one_process")]
    assert np.allclose(*losses, rtol=1e-4)
    assert all(rel_l2(final_weights(tmp_path / "on_one_process")[k], reference[k]) < 1e-4 for k in reference)


def test_job_timeout_and_signals_are_reported(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text("import os, signal, sys, time\n"
                      "if os.environ['JAX_PROCESS_ID'] == '1': os.kill(os.getpid(), signal.SIGKILL)\n"
                      "time.sleep(60)\n")
    running = Job(["python3", str(script)], 2, logs=tmp_path, echo=False, timeout=30)
    ended = running.wait()
    running.close()
    assert (ended.returncode, ended.process) == (128 + signal.SIGKILL, 1)
    assert ended.message == "process 1 of 2 was killed by signal 9 (SIGKILL)"
    script.write_text("import time\ntime.sleep(60)\n")
    running = Job(["python3", str(script)], 2, logs=tmp_path, echo=False, timeout=0.5)
    ended = running.wait()
    running.close()
    assert ended.returncode == 124 and "ran past 0.5 s" in ended.message
    assert all(p.poll() is not None for p in running.processes)


def test_launcher_bad_flags_are_one_line(tmp_path):
    """Refused before any process starts: exit 2, one line naming the flag."""
    script = tmp_path / "never.py"
    script.write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    for flags, message in ((["--processes", 0], "--processes 0 must be >= 1"),
                           (["--cpu_devices", 0], "--cpu_devices 0 must be >= 1"),
                           (["--timeout", -1], "--timeout -1.0 must be > 0 seconds"),
                           (["--timeout", "nan"], "--timeout nan must be > 0 seconds")):
        proc = cli_runner.call("launch.py", *flags, "--logs", tmp_path / "logs", script, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {message}"], proc.stderr
    assert not (tmp_path / "ran").exists()


def test_distributed_environment_is_checked():
    for environ, message in [
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
         "JAX_NUM_PROCESSES='two' is not a whole number"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
         r"JAX_PROCESS_ID=2 must be between 0 and JAX_NUM_PROCESSES - 1 \(1\)"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"}, "set both"),
    ]:
        with pytest.raises(InputError, match=message):
            parallel.initialize_distributed(environ)
    assert parallel.initialize_distributed({}) is False
