"""rftjax's policy loss against TRL's `GRPOTrainer._compute_loss` (torch) on the same random numbers:
same loss and same gradient with respect to the per-token log-probs (see REFERENCE-NOTES)."""

import zlib
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rftjax import rl

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

N, G, T = 8, 4, 12
AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
       "dapo": "token-mean"}


def _inputs(seed):
    rng = np.random.default_rng(seed)
    logps = (-np.abs(rng.normal(1.0, 0.7, (N, T)))).astype(np.float32)
    # Ratios spread around 1 so that both clip sides are exercised.
    old = (logps + rng.normal(0, 0.25, (N, T))).astype(np.float32)
    ref = (logps + rng.normal(0, 0.3, (N, T))).astype(np.float32)
    lengths = rng.integers(1, T + 1, N)
    lengths[2] = T
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(0, 1, N).astype(np.float32)
    return logps, old, ref, mask, adv


def _trl_loss(tmp_path, loss_type, beta, level, bias_correction, logps, old, ref, mask, adv):
    from accelerate import Accelerator
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, loss_type=loss_type, beta=beta,
                      epsilon=0.2, epsilon_high=0.28, importance_sampling_level=level,
                      use_bias_correction_kl=bias_correction, max_completion_length=T,
                      per_device_train_batch_size=N, num_generations=G, report_to=[])
    logps_t = torch.tensor(logps, requires_grad=True)
    stub = SimpleNamespace(
        args=args, loss_type=loss_type, beta=beta, epsilon_low=args.epsilon, epsilon_high=args.epsilon_high,
        importance_sampling_level=level, top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=Accelerator(cpu=True), max_completion_length=T,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps_t, torch.zeros_like(logps_t), None))
    mask_t = torch.tensor(mask)
    inputs = {"prompt_ids": torch.zeros((N, 1), dtype=torch.long), "prompt_mask": torch.ones((N, 1)),
              "completion_ids": torch.zeros((N, T), dtype=torch.long), "completion_mask": mask_t,
              "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
              "ref_per_token_logps": torch.tensor(ref), "num_items_in_batch": mask_t.sum()}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.detach().item(), logps_t.grad.numpy(), stub._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta,bias_correction", [(0.0, False), (0.04, True), (0.04, False)])
def test_policy_loss_and_gradient_match_trl(tmp_path, loss_type, level, beta, bias_correction):
    logps, old, ref, mask, adv = _inputs(seed=zlib.crc32(f"{loss_type}-{level}-{beta}".encode()))
    ref_loss, ref_grad, trl_metrics = _trl_loss(tmp_path, loss_type, beta, level, bias_correction, logps, old, ref,
                                                mask, adv)
    config = rl.AlgorithmConfig(group_size=G, clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=beta,
                                kl_estimator="k3", kl_bias_correction=bias_correction,
                                ratio_level=level, loss_agg_mode=AGG[loss_type], norm_len=T)

    def loss_fn(lp):
        return rl.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), config,
                              ref_logprobs=jnp.asarray(ref))

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logps))
    assert abs(float(loss) - ref_loss) < 1e-6, (float(loss), ref_loss)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-6, rtol=0)
    assert np.abs(ref_grad).max() > 1e-3  # the comparison is not between two zero gradients
    # Clip fractions follow TRL's definitions (token-weighted; TRL weights sequence-level ratios per sequence).
    if level == "token":
        assert abs(float(metrics["clip_frac_low"]) - trl_metrics["clip_ratio/low_mean"][0]) < 1e-6
        assert abs(float(metrics["clip_frac_high"]) - trl_metrics["clip_ratio/high_mean"][0]) < 1e-6
        assert trl_metrics["clip_ratio/low_mean"][0] > 0 and trl_metrics["clip_ratio/high_mean"][0] > 0
    if beta:
        assert abs(float(metrics["kl_ref"]) - np.sum(_k3(logps, ref) * mask) / mask.sum()) < 1e-5


def _k3(logps, ref):
    d = ref - logps
    return np.exp(d) - d - 1
