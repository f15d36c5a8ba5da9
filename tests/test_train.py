"""The trainer end to end on the smoke config: every algorithm preset, exact resume after SIGKILL, SIGTERM
checkpoints, and sharded (8 virtual devices) vs single-device equivalence."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from rftjax import batches, configs, optim, rl, steps
from rftjax.checkpoint import Checkpointer
from rftjax.metrics import read_jsonl
from rftjax.train import Trainer
from helpers import set_by_path, smoke_cli, wait_for_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import smoke  # noqa: E402


def _config(algorithm="grpo", **overrides):
    config = smoke.get_config(algorithm)
    overrides = {"mesh.num_devices": 1, **overrides}  # one device unless a test asks for a mesh
    for key, value in overrides.items():
        set_by_path(config, key, value)
    return config


def _run(tmp_path, name, algorithm="grpo", **overrides):
    workdir = str(tmp_path / name)
    trainer = Trainer(_config(algorithm, **overrides), workdir)
    summary = trainer.run()
    return trainer, workdir, summary


@pytest.mark.parametrize("algorithm", sorted(rl.PRESETS))
def test_every_preset_runs_the_smoke_config(tmp_path, algorithm):
    trainer, workdir, summary = _run(tmp_path, algorithm, algorithm)
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    rl_rows = [r for r in rows if r["stage"] == "rl"]
    assert len(rl_rows) == 3 and all(np.isfinite(r["loss"]) for r in rl_rows)
    for key in ("reward_mean", "accuracy", "kl_ref", "entropy", "clip_frac_low", "clip_frac_high", "ratio_max",
                "completion_len_mean", "truncation_rate", "grad_norm", "lr", "rollout_tokens_per_s", "update_time_s"):
        assert key in rl_rows[0], key
    evals = read_jsonl(os.path.join(workdir, "eval.jsonl"))
    assert {e["stage"] for e in evals} >= {"sft_end", "rl_end"} and {e["split"] for e in evals} == {"test", "test_ood"}
    for name in ("summary.json", "curves.png", "samples.jsonl"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert summary["rl_steps"] == 3 and os.listdir(os.path.join(workdir, "tensorboard"))
    assert summary["rl_end_reason"] == "steps" and summary["sft_end_reason"] in ("max_steps", "patience")
    if algorithm == "dapo":  # 2 batches of prompts generated per round (gen_prompts_per_round = 2 x 2)
        assert all(0 <= r["rollout_groups_with_signal"] <= 1 and 0 <= r["rollout_accuracy"] <= 1 for r in rl_rows)
    else:  # without dynamic sampling every rollout is trained on
        assert all(r["rollout_accuracy"] == pytest.approx(r["accuracy"], abs=1e-9) for r in rl_rows)
    if algorithm == "ppo":  # the critic's loss is logged beside the policy's (= value_coef x vf_loss), not over it
        assert all("vf_loss" in r and "vf_clip_frac" in r for r in rl_rows)
        algo = rl.get_algorithm("ppo")
        assert all(r["critic_loss"] == pytest.approx(algo.value_coef * r["vf_loss"], rel=1e-5, abs=1e-8)
                   for r in rl_rows)
        assert all(r["loss"] == pytest.approx(r["pg_loss"], rel=1e-5, abs=1e-8) for r in rl_rows)


def test_rl_and_control_start_from_another_runs_cold_start(tmp_path):
    """rl.init_from_sft: an SFT-only run's cold start (RL disabled there) seeds an RL run and an SFT control run,
    both beginning at its params, step and sft_end evaluations. The time budgets (sft.max_seconds,
    rl.max_seconds) end their stages after one step, with the stage's evaluation, and summary.json says why."""
    from rftjax.checkpoint import SFT_CHECKPOINT
    from rftjax.checkpoint import Checkpointer as Ckpt

    _, src, summary = _run(tmp_path, "sft_only", **{"rl.enabled": False, "sft.max_seconds": 1e-3})
    assert summary["rl_steps"] == 0 and summary["sft_steps"] == 1 and summary["sft_end_reason"] == "max_seconds"
    assert summary["test_accuracy_after_sft"] is not None  # the stage ended with its evaluation
    step = Ckpt(src, subdir=SFT_CHECKPOINT).latest_step()
    for name, extra, stage, reason in (
            ("rl", {"rl.max_seconds": 1e-3}, "rl", "max_seconds"),
            ("control", {"rl.control_sft_seconds": 2.0}, "control_sft", "control_sft_seconds"),
            ("restart", {"rl.control_sft_seconds": 1.0, "rl.control_schedule": "restart"}, "control_sft",
             "control_sft_seconds")):
        config = _config(**{"rl.init_from_sft": src, **extra})
        trainer = Trainer(config, str(tmp_path / name))
        assert trainer.meta["global_step"] == step and trainer.meta["stage"] == "rl"
        summary = trainer.run()
        assert summary["rl_end_reason"] == reason and summary["test_accuracy_final"] is not None
        rows = read_jsonl(os.path.join(trainer.workdir, "metrics.jsonl"))
        assert rows and {r["stage"] for r in rows} == {stage} and rows[0]["step"] == step + 1
        if name == "rl":
            assert len(rows) == 1 and summary["rl_steps"] == 1
        else:  # the control's first update continues the cold start's schedule (its 1 step done), or restarts it
            sft_lr = optim.make_schedule(config.sft.lr, config.sft.max_steps, config.sft.warmup_steps)
            expected = [float(sft_lr(n + (1 if name == "control" else 0))) for n in range(len(rows))]
            assert float(sft_lr(1)) != pytest.approx(float(sft_lr(0)))  # (warm-up) the two designs differ
            assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-6)
        evals = read_jsonl(os.path.join(trainer.workdir, "eval.jsonl"))
        assert [e for e in evals if e["stage"] == "sft_end"] == [e for e in read_jsonl(os.path.join(
            src, "eval.jsonl")) if e["stage"] == "sft_end"]


def test_ppo_critic_update_fits_the_returns():
    """The value model trains: critic updates on a batch with returns 1 drive the value loss down."""
    import functools

    import jax.numpy as jnp

    from rftjax.models import dummy_inputs, get_preset, init_params

    config = get_preset("tiny")
    algo = rl.get_algorithm("ppo", clip_eps_value=10.0)
    critic = optim.TrainState.create(steps.init_critic(init_params(config, jax.random.key(0)), config),
                                     optim.make_optimizer(optim.make_schedule(1e-2, 100)))
    update = optim.make_update(functools.partial(steps.critic_loss, config=config, algo=algo))
    pixels, prompt = dummy_inputs(config, 4)
    seq = batches.SequenceBatch(pixel_values=pixels, prompt_ids=prompt, prompt_mask=jnp.ones_like(prompt, bool),
                              completion_ids=jnp.full((4, 5), 7, jnp.int32), completion_mask=jnp.ones((4, 5), bool))
    batch = batches.UpdateBatch(seq=seq, advantages=jnp.zeros(4), returns=jnp.ones((4, 5)), old_values=jnp.zeros((4, 5)))
    losses = []
    for _ in range(20):
        critic, m = update(critic, batch)
        losses.append(float(m["vf_loss"]))
    assert losses[0] == pytest.approx(0.5, abs=1e-6)  # 0.5 * (0 - 1)^2 at init (zero value head)
    assert losses[-1] < 0.05 * losses[0]


def test_every_algorithm_field_can_be_overridden_from_the_command_line(tmp_path):
    """`--config.rl.algo.FIELD=...` works for every AlgorithmConfig field (typed placeholders); unset fields keep
    the preset's values."""
    import dataclasses

    workdir = str(tmp_path / "cli")
    out = subprocess.run([sys.executable, "-c", "import sys; from rftjax.configs import run_cli; "
                          "run_cli(lambda c, w: print(c.rl.algo.to_json()), 'w')",
                          "--config", os.path.join(ROOT, "configs", "smoke.py:dapo"), "--workdir", workdir,
                          "--config.rl.algo.kl_coef=0.05", "--config.rl.algo.dynamic_sampling=False"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    import json

    algo = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(algo) == ({f.name for f in dataclasses.fields(rl.AlgorithmConfig)} - {"name"}) | set(configs.MOVED)
    assert algo["kl_coef"] == 0.05 and algo["dynamic_sampling"] is False and algo["num_iterations"] == 2
    config = smoke.get_config("dapo")
    config.rl.algo.kl_coef = 0.05
    trainer_algo = configs.algorithm(config)
    assert trainer_algo.kl_coef == 0.05 and trainer_algo.clip_eps_high == rl.get_algorithm("dapo").clip_eps_high
    with pytest.raises(TypeError):
        config.rl.algo.group_size = "eight"


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "gspo"])
def test_trimmed_completions_give_the_same_loss_and_gradient(algorithm):
    """`trim_completions` cuts `[N, T]` completions to the longest row rounded up to 16: the RL loss and its
    gradient are those of the padded batch (Dr.GRPO's constant norm_len fixed to the generation budget by
    `configs.algorithm`, not the trimmed T). Rounding: longest 11 -> 16 columns, 17 -> all 24."""
    from rftjax.models import get_preset, init_params
    from rftjax.rollout import trim_completions

    model = get_preset("tiny")
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    n, t, v = 4, 24, model.vision
    lengths = np.array([3, 11, 7, 1])
    prompt = np.concatenate([np.full((n, model.num_image_tokens), model.image_token_id), rng.integers(4, 50, (n, 3))],
                            axis=1).astype(np.int32)
    mask = np.arange(t)[None] < lengths[:, None]
    seq = batches.SequenceBatch(
        pixel_values=rng.standard_normal((n, v.image_size, v.image_size, v.num_channels)).astype(np.float32),
        prompt_ids=prompt, prompt_mask=np.ones_like(prompt, bool),
        completion_ids=np.where(mask, rng.integers(4, 50, (n, t)), 0).astype(np.int32), completion_mask=mask)
    trimmed = trim_completions(seq)
    assert trimmed.completion_ids.shape == (n, 16) and trimmed.completion_mask.sum() == mask.sum()
    config = smoke.get_config(algorithm)
    config.rl.max_new_tokens = t
    algo = configs.algorithm(config)
    assert algo.norm_len == t
    ref = init_params(model, jax.random.key(1))  # the KL term (grpo's kl_coef > 0) against other params
    advantages = np.array([1.0, -0.5, 0.25, -0.75], np.float32)
    with_ref = lambda s: batches.UpdateBatch(seq=s, advantages=advantages,  # noqa: E731
                                           ref_logprobs=steps.completion_logprobs(ref, model, s)[0])
    grad = jax.value_and_grad(lambda p, b: steps.rl_loss(p, b, model, algo, 1.0)[0])
    (want, want_g), (got, got_g) = grad(params, with_ref(seq)), grad(params, with_ref(trimmed))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(want_g)) > 1e-4  # not trivially zero
    mask[0, :17] = True
    assert trim_completions(seq.replace(completion_mask=mask)).completion_ids.shape == (n, t)


def test_lr_scales_multiply_one_module_updates():
    """`lr_scales`: the vision tower's AdamW update is exactly `scale` x the unscaled one (0 freezes it); other
    modules are untouched; a module name that does not exist raises."""
    import jax.numpy as jnp


    params = {"vision_tower": {"w": jnp.ones((3, 2))}, "language_model": {"w": jnp.ones((3, 2))}}
    grads = jax.tree.map(lambda x: jnp.arange(6.0).reshape(3, 2) - 2.5, params)

    def first_update(scales):
        tx = optim.make_optimizer(optim.make_schedule(1e-2, 10), weight_decay=0.1, lr_scales=scales)
        return tx.update(grads, tx.init(params), params)[0]

    base = first_update(None)
    for scale in (0.1, 0.0):
        up = first_update({"vision_tower": scale})
        np.testing.assert_allclose(up["vision_tower"]["w"], scale * base["vision_tower"]["w"], rtol=1e-6)
        np.testing.assert_array_equal(up["language_model"]["w"], base["language_model"]["w"])
    assert np.abs(base["vision_tower"]["w"]).min() > 0
    with pytest.raises(ValueError, match="no such top-level modules"):
        first_update({"vison_tower": 0.1})


def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(tmp_path):
    env = {**os.environ, "XLA_FLAGS": ""}
    workdir = str(tmp_path / "term")
    proc = subprocess.Popen(smoke_cli(workdir, "--config.checkpoint.every=100"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=ROOT)
    wait_for_step(workdir, 3, [proc])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    last = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]["step"]
    ckpt = Checkpointer(workdir)
    assert ckpt.latest_step() == last  # saved at the step where it stopped (not a periodic one: every=100)
    config = smoke.get_config("grpo")
    config.mesh.num_devices = 1
    trainer = Trainer(config, workdir)
    assert trainer.meta["global_step"] == last


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices: see tests/conftest.py")
def test_sharded_mesh_gives_single_device_losses(tmp_path):
    kw = {"rl.prompts_per_step": 4, "sft.batch_size": 8, "eval.batch_size": 8}
    _, one, _ = _run(tmp_path, "one", **{"mesh.num_devices": 1, "mesh.data": 1, **kw})
    _, eight, _ = _run(tmp_path, "eight", **{"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                             **kw})
    a = read_jsonl(os.path.join(one, "metrics.jsonl"))
    b = read_jsonl(os.path.join(eight, "metrics.jsonl"))
    assert [r["stage"] for r in a] == [r["stage"] for r in b] and sum(r["stage"] == "rl" for r in a) == 3
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-4, (ra["step"], ra["loss"], rb["loss"])
        if ra["stage"] == "rl":
            assert ra["reward_mean"] == rb["reward_mean"] and ra["completion_len_mean"] == rb["completion_len_mean"]


@pytest.mark.parametrize("overrides,message", [
    ({"rl.algorithm": "trpo"}, "unknown algorithm preset"),
    ({"rl.algo.group_size": 1}, "group_size >= 2"),
    ({"mesh.num_devices": 8, "mesh.data": 8, "sft.batch_size": 4}, "not divisible by the mesh"),
    ({"data.max_prompt_len": 12}, "max_prompt_len=12 cannot hold"),
    ({"rl.minibatch_size": 3}, "must divide"),
    ({"data.augment": "blur:1"}, "data.augment"),
    ({"rl.gen_prompts_per_round": 4}, "needs dynamic sampling"),
    ({"eval.pass_k": 4}, "eval.pass_k=4 was renamed"),
])
def test_bad_configs_raise_actionable_errors(tmp_path, overrides, message):
    if overrides.get("mesh.num_devices", 1) > jax.device_count():
        pytest.skip("needs 8 devices")
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, "bad", **overrides)


def test_overlong_buffer_longer_than_the_budget_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="overlong_buffer_len=64"):
        _run(tmp_path, "bad", "dapo", **{"reward.overlong_buffer_len": 64})


def test_settings_that_left_the_objective_keep_working_from_their_old_keys(caplog):
    """`rl.algo.{dynamic_sampling, gen_prompts_per_round, dynamic_sampling_rounds, overlong_buffer_len}` moved to
    `rl.*` / `reward.*`: the old keys set the same values with a warning naming the new key; both set to different
    values is an error; unset, the preset's values hold (DAPO: dynamic sampling, a 64-token overlong buffer)."""
    import logging

    config = smoke.get_config("grpo")
    assert configs.schedule(config) == rl.SCHEDULE_DEFAULTS
    config.rl.algorithm = "dapo"
    assert configs.schedule(config)["dynamic_sampling"] and configs.schedule(config)["overlong_buffer_len"] == 64
    config.rl.algo.dynamic_sampling, config.rl.algo.dynamic_sampling_rounds = False, 7
    configs._WARNED.clear()
    logger = logging.getLogger("rftjax")
    logger.addHandler(caplog.handler)
    try:
        sched = configs.schedule(config)
    finally:
        logger.removeHandler(caplog.handler)
    assert not sched["dynamic_sampling"] and sched["dynamic_sampling_rounds"] == 7
    assert "rl.algo.dynamic_sampling is deprecated: use rl.dynamic_sampling" in caplog.text
    config.rl.dynamic_sampling = True
    with pytest.raises(ValueError, match="disagree; set only rl.dynamic_sampling"):
        configs.schedule(config)


def test_evaluate_cli_on_a_user_dataset(tmp_path):
    from rftjax import evaluate

    _, workdir, _ = _run(tmp_path, "ev", **{"rl.steps": 1})
    config = smoke.get_config("grpo")
    config.mesh.num_devices = 1
    config.data.max_prompt_len = 256
    config.eval.dataset = "mathv:" + os.path.join(ROOT, "tests", "fixtures", "mathv", "data", "testmini.jsonl")
    config.eval.batch_size, config.eval.pass_n = 8, 0
    evaluate.main(config, workdir)
    rows = [e for e in read_jsonl(os.path.join(workdir, "eval.jsonl")) if e["stage"] == "evaluate"]
    assert len(rows) == 1 and rows[0]["n"] == 7 and 0.0 <= rows[0]["accuracy"] <= 1.0
