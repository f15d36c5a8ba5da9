"""Real-scale memory paths: log-probs without full logits, attention without dense masks, micro-batched
updates, and ahead-of-time compilation of a run's programs."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rftjax import optim, steps
from rftjax.models import get_preset, init_params, model_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import media_once  # noqa: E402 - experiments/ on the path


def _full_logit_logprobs(params, config, seq, temperature):
    """The reference: the whole `[N, P+T, V]` logits of one forward pass, `log_softmax`, gather, entropy."""
    ids = jnp.concatenate([seq.prompt_ids, seq.completion_ids], axis=1)
    mask = jnp.concatenate([seq.prompt_mask, seq.completion_mask], axis=1)
    media = jax.tree.map(lambda x: jnp.take(x, seq.prompt_index, axis=0), seq.pixel_values)
    logits = model_for(config).apply({"params": params}, media, ids, mask).logits
    p, t = seq.prompt_ids.shape[1], seq.completion_ids.shape[1]
    logp = jax.nn.log_softmax(logits[:, p - 1:p - 1 + t] / temperature, axis=-1)
    lp = jnp.take_along_axis(logp, seq.completion_ids[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    m = seq.completion_mask.astype(jnp.float32)
    return lp * m, entropy * m


@pytest.mark.parametrize("preset", ["tiny", "qwen_vl_tiny"])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_logprobs_and_gradients_equal_the_full_logits(preset, tied, monkeypatch):
    """Chunks of 4 tokens per row over 2 x 3 rows of 6 completion tokens (2 chunks, the last one padded):
    log-probs, entropy and the gradient of a loss using both equal the full-logit path within 1e-5 (float32)."""
    config = get_preset(preset)
    config = config.replace(text=dataclasses.replace(config.text, tie_word_embeddings=tied))
    params = init_params(config, jax.random.key(0))
    batch, _ = media_once.batches(config, np.random.default_rng(0), b=2, g=3)
    seq = batch.seq
    assert seq.completion_ids.shape == (6, 6)
    monkeypatch.setattr(steps, "LOGPROB_CHUNK_BYTES", 4 * 4 * config.text.vocab_size * 6)
    # weights ~ N(0, 1) / 36 (the token count): gradients of O(1), where float32 rounding is ~1e-7
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(seq.completion_ids.shape) / 36, jnp.float32)

    def loss(fn, p):
        lp, ent = fn(p)
        return jnp.sum(lp * weights) + 0.3 * jnp.sum(ent * weights), (lp, ent)

    ours = lambda p: steps.completion_logprobs(p, config, seq, 0.7)  # noqa: E731
    ref = lambda p: _full_logit_logprobs(p, config, seq, 0.7)  # noqa: E731
    (_, (lp, ent)), grads = jax.value_and_grad(lambda p: loss(ours, p), has_aux=True)(params)
    (_, (lp_ref, ent_ref)), grads_ref = jax.value_and_grad(lambda p: loss(ref, p), has_aux=True)(params)
    np.testing.assert_allclose(lp, lp_ref, atol=1e-5)
    np.testing.assert_allclose(ent, ent_ref, atol=1e-5)
    assert float(jnp.abs(lp).max()) > 1.0 and float(ent.max()) > 1.0  # real values, not zeros
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_token_logprobs_never_hold_the_full_logits():
    """V = 4096, 2 x 512 positions: with 1 MiB chunks the compiled forward + backward's temporaries stay far below
    one float32 `[N, T, V]` array (16 MiB), which the full-logit path needs several of."""
    d, v, n, t = 32, 4096, 2, 512
    kernel = jax.random.normal(jax.random.key(0), (d, v)) * 0.1
    hidden = jax.random.normal(jax.random.key(1), (n, t, d))
    targets = jax.random.randint(jax.random.key(2), (n, t), 0, v)

    def chunked(w, h):
        lp, ent = steps.token_logprobs(lambda x: x @ w, h, targets, chunk_bytes=1 << 20)
        return lp.sum() + ent.sum()

    def full(w, h):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], -1).sum() - (jnp.exp(logp) * logp).sum()

    temp = {name: jax.jit(jax.grad(fn, argnums=(0, 1))).lower(kernel, hidden).compile().memory_analysis()
            .temp_size_in_bytes for name, fn in (("chunked", chunked), ("full", full))}
    full_logits = n * t * v * 4
    assert temp["chunked"] < full_logits / 2 < temp["full"], temp
    np.testing.assert_allclose(chunked(kernel, hidden), full(kernel, hidden), rtol=1e-5)


def test_token_logprobs_split_the_vocabulary_over_the_devices():
    """Inside `rows_over` on 8 devices (FSDP: rows and the head's `D` split), the LM head is vocabulary-parallel:
    the compiled forward + backward moves only hidden-state-sized and per-token arrays between devices (no
    collective carries a `V`-sized dim: neither the logits nor the head's weight or gradient are gathered or
    summed whole), chunks are sized by the vocabulary slice per device, and the result equals the full-logit
    path."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from rftjax.models.common import rows_over, split_vocab_params

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 8), ("data", "fsdp"))
    d, v, n, t = 16, 512, 16, 64
    kernel = jax.device_put(jax.random.normal(jax.random.key(0), (d, v)) * 0.1,
                            NamedSharding(mesh, PartitionSpec("fsdp", None)))
    hidden = jax.device_put(jax.random.normal(jax.random.key(1), (n, t, d)),
                            NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    targets = jax.random.randint(jax.random.key(2), (n, t), 0, v)

    def loss(w, h):
        with rows_over(mesh):  # float32 logits of 16 rows x 8 tokens x 512 / 8 per device: chunks of 8 tokens
            w = split_vocab_params(w, v)
            lp, ent = steps.token_logprobs(lambda x: x @ w, h, targets, chunk_bytes=4 * n * 8 * v // 8)
        return lp.sum() + ent.sum()

    def full(w, h):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], -1).sum() - (jnp.exp(logp) * logp).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = grad.lower(kernel, hidden).compile().as_text()
    collectives = [line.split("=", 1)[1].split("{")[0] for line in text.splitlines()
                   if any(f" {op}(" in line for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all"))]
    assert any("[16,8,16]" in c for c in collectives), collectives  # a chunk's hidden states, gathered
    assert not [c for c in collectives if str(v) in c], collectives
    got = grad(kernel, hidden)
    ref = jax.grad(full, argnums=(0, 1))(np.asarray(kernel), np.asarray(hidden))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_give_the_whole_minibatch_update(loss_agg_mode):
    """2 prompts x G = 3 rows, GRPO with a KL term, 2 iterations: the update in micro-batches of 2 rows (3
    forward/backward passes per update, old and reference log-probs in 3 passes too) gives the loss, the gradient
    norm and the params of the update over all 6 rows at once."""
    from rftjax import rl
    from rftjax.rl_update import UpdateSettings, make_rl_update

    config = get_preset("qwen_vl_tiny")
    algo = rl.get_algorithm("grpo", group_size=3, num_iterations=2, kl_coef=0.05, loss_agg_mode=loss_agg_mode)
    batch, _ = media_once.batches(config, np.random.default_rng(2), b=2, g=3)
    params, ref = init_params(config, jax.random.key(0)), init_params(config, jax.random.key(1))
    tx = optax.sgd(1.0)  # params move by the gradients themselves (Adam would amplify rounding where they are ~0)
    out = {}
    for micro in (0, 2):
        update = make_rl_update(UpdateSettings(config, algo, micro_batch_size=micro))
        state = optim.TrainState.create(jax.tree.map(jnp.copy, params), tx)
        out[micro] = update(state, None, ref, {}, batch, jax.random.key(3))
    (whole, _, (m_whole, _)), (micro, _, (m_micro, _)) = out[0], out[2]
    for key in ("loss", "grad_norm", "pg_loss", "kl_loss", "kl_ref", "ratio_max", "ratio_min", "clip_frac_low"):
        np.testing.assert_allclose(m_micro[key], m_whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert float(jnp.abs(m_whole["kl_loss"][1])) > 0 and float(m_whole["grad_norm"][0]) > 1e-3
    for a, b in zip(jax.tree.leaves(micro.params), jax.tree.leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_decoder_attention_implementations_agree_with_left_padding_and_gqa(monkeypatch):
    """`jax.nn.dot_product_attention` (cuDNN flash attention on GPUs) and the XLA einsums in blocks of 5 queries
    give the same output within 1e-5 on GQA (8 query heads over 2 kv heads), a causal mask with left padding (row
    1's first 5 keys are padding), prefill (T = S) and a decode step (T = 1)."""
    from rftjax.models.common import dot_product_attention

    from rftjax.models import common

    rng = np.random.default_rng(0)
    b, s, h, kvh, hd = 2, 12, 8, 2, 16
    valid = np.arange(s)[None] >= np.asarray([[0], [5]])
    monkeypatch.setattr(common, "QUERY_BLOCK", 5)  # the XLA path then runs 3 blocks of queries (the last one padded)
    for t in (s, 1):
        q = jnp.asarray(rng.standard_normal((b, t, h, hd)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((b, kvh, s, hd)), jnp.float32) for _ in range(2))
        causal = np.arange(s)[None, :] <= np.arange(s - t, s)[:, None]
        mask = jnp.asarray(causal[None] & valid[:, None, :])
        xla, ref = (dot_product_attention(q, k, v, mask, implementation=i) for i in ("xla", "jax"))
        np.testing.assert_allclose(xla, ref, atol=1e-5)
        keep = np.asarray(mask).any(-1)  # rows with at least one key (a padding query's output is unused)
        assert np.abs(np.asarray(xla)[keep]).max() > 0.1
        w = jnp.asarray(keep[..., None, None] * rng.standard_normal(xla.shape), jnp.float32)
        grads = [jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, mask, implementation=i) * w),
                          argnums=(0, 1, 2))(q, k, v) for i in ("xla", "jax")]
        for a, b_ in zip(*grads):
            np.testing.assert_allclose(a, b_, atol=1e-5)


@pytest.mark.parametrize("grid", [(1, 12, 16), (2, 8, 12)], ids=["image", "two-frames"])
def test_vision_attention_without_dense_masks_equals_dense_masked_attention(grid):
    """The vision tower's block attention (windows in window order with a band; frames in blocks of queries) equals
    dense `[P, P]`-masked attention over the same patches within 1e-5: 4 x 4-token windows (16 patches, partial
    windows at the edges), an image over several windows, two frames, and padding slots after the patches."""
    from rftjax.models.common import dot_product_attention, segment_attention
    from rftjax.models.qwen_vl import patch_layout

    config = get_preset("qwen_vl_tiny").vision
    p = 256
    layout = jax.tree.map(np.asarray, patch_layout(jnp.asarray([grid], jnp.int32), p, config))
    valid = layout["valid"]
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, p, 2, 8)), jnp.float32) for _ in range(3))
    dense = lambda seg: dot_product_attention(  # noqa: E731 - [P, P] mask of the same segments
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.asarray(seg[:, :, None] == seg[:, None, :]))
    frames = np.where(valid, layout["frame"], -1)
    np.testing.assert_allclose(segment_attention(q, k, v, jnp.asarray(frames), 64)[valid], dense(frames)[valid],
                               atol=1e-5)
    windows = np.where(valid, layout["window"], -1)
    assert len(np.unique(windows[valid])) >= 6
    order = np.argsort(np.where(valid, layout["window"], p * p), axis=1, kind="stable")
    sort = lambda a: jnp.asarray(np.take_along_axis(np.asarray(a), order.reshape(1, p, *[1] * (a.ndim - 2)), 1))  # noqa: E731
    got = segment_attention(sort(q), sort(k), sort(v), sort(windows), 16, band=True)
    want = sort(dense(windows))
    keep = sort(valid)
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], atol=1e-5)


def _smoke(**settings):
    from rftjax.plan import _with

    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import smoke

    return _with(smoke.get_config(), settings)


def test_aot_compiles_a_tiny_runs_programs_for_the_cpu_topology():
    """`rftjax.aot` lowers the run's sampler, RL update and SFT update with abstract sharded inputs on 8 devices
    (FSDP) and compiles them: every program reports bytes, and the micro-batch search finds the largest that fits."""
    from rftjax import aot

    c = _smoke(**{"mesh.fsdp": 8, "mesh.data": 1, "plan.num_devices": 8, "rl.prompts_per_step": 8})
    devices = aot.topology_devices("cpu")[:8]
    programs = aot.run_programs(c, devices)
    assert set(programs) == {"sampler", "rl_update", "sft_update"}
    results = {name: aot.compile_program(p) for name, p in programs.items()}
    for name, r in results.items():
        assert r.fits and r.arguments > 0 and r.temp > 0, (name, r)
    rows = c.rl.prompts_per_step * c.rl.algo.group_size // 8
    divisors = [r for r in range(1, rows + 1) if rows % r == 0]
    best, tried = aot.largest_micro_batch(c, devices, memory=1e12)
    assert best == rows and list(tried) == [rows]  # the largest fits: one compile
    best, tried = aot.largest_micro_batch(c, devices, memory=1.0)  # nothing fits: every size tried, largest first
    assert best == 0 and list(tried) == divisors[::-1]
    totals = {r: v.total for r, v in tried.items()}
    memory = sorted(totals.values())[-2]  # below the largest total: the largest size whose total fits wins
    best, _ = aot.largest_micro_batch(c, devices, memory=memory)
    assert len(divisors) >= 3 and best == max(r for r, t in totals.items() if t <= memory)


def test_the_planner_beside_a_tpu_compile_plans_for_that_topology():
    """`--compile --topology T` plans for T's chips and memory (v5e-8: 8 x 15.75 GiB; v5p-8: 4 megacore chips), not
    this host's devices; `cpu` leaves the config as it is."""
    from rftjax import aot

    c = _smoke()
    got = {t: (aot.on_topology(c, t).plan.num_devices, round(aot.on_topology(c, t).plan.device_memory_gb, 2))
           for t in ("v5e-1", "v5e-8", "v5p-8")}
    assert got == {"v5e-1": (1, 16.91), "v5e-8": (8, 16.91), "v5p-8": (4, 102.8)}
    assert aot.on_topology(c, "cpu") is c and c.plan.num_devices == 0


def test_aot_compiles_for_a_tpu_slice_where_libtpu_is_installed():
    """The same programs for a v5e-8 slice (compile-only devices from `jax.experimental.topologies`)."""
    import importlib.util

    from rftjax import aot

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed: pip install "rftjax[aot]" (the TPU compiler) to run this test')
    try:
        devices = aot.topology_devices("v5e-8")
    except ValueError as e:
        pytest.skip(f"TPU compile-only devices are unavailable in this process: {e}")
    c = _smoke(**{"mesh.fsdp": 8, "mesh.data": 1, "plan.num_devices": 8, "rl.prompts_per_step": 8})
    r = aot.compile_program(aot.run_programs(c, devices)["rl_update"])
    assert r.fits and r.temp > 0


def test_photo_sized_images_fit_the_update_in_a_bounded_temp():
    """The compiled RL update (XLA on this CPU) of 2 prompts x G = 2 with photo-sized images (the tiny Qwen2.5-VL's
    1,024-token budget: 4,096 patches each, 1,040-token prompts): at most 400 MB of temporaries in micro-batches of 2
    rows (measured 167 MB; 206 MB without micro-batches; 2,132 MB at 141e103 with dense [P, P] vision attention and
    full logits)."""
    import ml_collections

    from rftjax import aot

    c = _smoke(**{"model.preset": "qwen_vl_tiny", "data.max_prompt_len": 1040, "rl.max_new_tokens": 16,
                  "rl.prompts_per_step": 2, "rl.algo.group_size": 2, "sft.enabled": False, "rl.micro_batch_size": 2})
    c.model.overrides = ml_collections.ConfigDict({"max_image_tokens": 1024})
    r = aot.compile_program(aot.run_programs(c, aot.topology_devices("cpu")[:1])["rl_update"])
    assert r.fits and 0 < r.temp < 400e6, r
