"""The sampler against naive references: greedy argmax re-running the full forward, the filtered softmax
written out by hand in numpy, and log-probs recomputed by a full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rftjax import sampling, sharding
from rftjax.models import VLM, get_preset, init_params
from rftjax.models import hf as rhf


def _peaky_params(config, seed=0, head_scale=6.0):
    """Random params with noise on norms/biases and a scaled LM head, so the next-token distribution is
    neither uniform nor one-hot (a wrong filter or temperature changes it visibly)."""
    params = init_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    lm = dict(params["language_model"])
    lm["lm_head"] = {"kernel": lm["lm_head"]["kernel"] * head_scale}
    return {**params, "language_model": lm}


@pytest.fixture(scope="module")
def tiny():
    config = get_preset("tiny")
    return config, _peaky_params(config)


def _prompts(config, pads=(0, 3, 1), text=(2, 3), seed=0):
    """Left-padded prompts `[text][image x P][text]` with the same content length and different padding."""
    rng = np.random.default_rng(seed)
    p = config.num_image_tokens
    length = max(pads) + text[0] + p + text[1]
    ids = np.zeros((len(pads), length), np.int32)
    mask = np.zeros_like(ids, bool)
    for row, pad in enumerate(pads):
        ids[row, pad:pad + text[0] + p + text[1]] = np.concatenate(
            [rng.integers(4, config.text.vocab_size, text[0]), np.full(p, config.image_token_id),
             rng.integers(4, config.text.vocab_size, text[1])])
        mask[row, pad:pad + text[0] + p + text[1]] = True
        # Right-align (left padding): shift the content to the end.
        ids[row] = np.roll(ids[row], length - (pad + text[0] + p + text[1]))
        mask[row] = np.roll(mask[row], length - (pad + text[0] + p + text[1]))
    v = config.vision
    pixels = rng.standard_normal((len(pads), v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    return jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask)


def _full_logits(config, params, pixels, ids, mask):
    """The full forward pass's logits `[B, T, V]` (jitted: one compilation per shape)."""
    return np.asarray(jax.jit(lambda p, x, i, m: VLM(config).apply({"params": p}, x, i, m).logits)(params, pixels, ids, mask))


def _naive_greedy(config, params, pixels, ids, mask, steps, eos, suppress):
    """Re-run the whole forward pass for every new token; argmax over non-suppressed ids."""
    out = np.zeros((ids.shape[0], steps), np.int32)
    done = np.zeros(ids.shape[0], bool)
    seq, seq_mask = np.asarray(ids), np.asarray(mask)
    for t in range(steps):
        logits = _full_logits(config, params, pixels, jnp.asarray(seq), jnp.asarray(seq_mask))[:, -1].copy()
        logits[:, list(suppress)] = -np.inf
        token = np.where(done, 0, logits.argmax(-1))
        out[:, t] = token
        seq = np.concatenate([seq, token[:, None]], 1)
        seq_mask = np.concatenate([seq_mask, ~done[:, None]], 1)
        done |= np.isin(token, eos)
    return out


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_greedy_equals_naive_full_forward_argmax(tiny, scan):
    config, params = tiny
    if scan:
        config = config.replace(scan_layers=True)
        params = rhf.stack_layers(params, config)
    pixels, ids, mask = _prompts(config)
    steps = 8
    first = sampling.generate(params, config, pixels, ids, mask, jax.random.key(0),
        sampling.SamplingParams(max_new_tokens=steps,
                              greedy=True))
    # EOS := the first token that a row emits after a different one, so that row stops mid-way.
    rows = [[int(t) for t in r] for r in first.completion_ids]
    row, stop = next((r, t) for r in range(len(rows)) for t in range(1, steps) if rows[r][t] not in rows[r][:t])
    eos = rows[row][stop]
    out = sampling.generate(params, config, pixels, ids, mask, jax.random.key(0), sampling.SamplingParams(group_size=2,
                            max_new_tokens=steps, greedy=True, eos_ids=(eos,)))
    unscanned = (config.replace(scan_layers=False), rhf.unstack_layers(params, config)) \
        if scan else (config, params)
    ref = _naive_greedy(*unscanned, pixels, ids, mask, steps, (eos,), (config.image_token_id,))
    ref_mask = (np.cumsum(np.isin(ref, [eos]), 1) - np.isin(ref, [eos])) == 0
    got_ids, got_mask = np.asarray(out.completion_ids), np.asarray(out.completion_mask)
    np.testing.assert_array_equal(got_mask, np.repeat(ref_mask, 2, 0))
    np.testing.assert_array_equal(np.where(got_mask, got_ids, -1), np.repeat(np.where(ref_mask, ref, -1), 2, 0))
    assert got_mask[2 * row].sum() == stop + 1 and not out.truncated[2 * row]
    np.testing.assert_array_equal(out.lengths, got_mask.sum(1))
    np.testing.assert_array_equal(out.truncated, ~np.isin(got_ids, [eos]).any(1))
    assert (got_ids[~got_mask] == 0).all() and (np.asarray(out.model_logprobs)[~got_mask] == 0).all()


def _reference_probs(logits, temperature, top_k, top_p, suppress):
    """The sampling distribution written out directly (float64, loops over sorted tokens)."""
    x = logits.astype(np.float64).copy()
    x[list(suppress)] = -np.inf
    x = x / temperature
    order = np.argsort(-x, kind="stable")
    allowed = np.isfinite(x)
    if top_k:
        allowed &= np.isin(np.arange(x.size), order[:top_k])
    x = np.where(allowed, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        keep, mass = np.zeros_like(allowed), 0.0
        for i in np.argsort(-p, kind="stable"):
            keep[i] = True
            mass += p[i]
            if mass >= top_p:
                break
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def _fits(counts: np.ndarray, p: np.ndarray) -> bool:
    """Do sample counts fit distribution p? No samples outside p's support, chi-square p-value > 1e-4 (rare
    cells pooled so every expected count is >= 5), total-variation distance < 0.05."""
    n = counts.sum()
    if counts[p == 0].sum():
        return False
    expected, observed = p[p > 0] * n, counts[p > 0]
    big = expected >= 5
    exp_cells = np.append(expected[big], expected[~big].sum())
    obs_cells = np.append(observed[big], observed[~big].sum())
    if exp_cells[-1] == 0:
        exp_cells, obs_cells = exp_cells[:-1], obs_cells[:-1]
    return stats.chisquare(obs_cells, exp_cells).pvalue > 1e-4 and 0.5 * np.abs(counts / n - p).sum() < 0.05


def _first_token_counts(config, params, temperature, top_k, top_p, n=6000):
    pixels, ids, mask = _prompts(config, pads=(1,))
    out = sampling.generate(params, config, pixels, ids, mask, jax.random.key(7),
        sampling.SamplingParams(group_size=n, max_new_tokens=1,
                            temperature=temperature, top_k=top_k, top_p=top_p))
    logits = _full_logits(config, params, pixels, ids, mask)[0, -1]
    return np.bincount(np.asarray(out.completion_ids[:, 0]), minlength=config.text.vocab_size), logits


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 12, 1.0),
                                                     (1.0, 0, 0.7), (1.5, 20, 0.85)])
def test_sampling_distribution_matches_filtered_softmax(tiny, temperature, top_k, top_p):
    config, params = tiny
    counts, logits = _first_token_counts(config, params, temperature, top_k, top_p)
    p = _reference_probs(logits, temperature, top_k, top_p, (config.image_token_id,))
    assert (p > 0).sum() > 5  # a real distribution, not nearly one-hot
    assert counts[p == 0].sum() == 0, np.nonzero(counts * (p == 0))  # never outside top-k / nucleus
    assert _fits(counts, p)


def test_the_distribution_check_rejects_a_wrong_filter(tiny):
    """The check has power: samples of top-k=12 / top-p=0.7 fail against off-by-one or untempered filters."""
    config, params = tiny
    suppress = (config.image_token_id,)
    counts, logits = _first_token_counts(config, params, 1.0, 12, 1.0)
    assert _fits(counts, _reference_probs(logits, 1.0, 12, 1.0, suppress))
    for wrong in ((1.0, 11, 1.0), (1.0, 13, 1.0), (0.8, 12, 1.0), (1.0, 0, 1.0)):
        assert not _fits(counts, _reference_probs(logits, *wrong, suppress)), wrong
    counts, logits = _first_token_counts(config, params, 1.0, 0, 0.7)
    for wrong in ((1.0, 0, 0.6), (1.0, 0, 0.8), (1.0, 0, 1.0)):
        assert not _fits(counts, _reference_probs(logits, *wrong, suppress)), wrong


def test_same_key_same_output_and_padding_invariance(tiny):
    config, params = tiny
    pixels, ids, mask = _prompts(config, pads=(0, 4))
    # Row 1 is row 0's prompt with 4 more padding tokens.
    ids = ids.at[1].set(jnp.roll(ids[0], 0)).at[1, :4].set(0)
    kw = dict(group_size=3, max_new_tokens=10, temperature=1.0)
    pad_mask = mask.at[1].set(mask[0])
    pixels = pixels.at[1].set(pixels[0])
    a = sampling.generate(params, config, pixels, ids, pad_mask, jax.random.key(3), sampling.SamplingParams(**kw))
    b = sampling.generate(params, config, pixels, ids, pad_mask, jax.random.key(3), sampling.SamplingParams(**kw))
    c = sampling.generate(params, config, pixels, ids, pad_mask, jax.random.key(4), sampling.SamplingParams(**kw))
    np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
    assert not np.array_equal(a.completion_ids, c.completion_ids)
    # The same prompt padded to a longer batch: the same samples for the same key.
    longer_ids = jnp.pad(ids[:1], ((0, 0), (5, 0)))
    longer_mask = jnp.pad(pad_mask[:1], ((0, 0), (5, 0)))
    d = sampling.generate(params, config, pixels[:1], ids[:1], pad_mask[:1], jax.random.key(3),
        sampling.SamplingParams(**kw))
    e = sampling.generate(params, config, pixels[:1], longer_ids, longer_mask, jax.random.key(3),
        sampling.SamplingParams(**kw))
    np.testing.assert_array_equal(d.completion_ids, e.completion_ids)
    np.testing.assert_allclose(d.model_logprobs, e.model_logprobs, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 10, 0.9)])
def test_logprobs_equal_full_forward_recomputation(tiny, temperature, top_k, top_p):
    config, params = tiny
    pixels, ids, mask = _prompts(config)
    g = 2
    out = sampling.generate(params, config, pixels, ids, mask, jax.random.key(11),
        sampling.SamplingParams(group_size=g, max_new_tokens=7,
                            temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=(5, 6)))
    seq = jnp.concatenate([jnp.repeat(ids, g, 0), out.completion_ids], 1)
    seq_mask = jnp.concatenate([jnp.repeat(mask, g, 0), out.completion_mask], 1)
    logits = _full_logits(config, params, jnp.repeat(pixels, g, 0), seq, seq_mask)
    p_len = ids.shape[1]
    comp_mask = np.asarray(out.completion_mask)
    for row in range(seq.shape[0]):
        for t in range(out.completion_ids.shape[1]):
            if not comp_mask[row, t]:
                continue
            last = logits[row, p_len + t - 1]
            token = int(out.completion_ids[row, t])
            assert _reference_probs(last, temperature, top_k, top_p, (config.image_token_id,))[token] > 0
            model_probs = _reference_probs(last, temperature, 0, 1.0, ())  # unfiltered: what the trainer computes
            assert abs(np.log(model_probs[token]) - float(out.model_logprobs[row, t])) < 1e-4


def test_image_token_is_never_generated(tiny):
    config, params = tiny
    lm = dict(params["language_model"])
    kernel = lm["lm_head"]["kernel"]
    lm["lm_head"] = {"kernel": kernel.at[:, config.image_token_id].set(kernel[:, config.image_token_id] + 50.0)}
    boosted = {**params, "language_model": lm}
    pixels, ids, mask = _prompts(config)
    plain = VLM(config).apply({"params": boosted}, pixels, ids, mask).logits
    assert (np.asarray(plain[:, -1]).argmax(-1) == config.image_token_id).all()  # it would be chosen
    for greedy in (True, False):
        out = sampling.generate(boosted, config, pixels, ids, mask, jax.random.key(0),
            sampling.SamplingParams(group_size=4,
                                max_new_tokens=6, greedy=greedy))
        assert not (np.asarray(out.completion_ids) == config.image_token_id).any()


def test_bad_arguments_raise(tiny):
    config, params = tiny
    pixels, ids, mask = _prompts(config)
    with pytest.raises(ValueError, match="temperature"):
        sampling.generate(params, config, pixels, ids, mask, jax.random.key(0),
            sampling.SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(params, config, pixels, ids, mask, jax.random.key(0), sampling.SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="one per prompt"):
        sampling.generate(params, config, pixels[:1], ids, mask, jax.random.key(0))
    with pytest.raises(ValueError, match="image tokens"):
        sampling.generate(params, config, pixels, ids[:, 6:], mask[:, 6:], jax.random.key(0))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices: see tests/conftest.py")
def test_generate_under_jit_with_sharded_batch_and_params(tiny):
    config, params = tiny
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    pixels, ids, mask = _prompts(config, pads=(0, 3, 1, 2))
    shardings = sharding.logical_shardings(
        jax.eval_shape(lambda: VLM(config).init(jax.random.key(0), pixels, ids)["params"]), mesh)
    sharded_params = jax.device_put(params, shardings)
    batch = sharding.batch_sharding(mesh)
    s_pixels = jax.device_put(pixels, sharding.batch_sharding(mesh, 4))
    s_ids, s_mask = jax.device_put(ids, batch), jax.device_put(mask, batch)

    @jax.jit
    def rollout(p, x, i, m, key):
        return sampling.generate(p, config, x, i, m, key,
            sampling.SamplingParams(group_size=2, max_new_tokens=6, greedy=True))

    sharded = rollout(sharded_params, s_pixels, s_ids, s_mask, jax.random.key(0))
    single = sampling.generate(params, config, pixels, ids, mask, jax.random.key(0),
        sampling.SamplingParams(group_size=2,
                               max_new_tokens=6, greedy=True))
    np.testing.assert_array_equal(sharded.completion_ids, single.completion_ids)
    np.testing.assert_allclose(sharded.model_logprobs, single.model_logprobs, atol=1e-5)
    assert len(sharded.completion_ids.sharding.device_set) == 8


def test_decode_sizes_halve_while_the_half_is_at_least_min_rows():
    assert sampling.decode_sizes(256, True) == (256, 128, 64, 32)
    assert sampling.decode_sizes(24, True) == (24, 12)
    assert sampling.decode_sizes(12, True) == (12,) and sampling.decode_sizes(256, False) == (256,)
    assert sampling.decode_sizes(100, True) == (100, 50, 25)


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_dropping_finished_rows_changes_no_sample(tiny, greedy):
    """Compaction (the decode batch halves as rows finish) gives the samples, log-probs and lengths of decoding
    every row to the end: 4 prompts x G = 8, so the batch goes 32 -> 16 -> 8 slots as rows hit an EOS id."""
    config, params = tiny
    pixels, ids, mask = _prompts(config, pads=(0, 3, 1, 2))
    eos = tuple(range(4, config.text.vocab_size, 9))  # ~1 in 9 tokens ends a row: lengths spread over the budget
    kw = dict(group_size=8, max_new_tokens=24, temperature=1.0, eos_ids=eos, greedy=greedy)
    full = sampling.generate(params, config, pixels, ids, mask, jax.random.key(5),
        sampling.SamplingParams(compact=False, **kw))
    compact = sampling.generate(params, config, pixels, ids, mask, jax.random.key(5),
        sampling.SamplingParams(compact=True, **kw))
    lengths = np.asarray(full.lengths)
    # The smaller phases ran for a while: sampled, the 8-slot phase; greedy (a group's rows are equal), the 16.
    assert np.sum(lengths < 20) >= (16 if greedy else 24) and np.sum(lengths > 4) >= 4, lengths
    for name in ("completion_ids", "completion_mask", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(compact, name), getattr(full, name), err_msg=name)
    np.testing.assert_allclose(compact.model_logprobs, full.model_logprobs, atol=1e-5)
    np.testing.assert_allclose(compact.model_logprobs, full.model_logprobs, atol=1e-5)
