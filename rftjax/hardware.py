"""What this machine computes fastest: the CPU's model and features, measured matmul rates, and the compute
dtype that `model.dtype="auto"` resolves to.

    compute_dtype("auto")   # "bfloat16" on TPU/GPU and on CPUs whose bf16 matmul beats float32, else "float32"

On a CPU the choice comes from a short measured probe (`probe_matmul_rates`: float32 vs bfloat16 inputs at one
matmul shape, ~0.5 s), cached in memory and on disk (`probe_cache_path`, keyed by CPU model, features, jax
version and XLA_FLAGS), so a machine probes once. The issue this answers: on CPUs without AVX-512 BF16 or AMX
(e.g. AMD EPYC Rome/Milan), XLA's bf16 matmul runs at ~60% of float32's rate, while on Sapphire Rapids (AMX)
it runs at ~3x.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("rftjax")

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
BF16_MARGIN = 1.1
"""bfloat16 is chosen on a CPU when its probed matmul rate is at least this multiple of float32's (bf16 also
costs precision, so a tie goes to float32)."""
PROBE_SHAPE = (512, 1024, 1024)
"""`(m, k, n)` of the probe's matmul: the size of a small model's MLP matmul over a few hundred tokens."""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def host_peak_rss_gb() -> float:
    """The peak resident memory of this process so far, GB (1e9 bytes): `getrusage`'s `ru_maxrss` (kilobytes on
    Linux, bytes on macOS); 0.0 where the `resource` module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if platform.system() == "Darwin" else peak * 1024 / 1e9


def cpu_flags(interesting=("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")) -> list[str]:
    """The SIMD/matrix features among `interesting` that /proc/cpuinfo lists (empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in interesting if f in flags]


def matmul_rate(m: int, k: int, n: int, dtype=jnp.float32, repeats: int = 5) -> float:
    """Achieved FLOP/s (float) of an `[m, k] @ [k, n]` matmul on the default device, inputs in `dtype`, float32
    accumulation (as the models' dense layers), best of `repeats` after one warm-up call: the attainable rate at
    that shape."""
    a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
    f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def probe_matmul_rates(shape: tuple[int, int, int] = PROBE_SHAPE) -> dict[str, float]:
    """`{"float32": FLOP/s, "bfloat16": FLOP/s}` of `matmul_rate` at `shape` (about half a second on a CPU)."""
    return {"float32": matmul_rate(*shape, jnp.float32), "bfloat16": matmul_rate(*shape, jnp.bfloat16)}


def probe_cache_path() -> str:
    """The on-disk probe cache: `$RFTJAX_CACHE_DIR/dtype_probe.json` (default `~/.cache/rftjax/`)."""
    root = os.environ.get("RFTJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rftjax")
    return os.path.join(root, "dtype_probe.json")


def _machine_key() -> str:
    """What the probe's answer depends on: CPU model and features, jax version, XLA_FLAGS (e.g.
    `--xla_cpu_max_isa=AVX2` changes the kernels XLA may use)."""
    text = "|".join([cpu_model(), " ".join(cpu_flags()), jax.__version__, os.environ.get("XLA_FLAGS", "")])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@functools.cache
def cpu_matmul_rates() -> tuple[dict[str, float], str]:
    """`(rates, source)`: this CPU's probed float32/bfloat16 matmul rates (`probe_matmul_rates`) and where they
    came from ("probed" or "cached in PATH"). Probes at most once per machine: the result is kept in memory and in
    `probe_cache_path()` (an unreadable cache file is ignored and rewritten)."""
    path, key = probe_cache_path(), _machine_key()
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key], f"cached in {path}"
    rates = probe_matmul_rates()
    cached[key] = {**rates, "cpu": cpu_model()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cached, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home still gets the measured answer
        log.warning("could not cache the dtype probe in %s: %s", path, e)
    return cached[key], "probed"


def choose_dtype() -> tuple[str, str]:
    """`(dtype, reason)` for `model.dtype="auto"` on this process's backend: bfloat16 on accelerators (TPU, GPU);
    on a CPU, bfloat16 when its probed bf16 matmul rate is >= `BF16_MARGIN` x float32's, else float32."""
    backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16", f"{backend} backend"
    rates, source = cpu_matmul_rates()
    ratio = rates["bfloat16"] / rates["float32"]
    dtype = "bfloat16" if ratio >= BF16_MARGIN else "float32"
    return dtype, (f"CPU {cpu_model()!r}: bf16 matmul {rates['bfloat16'] / 1e9:.0f} GFLOP/s vs float32 "
                   f"{rates['float32'] / 1e9:.0f} GFLOP/s ({ratio:.2f}x; bf16 needs >= {BF16_MARGIN}x), {source}")


@functools.cache
def compute_dtype(name: str) -> str:
    """The compute dtype name for the config value `name` (`model.dtype`): "float32" / "bfloat16" as given, or
    for "auto" `choose_dtype()`'s answer, logged with its reason; decided once per process (cached). With several
    processes (`jax.distributed`), every process takes process 0's answer, so all compile the same program.

    Raises:
      ValueError: `name` is not one of `DTYPE_CHOICES`.
    """
    if name not in DTYPE_CHOICES:
        raise ValueError(f"bad config: model.dtype={name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if name != "auto":
        return name
    dtype, reason = choose_dtype()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        first = int(multihost_utils.broadcast_one_to_all(np.int32(DTYPE_CHOICES.index(dtype))))
        if DTYPE_CHOICES[first] != dtype:
            reason = f"process 0's choice (this process's probe said {dtype})"
        dtype = DTYPE_CHOICES[first]
    log.info("compute dtype: %s (model.dtype=auto: %s)", dtype, reason)
    return dtype
