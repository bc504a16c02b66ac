"""Stage 1's encoders: eager PyTorch on the host against the jitted JAX path (``encoder_runtime``).

    python benchmarks/stage1_encoders.py project                  # full-size encoders compiled abstractly, on v6e
    python benchmarks/stage1_encoders.py host --layers 2 --repeats 3   # 2 full-width Qwen layers, this CPU
    python benchmarks/stage1_encoders.py tiny --repeats 5         # stage 1's tiny encoders, this CPU

``project`` lowers the released shapes without weights (the model built on the meta device,
``jax.ShapeDtypeStruct`` parameters) through the same function ``encoder_runtime`` jits, compiles
it, and puts XLA's cost analysis on one chip: t = max(FLOPs / peak, HBM bytes / bandwidth)
(``projection.roofline``; no ICI: one chip runs a whole encoder). Like ``projection.project_step``
it compiles in float32 (XLA:CPU has no bf16 matmul and would add float32 copies of the weights) and
counts bf16 weights: parameters x 2 bytes exactly, XLA's bytes accessed and temporaries halved.
The LLM's attention is the reference kernel (the mask is causal + padding, (B, 1, L, S), which the
flash-traffic stand-in does not take), so its (L, S) scores are in the bytes; 1108 tokens keep
them small beside the weights. Encoders: the Qwen2.5-VL-7B language model at crop_start + 1000 =
1108 tokens (one prompt; stage 1 runs it twice, prompt and negative prompt), Glyph-ByT5
(byt5-small) at 256 tokens, SigLIP so400m-patch14-384 on one 384 x 384 image (i2v).

``host`` times one forward at the LLM's full width and 1108 tokens with the first --layers of its
28 layers (seeded random weights), eager in float32 and bfloat16 and jitted (XLA:CPU) in both,
the paths taking turns on one thread budget, and extrapolates per layer: the eager path runs all
28 layers (``output_hidden_states`` builds them all), the jitted one the 26 that
``hidden_states[-3]`` needs (XLA drops the last 2). The vocabulary is cut to 4096 rows (the
embedding is a gather of 1108 rows: no work, 2 GB of host memory at full size). ``tiny`` times
the model calls of one stage-1 run (prompt and negative prompt through the LLM at crop_start +
1000 tokens, the quoted text through ByT5 at 256) with the tiny encoders stage 1 builds without
weights, eager against jitted (the first jitted call compiling, reported apart). Both refuse a
busy machine (--allow_busy marks the table instead).
"""

from __future__ import annotations

import timing

THREADS = timing.pin_threads(timing.threads_flag())

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen2_5_VLTextModel, SiglipVisionModel, T5EncoderModel  # noqa: E402

from hunyuan_tpu import encoder_runtime as er  # noqa: E402
from hunyuan_tpu import projection  # noqa: E402
from hunyuan_tpu import text_encoding as te  # noqa: E402
from hunyuan_tpu.config import DiTConfig  # noqa: E402
from hunyuan_tpu.random_init import randomize_like_trained_  # noqa: E402
from released_configs import LLM_LAYERS, byt5_config, qwen_config, siglip_config  # noqa: E402

CROP_START = 108  # the Qwen2.5-VL tokenizer's, with the video template (text_encoding's docstring)
LLM_TOKENS = CROP_START + te.LLM_MAX_LENGTH
GB = 1e9


# ---- project -------------------------------------------------------------------------------------

def _on_meta(cls: type, config) -> torch.nn.Module:
    with torch.device("meta"):
        return cls(config).to(torch.float32).eval()


def _project_one(name: str, model: torch.nn.Module, output: er.Output, inputs: dict[str, jax.ShapeDtypeStruct],
                 chip: projection.Chip, **fixed) -> None:
    params = er.abstract_params(model)
    weights = sum(projection.BF16 * math.prod(p.shape) for p in params.values() if p.dtype == jnp.float32)
    begin = time.perf_counter()
    compiled = jax.jit(er.encoder_function(model, output, **fixed)).lower(params, **inputs).compile()
    compile_s = time.perf_counter() - begin
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    hbm = cost["bytes accessed"] / 2  # float32 compile, bf16 on the chip (module docstring)
    r = projection.roofline(cost["flops"], hbm, 0.0, chip)
    need = weights + (memory.temp_size_in_bytes + memory.output_size_in_bytes) / 2
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    print(f"| {name} | {shapes} | {weights / GB:.2f} | {cost['flops'] / 1e12:.2f} | {hbm / GB:.1f} | "
          f"{need / GB:.1f} | {r.compute_s * 1e3:.1f} | {r.memory_s * 1e3:.1f} | {r.step_s * 1e3:.1f} | "
          f"{compile_s:.0f} |", flush=True)


def project(args: argparse.Namespace) -> None:
    chip = projection.CHIPS[args.chip]
    print(f"{chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e12:.2f} TB/s HBM, "
          f"{chip.hbm_bytes / GB:.0f} GB; one chip per encoder call, bf16 weights; compiled on "
          f"{jax.devices()[0].platform} (float32, counted in bf16)\n")
    print("| encoder | inputs | weights GB (bf16) | TFLOP | HBM GB accessed | HBM GB needed | compute ms | "
          "memory ms | max ms | compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    tokens = lambda b, n: jax.ShapeDtypeStruct((b, n), jnp.int32)  # noqa: E731
    for batch in args.llm_batch:
        _project_one(f"Qwen2.5-VL-7B text, hidden_states[-3], batch {batch}", _on_meta(Qwen2_5_VLTextModel,
                     qwen_config()), lambda out: out.hidden_states[er.LLM_HIDDEN_STATE],
                     {"input_ids": tokens(batch, LLM_TOKENS), "attention_mask": tokens(batch, LLM_TOKENS)}, chip,
                     output_hidden_states=True, use_cache=False)
    _project_one("Glyph-ByT5 (byt5-small encoder)", _on_meta(T5EncoderModel, byt5_config()),
                 lambda out: out.last_hidden_state,
                 {"input_ids": tokens(1, te.BYT5_MAX_LENGTH),
                  "attention_mask": jax.ShapeDtypeStruct((1, te.BYT5_MAX_LENGTH), jnp.float32)}, chip)
    _project_one("SigLIP so400m-patch14-384", _on_meta(SiglipVisionModel, siglip_config()),
                 lambda out: out.last_hidden_state,
                 {"pixel_values": jax.ShapeDtypeStruct((1, 3, 384, 384), jnp.float32)}, chip)


# ---- host ------------------------------------------------------------------------------------------

def _padded(batch: int, length: int, valid: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded token ids with the first ``valid`` positions real and the rest padding."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(length) < valid).long().expand(batch, length).contiguous()
    return ids, mask


def _eager(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    return run


def _timed_table(paths: dict[str, Callable[[], object]], repeats: int,
                 extrapolate: dict[str, float] | None = None, label: str = "") -> None:
    """First call (compiling, for the jitted paths), then min / median of ``repeats`` turns; with
    ``extrapolate``, the median times its factor (to the full model) in a ``label`` column."""
    first = {}
    for name, run in paths.items():
        begin = time.perf_counter()
        run()
        first[name] = time.perf_counter() - begin
    times = timing.round_robin(paths, repeats, warmup=0)
    extra = f" {label} |" if extrapolate else ""
    print(f"| path | first call s | min s | median s |{extra}")
    print("| --- | --- | --- | --- |" + (" --- |" if extrapolate else ""))
    for name, t in times.items():
        low, mid = timing.min_median(t)
        extra = f" {mid * extrapolate[name]:.1f} |" if extrapolate else ""
        print(f"| {name} | {first[name]:.2f} | {low:.2f} | {mid:.2f} |{extra}", flush=True)


def host(args: argparse.Namespace) -> None:
    print(f"Qwen2.5-VL-7B text model at full width, first {args.layers} of {LLM_LAYERS} layers, vocabulary cut to "
          f"4096, seeded random weights; 1 x {LLM_TOKENS} tokens, {args.valid} valid; eager runs {LLM_LAYERS} "
          f"layers, jitted {LLM_LAYERS + er.LLM_HIDDEN_STATE + 1} (hidden_states[-3])")
    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy) + "\n")
    ids, mask = _padded(1, LLM_TOKENS, args.valid, 4096)
    model32 = randomize_like_trained_(Qwen2_5_VLTextModel(qwen_config(args.layers, vocab=4096)), seed=0).eval()
    paths, scale = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = model32 if dtype == torch.float32 else copy.deepcopy(model32).to(dtype)  # .to works in place
        name = str(dtype).removeprefix("torch.")
        # every layer of the few kept: the last one's output, not hidden_states[-3]
        runner = er.jax_llm(model, hidden_state=-1)
        paths[f"eager {name}"] = _eager(model, ids, mask)
        paths[f"jitted {name}"] = lambda runner=runner: er.encode_llm_jax(runner, ids, mask)
        scale[f"eager {name}"] = LLM_LAYERS / args.layers
        scale[f"jitted {name}"] = (LLM_LAYERS + er.LLM_HIDDEN_STATE + 1) / args.layers
    _timed_table(paths, args.repeats, scale, "s per prompt, full model (median x layers)")
    print(f"\nload average {timing.load():.2f} at the end")


# ---- tiny --------------------------------------------------------------------------------------------

def tiny(args: argparse.Namespace) -> None:
    config = DiTConfig.preset("tiny")
    # stage 1's default dtypes (the official pipeline's): the LLM in float16, ByT5 in float32
    llm, byt5 = te.tiny_llm(config.text_states_dim, torch.float16), te.tiny_byt5(config.byt5_states_dim)
    prompt = 'A cat walks on the grass next to a sign "OPEN"'
    tokens, _, _ = te.llm_tokens(llm.tokenizer, prompt)
    print(f"stage 1's tiny encoders (LLM {config.text_states_dim} wide in float16, ByT5 {config.byt5_states_dim} in "
          f"float32): "
          f"what stage 1's encode() does for a t2v prompt with quoted text: the LLM on the prompt and the negative "
          f"prompt at {tuple(tokens['input_ids'].shape)} tokens, ByT5 on the quoted text (256) and on none (zeros, "
          "no model call); tokenization included, the same for both paths")
    print(timing.budget_line(THREADS))
    print(timing.check_quiet(args.allow_busy) + "\n")
    begin = time.perf_counter()
    llm_run, byt5_run = er.llm_call(er.jax_llm(llm.model)), er.byt5_call(er.jax_byt5(byt5.model))
    print(f"jitted: tracing set-up and weights to the device {time.perf_counter() - begin:.2f} s")

    def encode(llm_run: te.ModelCall = te.eager_llm, byt5_run: te.ModelCall = te.eager_byt5) -> None:
        te.encode_llm(llm, prompt, run=llm_run), te.encode_llm(llm, "", run=llm_run)
        te.encode_byt5(byt5, prompt, run=byt5_run), te.encode_byt5(byt5, "", run=byt5_run)

    _timed_table({"eager (before)": encode, "jitted (after)": lambda: encode(llm_run, byt5_run)}, args.repeats)
    print(f"\nload average {timing.load():.2f} at the end")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pj = sub.add_parser("project", help="the full-size encoders compiled abstractly, projected on a chip")
    pj.add_argument("--chip", choices=sorted(projection.CHIPS), default="v6e")
    pj.add_argument("--llm_batch", type=int, nargs="+", default=[1], help="LLM batches to compile (default: 1; "
                    "2 = prompt and negative prompt in one call)")
    pj.add_argument("--threads", type=int, help="CPUs for the compiler (default: all this process may use)")
    h = sub.add_parser("host", help="a few full-width Qwen layers, eager against jitted, on this CPU")
    h.add_argument("--layers", type=int, default=2, help=f"of the {LLM_LAYERS} (default: %(default)s)")
    h.add_argument("--valid", type=int, default=CROP_START + 100, help="unpadded tokens (default: %(default)s)")
    t = sub.add_parser("tiny", help="stage 1's tiny encoders, eager against jitted, on this CPU")
    for parser in (h, t):
        parser.add_argument("--repeats", type=int, default=3, help="timed turns per path (default: %(default)s)")
        timing.add_flags(parser)
    args = p.parse_args()
    {"project": project, "host": host, "tiny": tiny}[args.command](args)


if __name__ == "__main__":
    main()
