"""run/prepare_dataset.py end to end (in-process, tiny models): a folder of synthetic captioned
clips of two shapes, an image, a corrupt file and a clip without caption, prepared into buckets,
prepared again (skipped by content), and trained on across its buckets with one compiled step
per bucket."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import compiles
import prepare_dataset
import train
from hunyuan_tpu import clips as cl
from hunyuan_tpu import image_condition as ic
from hunyuan_tpu import text_encoding as te
from hunyuan_tpu.checkpoint import save_transformer
from hunyuan_tpu.config import DiTConfig
from hunyuan_tpu.dataset import TrainingData
from hunyuan_tpu.metrics import rel_l2
from hunyuan_tpu.model import HunyuanVideo15DiT
from hunyuan_tpu.random_init import randomize_like_trained_
from hunyuan_tpu.synthetic import moving_ball
from hunyuan_tpu.vae import posterior_latents, tiny_vae, video_encoder
from hunyuan_tpu.video import write_mp4, write_png
from hunyuan_tpu.stage_encode import Encoders, encode_prompt

CFG = DiTConfig.preset("tiny")
# 24 fps sources cut to 5 or 9 frames; 96p buckets: 128x72 -> 96x160, 72x128 -> 160x96, 64x64 -> 128x128.
# The VAE eager: its jax tiles (the default) are tested against these in test_vae, and compile per shape.
FLAGS = ["--frame_buckets", "5,9", "--max_frames", "9", "--shard_size", "4", "--i2v", "--vae_backend", "torch"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """13 clips (6 landscape mp4s of 7 frames, 6 portrait ones of 13, a portrait gif of 10), an
    image, a corrupt video, a clip without caption."""
    d = tmp_path_factory.mktemp("clips")
    for i in range(6):
        write_mp4(d / f"wide{i}.mp4", moving_ball(7, 72, 128, i))
        (d / f"wide{i}.txt").write_text(f"a ball number {i} rolls to the side\n")
        write_mp4(d / f"tall{i}.mp4", moving_ball(13, 128, 72, 10 + i))
        (d / f"tall{i}.txt").write_text(f'a tall ball {i}, a sign reads "HELLO {i}"')
    gif = [Image.fromarray(f) for f in moving_ball(10, 128, 72, 30)]  # 10 fps: every frame taken, cut to 9
    gif[0].save(d / "tall_anim.gif", save_all=True, append_images=gif[1:], duration=100, loop=0)
    (d / "tall_anim.txt").write_text("an animated ball")
    write_png(d / "still.png", moving_ball(1, 64, 64, 99)[0])
    (d / "still.txt").write_text("a ball at rest")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing a decoder can use")
    (d / "broken.txt").write_text("never read")
    write_mp4(d / "uncaptioned.mp4", moving_ball(7, 72, 128, 50))
    return d


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "data"
    code = prepare_dataset.main(["--videos", str(folder), "--output_dir", str(out), *FLAGS])
    return out, code


def read_report(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]


def test_clips_are_bucketed_and_the_unusable_ones_reported(prepared, folder):
    out, code = prepared
    assert code == prepare_dataset.EXIT_SKIPPED
    report = read_report(out)
    assert [r["file"] for r in report] == ["broken.mp4", "uncaptioned.mp4"]
    assert report[0]["reason"].startswith("cannot read the video (")
    assert report[1]["reason"] == "no caption (uncaptioned.txt is missing or unreadable)"
    data = TrainingData(out, CFG)
    assert [(b.name, b.samples, len(b.shards)) for b in data.buckets] == [
        ("1x128x128", 1, 1), ("5x96x160", 6, 2), ("9x160x96", 7, 2)]
    assert data.empty_prompt() is not None and data.i2v_capable
    # the shards name their clips; a sample is what the stage-1 encoders and the VAE make of that clip
    with safe_open(str(out / "9x160x96-00000.safetensors"), framework="np") as f:
        files = json.loads(f.metadata()["files"])
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert files == ["tall0.mp4", "tall1.mp4", "tall2.mp4", "tall3.mp4"]
    assert stored["prompt_embeds"].dtype == np.float16  # the LLM's own dtype
    clip = cl.Clip(folder / "tall1.mp4", "tall1.mp4", 'a tall ball 1, a sign reads "HELLO 1"')
    frames = cl.read_frames(clip, cl.FrameRule((5, 9)), "96p")
    assert frames.shape == (9, 160, 96, 3)
    vae = tiny_vae(seed=0)
    key = cl.content_key(clip.path)
    latents = posterior_latents(video_encoder(vae, backend="torch")(cl.to_pixels(frames)), vae.scaling_factor,
                                "sample", cl.clip_seed(key, 0))
    assert rel_l2(stored["latents"][1:2], latents) < 1e-5
    encoders = Encoders(te.tiny_llm(CFG.text_states_dim, torch.float16), te.tiny_byt5(CFG.byt5_states_dim))
    text, _, glyphs = encode_prompt(encoders, clip.caption)
    assert int(glyphs.mask.sum()) > 0  # the quoted text reached the glyph encoder
    np.testing.assert_array_equal(stored["prompt_embeds"][1:2], text["prompt_embeds"].half().numpy())
    np.testing.assert_array_equal(stored["prompt_mask_2"][1:2], text["prompt_mask_2"].numpy())
    siglip = ic.encode_siglip(ic.tiny_siglip(CFG.vision_states_dim, torch.float16), Image.fromarray(frames[0]))
    np.testing.assert_array_equal(stored["vision_states"][1:2], siglip.half().numpy())


def test_a_second_run_skips_clips_by_content_and_recovers_from_a_kill(prepared, folder, tmp_path, capsys):
    out, _ = prepared
    again = tmp_path / "again"
    # the folder as a run killed mid-way leaves it: the last shard of a bucket never written (its
    # clips were waiting in memory), a temporary of one being written, no manifest
    shutil.copytree(out, again)
    (again / "5x96x160-00001.safetensors").unlink()
    (again / "dataset.json").unlink()
    (again / ".5x96x160-00001.tmp99999999.safetensors").write_bytes(b"half a shard")
    (folder / "wide0.mp4").rename(folder / "renamed.mp4")  # known by content: not encoded again
    (folder / "wide0.txt").rename(folder / "renamed.txt")
    try:
        capsys.readouterr()
        code = prepare_dataset.main(["--videos", str(folder), "--output_dir", str(again), *FLAGS])
    finally:
        (folder / "renamed.mp4").rename(folder / "wide0.mp4")
        (folder / "renamed.txt").rename(folder / "wide0.txt")
    assert code == prepare_dataset.EXIT_SKIPPED
    assert "prepare: 2 clip(s) encoded" in capsys.readouterr().out  # wide4 and wide5, whose shard was lost
    assert sorted(p.name for p in again.iterdir() if p.name.startswith(".")) == []
    data = TrainingData(again, CFG)
    assert [(b.name, b.samples) for b in data.buckets] == [("1x128x128", 1), ("5x96x160", 6), ("9x160x96", 7)]
    # other settings into the same folder are refused, by name
    assert prepare_dataset.main(["--videos", str(folder), "--output_dir", str(again), *FLAGS,
                                 "--posterior", "mode"]) == 2
    assert "prepared with other settings (posterior)" in capsys.readouterr().err


def test_training_runs_over_both_buckets_with_one_step_compiled_per_bucket(prepared, tmp_path, capsys):
    out, _ = prepared
    model = save_transformer(randomize_like_trained_(HunyuanVideo15DiT(dataclasses.replace(
        CFG, mm_double_blocks_depth=1)), seed=0), tmp_path / "one_block")
    run = tmp_path / "run"
    with compiles.recorded() as compiled:
        code = train.main(["--data", str(out), "--model", str(model), "--output_dir", str(run), "--lora",
                           "--dtype", "float32", "--optimizer", "adamw", "--learning_rate", "1e-3", "--batch_size",
                           "2", "--no-gradient_checkpointing", "--max_steps", "4", "--text_dropout", "0.2"])
    assert code == 0
    assert compiled.count("jit(_step)") == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["bucket"] for r in rows} == {"5x96x160", "9x160x96"}
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["compiles"] == 2 and sum(summary["buckets"].values()) == 4
    err = capsys.readouterr().err
    assert "bucket 1x128x128 has 1 samples, fewer than an update's 2: not trained on" in err
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_bad_input_is_one_line(folder, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"file": "wide0.mp4"}\n')
    (tmp_path / "bad.csv").write_text("name,text\nwide0.mp4,a ball\n")
    (tmp_path / "a_file").write_text("")
    cases = [
        ([], "--videos DIR is required"),
        (["--videos", str(tmp_path / "none")], "no such folder"),
        (["--videos", str(tmp_path)], "no videos"),
        (["--videos", str(folder), "--frame_buckets", "5,8"], "of the form 4k+1"),
        (["--videos", str(folder), "--max_frames", "9", "--frame_buckets", "5,13"], "more than --max_frames 9"),
        (["--videos", str(folder), "--frame_stride", "0"], "--frame_stride 0 must be >= 1"),
        (["--videos", str(folder), "--shard_size", "0"], "--shard_size 0 must be >= 1"),
        (["--videos", str(folder), "--captions", str(folder / "wide0.txt")], "must be a .jsonl or a .csv"),
        (["--videos", str(folder), "--captions", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
        (["--videos", str(folder), "--captions", str(tmp_path / "bad.jsonl")],
         'bad.jsonl: line 1 is not a JSON object with "file" and "caption"'),
        (["--videos", str(folder), "--captions", str(tmp_path / "bad.csv")],
         "bad.csv: needs a header row with the columns file and caption"),
        (["--videos", str(folder), "--frame_buckets", "5,nine"], "give lengths like 25,49,121"),
        (["--videos", str(folder), "--fps", "0"], "--fps 0.0 must be > 0"),
        (["--videos", str(folder), "--output_dir", str(tmp_path / "a_file")], "exists and is not a folder"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert prepare_dataset.main(["--output_dir", str(tmp_path / "out"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "out").exists()
    # a folder holding safetensors files this command did not write is left as it is
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-00000.safetensors").write_bytes(b"not ours")
    assert prepare_dataset.main(["--videos", str(folder), "--output_dir", str(foreign), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "shard-00000.safetensors: not a shard this preparation wrote" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in foreign.iterdir()) == ["shard-00000.safetensors"]


def test_non_finite_latents_skip_the_clip(tmp_path, capsys):
    """A VAE that gives NaN (as one in float16 may, overflowing): the clip is reported, not stored,
    and nothing else is written."""
    clips = tmp_path / "clips"
    clips.mkdir()
    write_mp4(clips / "ball.mp4", moving_ball(7, 72, 128, 0))
    (clips / "ball.txt").write_text("a ball")
    vae = tiny_vae(seed=0)
    with torch.no_grad():
        vae.model.encoder.conv_out.conv.bias.fill_(float("nan"))
    vae.model.save_pretrained(tmp_path / "vae")
    out = tmp_path / "data"
    assert prepare_dataset.main(["--videos", str(clips), "--output_dir", str(out), "--vae", str(tmp_path / "vae"),
                                 *FLAGS]) == prepare_dataset.EXIT_SKIPPED
    assert read_report(out) == [{"file": "ball.mp4", "reason": "the models gave non-finite values in latents "
                                 f"({prepare_dataset.FLOAT32_HINT})"}]
    assert sorted(p.name for p in out.iterdir()) == ["report.jsonl"]


def test_captions_from_a_jsonl_or_csv_file(folder, tmp_path):
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "wide1.mp4", "caption": " from jsonl "}) + "\n")
    (tmp_path / "captions.csv").write_text('file,caption\nstill.png,"from csv, with a comma"\n')
    by_name = {c.name: c.caption for c in cl.find_clips(folder, tmp_path / "captions.jsonl")}
    assert by_name["wide1.mp4"] == "from jsonl" and by_name["wide2.mp4"] is None
    by_name = {c.name: c.caption for c in cl.find_clips(folder, tmp_path / "captions.csv")}
    assert by_name["still.png"] == "from csv, with a comma" and by_name["wide1.mp4"] is None
    assert {c.name: c.caption for c in cl.find_clips(folder)}["wide1.mp4"] == "a ball number 1 rolls to the side"


def test_frames_are_taken_at_the_target_rate_and_cut_to_an_allowed_length(tmp_path):
    video = np.repeat(np.arange(30, dtype=np.uint8)[:, None, None, None] * 8, 32, axis=1).repeat(32, 2).repeat(3, 3)
    write_mp4(tmp_path / "v.mp4", video, fps=24)  # frame n is grey 8n: its number survives compression
    clip = cl.Clip(tmp_path / "v.mp4", "v.mp4", "x")

    def marks(frames: np.ndarray) -> list[int]:
        return [round(float(f.mean()) / 8) for f in frames]

    assert marks(cl.read_frames(clip, cl.FrameRule((5, 9, 13, 17)), "96p")) == list(range(17))
    assert marks(cl.read_frames(clip, cl.FrameRule((5, 9), fps=12.0), "96p")) == list(range(0, 18, 2))
    taken = cl.read_frames(clip, cl.FrameRule((5, 9), fps=None, stride=3), "96p")
    assert marks(taken) == list(range(0, 27, 3)) and taken.shape == (9, 128, 128, 3)  # the 96p 1:1 bucket
    with pytest.raises(cl.ClipError, match="too short: 10 frames at the chosen rate, the shortest length is 13"):
        cl.read_frames(clip, cl.FrameRule((13,), fps=None, stride=3), "96p")
