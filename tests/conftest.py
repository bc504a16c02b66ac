"""Shared test setup: 8 virtual CPU devices for mesh code (set before jax is imported)."""

import os

# LLVM's lowest optimisation level: compiling is most of this suite's time, and it compiles ~40%
# faster; the subprocesses get the same flags (cli_runner.environment), so results agree bit for bit
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
