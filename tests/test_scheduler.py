import numpy as np
import pytest
import torch

from hunyuan_tpu import scheduler

diffusers = pytest.importorskip("diffusers")


def _diffusers(num_steps: int, shift: float):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    # as diffusers' HunyuanVideo15Pipeline sets it up
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
    return ref


@pytest.mark.parametrize("num_steps,shift", [(50, 5.0), (50, 9.0), (50, 7.0), (12, 7.0), (8, 7.0), (1, 1.0), (30, 1.0)])
def test_sigmas_and_timesteps_match_diffusers(num_steps, shift):
    ref = _diffusers(num_steps, shift)
    sig = scheduler.sigmas(num_steps, shift)
    assert sig.dtype == np.float32 and sig.shape == (num_steps + 1,)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)
    np.testing.assert_array_equal(sig, ref.sigmas.numpy())
    np.testing.assert_array_equal(scheduler.timesteps(sig), ref.timesteps.numpy())


def test_euler_step_matches_diffusers():
    ref = _diffusers(10, 5.0)
    sig = scheduler.sigmas(10, 5.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 3, 3, generator=g)
    for i in range(3):  # diffusers keeps its own step index
        v = torch.randn(x.shape, generator=g)
        expected = ref.step(v, ref.timesteps[i], x).prev_sample
        got = scheduler.euler_step(x.numpy(), v.numpy(), sig[i], sig[i + 1])
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)
        x = expected


def test_rejects_zero_steps():
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        scheduler.sigmas(0, 5.0)
