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

__all__ = ["cpu_flags", "cpu_model", "decode_matmuls", "decode_roofline", "describe", "layer_matmuls", "matmul_rate",
           "median_time", "memory_bandwidth", "shape_rates", "train_roofline"]


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


def layer_matmuls(text, rows: int, kind: str = "attention") -> list[tuple[int, int, int]]:
    """The `(m, k, n)` matmuls of one decoder layer (`TextConfig`) of layer kind `kind` over `rows` tokens: an
    attention layer's q (with its gate when `attn_output_gate`), k, v, o; a Gated DeltaNet layer's qkv, z, b, a and
    out projections; then gate, up, down."""
    d, q, kv, i = text.hidden_size, text.num_heads * text.head_dim, text.num_kv_heads * text.head_dim, \
        text.intermediate_size
    mlp = [(rows, d, i), (rows, d, i), (rows, i, d)]
    if kind == "gated_delta_net":
        hv, value = text.linear_num_value_heads, text.linear_num_value_heads * text.linear_value_head_dim
        qkv = 2 * text.linear_num_key_heads * text.linear_key_head_dim + value
        return [(rows, d, qkv), (rows, d, value), (rows, d, hv), (rows, d, hv), (rows, value, d)] + mlp
    return [(rows, d, q * (2 if text.attn_output_gate else 1)), (rows, d, kv), (rows, d, kv), (rows, q, d)] + mlp


def decode_matmuls(config, batch: int) -> list[tuple[int, int, int]]:
    """The `(m, k, n)` matmuls of one decode step of `batch` rows (any config with a `.text` `TextConfig`): every
    layer's by its kind (`layer_matmuls`); the LM head."""
    t = config.text
    return [m for kind in t.layer_kinds for m in layer_matmuls(t, batch, kind)] + [(batch, t.hidden_size, t.vocab_size)]


def shape_rates(shapes, dtype=jnp.float32) -> dict[tuple[int, int, int], float]:
    """`{(m, k, n): FLOP/s}` measured by `matmul_rate` for each distinct shape, inputs in `dtype`."""
    return {shape: matmul_rate(*shape, dtype) for shape in set(shapes)}


def decode_roofline(config, batch: int, context: float, rates: dict, bandwidth: float, cache_bytes: int = 4) -> float:
    """Seconds of one decode step at this machine's roofline: every matmul at the FLOP rate measured for its own
    shape (which includes reading its weights), plus the decode state at the measured bandwidth: each attention
    layer's KV cache read (`cache_bytes` per element, mean `context` slots), each Gated DeltaNet layer's float32
    recurrent state read and written. Softmax, norms, RoPE, the convolution and sampling count as free."""
    t = config.text
    matmuls = sum(2 * m * k * n / rates[(m, k, n)] for m, k, n in decode_matmuls(config, batch))
    kinds = t.layer_kinds
    kv_bytes = kinds.count("attention") * 2 * batch * context * t.num_kv_heads * t.head_dim * cache_bytes
    recurrent = t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim * 4
    state_bytes = kinds.count("gated_delta_net") * 2 * batch * recurrent
    return matmuls + (kv_bytes + state_bytes) / bandwidth


def train_roofline(config, tokens: int, rates: dict) -> float:
    """Seconds of one training step (forward + backward = 3x the forward matmuls) over `tokens` decoder tokens at
    this machine's roofline: the decoder's matmuls and the LM head at the rates measured for their shapes
    (`rates` from `shape_rates(decode_matmuls(config, tokens))`). Attention scores, norms, the ViT and the
    optimizer count as free, so it is a lower bound."""
    return 3 * sum(2 * m * k * n / rates[(m, k, n)] for m, k, n in decode_matmuls(config, tokens))
