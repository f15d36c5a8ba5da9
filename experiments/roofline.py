"""The machine's own roofline, measured in the benchmark's run: CPU model and flags, matmul FLOP/s at given
shapes and dtypes (float32 accumulation), memory bandwidth, and a median timer.

Machines here differ up to 3x (AMX or not, AVX-512 or not), so benchmarks report figures as fractions of
these measurements, taken in the same process, rather than as absolute numbers. Importable without
grain/TFDS/torch.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from rftjax.hardware import cpu_flags, cpu_model, matmul_rate

__all__ = ["cpu_flags", "cpu_model", "describe", "matmul_rate", "median_time", "memory_bandwidth"]


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` (which must block until its work is done) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Achieved bytes/s of streaming a float32 array of `megabytes` MB through a reduction (read-only, as
    decoding reads weights and the KV cache), best of `repeats`."""
    x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)
    f = jax.jit(lambda x: jnp.sum(x * 1.0001))
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best


def describe() -> str:
    """One line: jax version, backend, device kind, CPU model and flags."""
    d = jax.devices()[0]
    return (f"jax {jax.__version__} on {d.platform} ({getattr(d, 'device_kind', '')}); CPU: {cpu_model()} "
            f"[{' '.join(cpu_flags()) or 'no flags read'}], {jax.local_device_count()} device(s)")
