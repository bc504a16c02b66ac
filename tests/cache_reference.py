"""The caches as the official helpers run them, on the eager torch model: an independent reference.

AngelSlim's helpers (``DeepCacheHelper``, ``TeaCacheHelper``, ``TaylorCacheHelper``) replace
each double block's output on cached steps; ComfyUI-MagCache decides each step while it runs.
Here forward hooks (torch's own way to replace a module's output) do the same to
``HunyuanVideo15DiT``'s blocks: the blocks still compute, their outputs are swapped, so the
result is what skipping them gives. The loop is CFG + Euler written out.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hunyuan_tpu import scheduler


def official_full_steps(start: int, end: int, interval: int, total: int) -> set[int]:
    """The official ``no_cache_steps``."""
    return set(range(0, start)) | set(range(start, end, interval)) | set(range(end, total))


def fft_bands(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AngelSlim's ``decomposition_FFT`` (cutoff 0.1)."""
    freq = torch.fft.fft(x.float(), dim=1)
    freqs = torch.fft.fftfreq(x.shape[1])
    low = (freqs.abs() <= 0.1 * freqs.abs().max())[None, :, None]
    return torch.fft.ifft(freq * low, dim=1).real.to(x.dtype), torch.fft.ifft(freq * ~low, dim=1).real.to(x.dtype)


class Hooks:
    """Per-step state and the block hooks of one cache kind."""

    def __init__(self, model, kind: str, full_steps: set[int] | None = None, *, keep_blocks: int = 1,
                 orders: dict[str, int] | None = None, ratios=None, threshold: float = 0.0, max_skips: int = 4,
                 retention: float = 0.2):
        self.kind, self.full_steps, self.keep = kind, full_steps, keep_blocks
        self.orders = orders or {"low": 2, "high": 2}
        self.ratios, self.threshold, self.max_skips, self.retention = ratios, threshold, max_skips, retention
        self.depth = len(model.double_blocks)
        self.cached: dict[int, tuple] = {}
        self.step, self.skip = 0, False
        self.derivatives = {"low": [], "high": []}
        self.last_full, self.counter = None, 0
        self.acc = (1.0, 0.0, 0)  # MagCache: ratio, error, steps since the last full step
        model.double_blocks[0].register_forward_pre_hook(self.entering)
        for k, block in enumerate(model.double_blocks):
            block.register_forward_hook(self.hook(k))

    def entering(self, block, args) -> None:
        """The image stream entering the first block: this step's embedding (nothing replaces it)."""
        self.current_input = args[0]

    def begin(self, i: int, total: int) -> None:
        self.step = i
        if self.kind != "magcache":
            self.skip = i not in self.full_steps
            return
        self.skip = False
        if i >= max(1, int(total * self.retention)):  # ComfyUI-MagCache: accumulate, skip while under the threshold
            ratio, error, steps = self.acc
            ratio, steps = ratio * self.ratios[i], steps + 1
            error += abs(1 - ratio)
            self.skip = error < self.threshold and steps <= self.max_skips
            self.acc = (ratio, error, steps) if self.skip else (1.0, 0.0, 0)

    def hook(self, k: int):
        last = k == self.depth - 1

        def replace(block, args, output):
            if not self.skip:
                self.cached[k] = output
                if k == 0:
                    self.input = self.current_input
                if last:
                    self.after_full(output)
                return output
            if self.kind == "deepcache":
                return output if k >= self.depth - self.keep else self.cached[k]
            if not last:
                return self.cached[k]
            if self.kind == "teacache":
                return self.input + self.residual, self.cached[k][1]
            if self.kind == "magcache":
                return self.current_input + self.residual, self.cached[k][1]
            self.counter += 1
            return self.taylor(self.counter), self.cached[k][1]

        return replace

    def after_full(self, output) -> None:
        if self.kind in ("teacache", "magcache"):
            self.residual = output[0] - self.input
        if self.kind == "taylorcache":
            self.counter = 0
            if self.last_full is not None:
                distance = self.step - self.last_full
                for band, x in zip(("low", "high"), fft_bands(output[0])):
                    old, new = self.derivatives[band], [x]
                    for j in range(self.orders[band]):
                        if j < len(old):
                            new.append((new[j] - old[j]) / distance)
                    self.derivatives[band] = new
            self.last_full = self.step

    def taylor(self, distance: int) -> torch.Tensor:
        return sum(d * (distance ** j) / math.factorial(j) for band in ("low", "high")
                   for j, d in enumerate(self.derivatives[band]))


@torch.no_grad()
def cached_loop(model, conditions: dict[str, np.ndarray], noise: np.ndarray, steps: int, guidance: float,
                shift: float, hooks: Hooks | None) -> np.ndarray:
    """CFG + Euler with ``pipeline.build_conditions`` output (CFG batch [negative, positive])."""
    sigmas = scheduler.sigmas(steps, shift)
    c = {k: torch.from_numpy(v) for k, v in conditions.items()}
    batch = c["prompt_embeds"].shape[0]
    latents = torch.from_numpy(noise)
    for i in range(steps):
        if hooks is not None:
            hooks.begin(i, steps)
        x = torch.cat([latents, c["cond_latents"]], dim=1).repeat(batch, 1, 1, 1, 1)
        t = torch.full((batch,), float(sigmas[i]) * 1000)
        t_r = torch.full((batch,), float(sigmas[i + 1]) * 1000) if model.config.use_meanflow else None
        v = model(x, t, c["prompt_embeds"], c["prompt_mask"], c["prompt_embeds_2"], c["prompt_mask_2"],
                  c.get("vision_states"), t_r, vision_mask=c.get("vision_mask"))
        if batch == 2:
            v = v[:1] + guidance * (v[1:] - v[:1])
        latents = latents + v * float(sigmas[i + 1] - sigmas[i])
    return latents.numpy()
