"""Test setup, before jax is imported: 8 virtual CPU devices (for the sharding tests), offline HF, and one
persistent XLA compilation cache for the session.

The cache (a fresh temporary directory per session, inherited by the subprocesses the tests start) lets the many
tests that build the same smoke-config programs, in this process or in `python -m rftjax.train` subprocesses,
compile each program once: it reuses identical compiled executables and changes no result. Set
`RFTJAX_TEST_COMPILE_CACHE=0` to compile everything afresh.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("RFTJAX_TEST_COMPILE_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rftjax-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import numpy as np  # noqa: E402 - after the environment above
import pytest  # noqa: E402

from helpers import write_easyr1  # noqa: E402


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """EasyR1 jsonl files (train: 32 rows, some over-long; test: 8) with their images, shared by the tests."""
    root = tmp_path_factory.mktemp("easyr1")
    rng = np.random.default_rng(0)
    return {"train": write_easyr1(str(root / "train.jsonl"), 32, rng, long_every=4),
            "test": write_easyr1(str(root / "test.jsonl"), 8, rng)}


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL checkpoint written by transformers, with a tokenizer (its special ids at
    `QWEN_TOKEN_IDS`) and the published chat template: `(hf model, directory)`."""
    from hf_reference import QWEN_TOKEN_IDS, make_hf_qwen_vl, make_tokenizer_dir

    model, path = make_hf_qwen_vl(tmp_path_factory.mktemp("qwen"), vocab=320, ids=QWEN_TOKEN_IDS)
    return model, make_tokenizer_dir(path, "qwen")


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    """A tiny random Qwen3-VL checkpoint written by transformers (with its preprocessor_config.json), a tokenizer
    (special ids at `QWEN_TOKEN_IDS`) and Qwen3.5's thinking chat template: `(hf model, directory)`."""
    from hf_reference import QWEN_TOKEN_IDS, make_hf_qwen3_vl, make_tokenizer_dir

    model, path = make_hf_qwen3_vl(tmp_path_factory.mktemp("qwen3"), vocab=320, ids=QWEN_TOKEN_IDS)
    return model, make_tokenizer_dir(path, "qwen3")


@pytest.fixture(scope="session")
def qwen3_5_dir(tmp_path_factory):
    """A tiny random Qwen3.5 checkpoint written by transformers, with its preprocessor config, a tokenizer (special
    ids at `QWEN_TOKEN_IDS`) and Qwen3.5's chat template: `(hf model, directory)`."""
    from hf_reference import QWEN_TOKEN_IDS, make_hf_qwen3_5, make_tokenizer_dir

    model, path = make_hf_qwen3_5(tmp_path_factory.mktemp("qwen3_5"), vocab=320, ids=QWEN_TOKEN_IDS)
    return model, make_tokenizer_dir(path, "qwen3")


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A tiny random LLaVA checkpoint (16 px images, 4 px patches) with a tokenizer and chat template."""
    from hf_reference import make_hf_llava, make_tokenizer_dir

    model, path = make_hf_llava(tmp_path_factory.mktemp("llava"), vocab=320, image_size=16, patch=4)
    return model, make_tokenizer_dir(path, "llava")


SLOW = {
    # The long end-to-end runs: `python -m pytest -m "not slow"` (the daily tier) skips them; the full suite (CI)
    # runs them. The fast tier keeps one end-to-end run of the trainer per entry point (the smoke config's grpo preset in
    # process, the CLI with a device-side reward source), the sharded, scanned and Qwen-VL paths at one
    # setting each, and every parity check against transformers, TRL and peft that takes under ~10 s.
    "test_noisy_rollout.py::test_interrupted_noisy_corrected_run_resumes_exactly",
    "test_multimodal.py::test_video_task_trains_through_the_cli[qwen_dir]",
    "test_multimodal.py::test_video_task_trains_through_the_cli[qwen3_dir]",
    "test_multimodal.py::test_multi_image_easyr1_rows_train_through_the_cli",
    *(f"test_multimodal.py::test_{t}[{f}]" for t in ("two_image_row_and_one_image_row_match_transformers",
                                                     "video_row_matches_transformers") for f in ("qwen2_vl", "qwen3_5")),
    "test_multiprocess.py::test_two_processes_equal_one_process_and_resume_exactly_after_sigkill",
    "test_checkpoint_training.py::test_qwen_checkpoint_trains_resumes_evaluates_and_exports",
    "test_checkpoint_training.py::test_llava_checkpoint_trains_resumes_and_exports",
    "test_qwen3_training.py::test_checkpoint_trains_resumes_evaluates_and_exports",
    "test_checkpoint_training.py::test_sampler_and_trainer_logprobs_agree",
    "test_faults.py::test_sigkill_at_every_point_then_rerun_gives_the_uninterrupted_run",
    "test_faults.py::test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before",
    "test_faults.py::test_a_full_disk_fails_the_save_loudly_and_keeps_the_previous_checkpoint",
    "test_sweep.py::test_two_arms_two_seeds_share_cold_starts_resume_after_a_kill_and_write_results",
    "test_train.py::test_sharded_mesh_gives_single_device_losses",
    "test_train.py::test_trimmed_completions_give_the_same_loss_and_gradient",
    "test_train.py::test_rl_and_control_start_from_another_runs_cold_start",
    "test_train.py::test_evaluate_cli_on_a_user_dataset",
    "test_train.py::test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly",
    *(f"test_train.py::test_every_preset_runs_the_smoke_config[{a}]" for a in ("dapo", "dr_grpo", "gspo", "ppo",
                                                                               "reinforce_pp", "rloo")),
    "test_lora.py::test_grpo_with_lora_on_decoder_and_vision_exports_to_transformers_and_peft",
    "test_lora.py::test_grpo_with_lora_on_the_decoder_exports_to_peft",
    "test_lora.py::test_remat_policies_give_the_gradients_of_no_remat[full]",
    "test_scale.py::test_chunked_logprobs_and_gradients_equal_the_full_logits",
    "test_scale.py::test_micro_batches_give_the_whole_minibatch_update",
    "test_scale.py::test_aot_compiles_a_tiny_runs_programs_for_the_cpu_topology",
    "test_scale.py::test_photo_sized_images_fit_the_update_in_a_bounded_temp",
    "test_rl_update.py::test_media_once_per_prompt_saves_the_vision_work_of_the_copies",
    "test_rl_update.py::test_scanned_minibatch_updates_equal_a_plain_loop",
    "test_rl_update.py::test_minibatches_smaller_than_the_prompts_encode_only_their_prompts",
    "test_lora.py::test_lora_merge_equals_the_adapted_model_and_bad_settings_raise",
    "test_lora.py::test_remat_policies_give_the_gradients_of_no_remat[dots]",
    "test_sampling.py::test_greedy_equals_naive_full_forward_argmax[unrolled]",
    "test_plan.py::test_plan_matches_a_live_run[float32-0]",
    "test_plan.py::test_plan_matches_a_live_run[bfloat16-4]",
    "test_notebook.py::test_notebook_runs_headless_and_ends_with_the_accuracy_table",
    "test_notebook.py::test_qwen_notebook_runs_headless_on_a_tiny_standin",
    "test_reward_models.py::test_rules_plus_a_reward_model_train_and_resume_through_the_cli",
    "test_reward_models.py::test_a_reward_model_alone_scores_rows_without_gold_answers",
    "test_reward_models.py::test_learned_rewards_read_every_image_and_video_of_a_row",
    "test_reward_models.py::test_a_tiny_judge_goes_through_the_whole_path",
    "test_rl_update.py::test_on_policy_correction_uses_the_trainer_at_the_rollout_params_and_skips_noisy_rows",
    *(f"test_family.py::{t}[unrolled]" for t in ("test_hybrid_params_follow_the_pattern",
                                                 "test_hybrid_model_samples_what_the_trainer_scores",
                                                 "test_hybrid_cached_decode_equals_full_forward",
                                                 "test_recurrent_layers_do_not_absorb_left_padding")),
    "test_sharding.py::test_sharded_params_give_single_device_logits[unrolled]",
    "test_models.py::test_kv_cache_prefill_then_decode_equals_full_forward[unrolled]",
}
"""Test ids (file::name, or file::name[params] for one case) marked `slow`."""


def pytest_collection_modifyitems(config, items):
    """Mark the `SLOW` tests (a name without parameters marks all of its cases)."""
    for item in items:
        file_and_name = f"{item.path.name}::{item.originalname}"
        if f"{item.path.name}::{item.name}" in SLOW or file_and_name in SLOW:
            item.add_marker(pytest.mark.slow)
