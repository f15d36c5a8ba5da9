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
def llava_dir(tmp_path_factory):
    """A tiny random LLaVA checkpoint (16 px images, 4 px patches) with a tokenizer and chat template."""
    from hf_reference import make_hf_llava, make_tokenizer_dir

    model, path = make_hf_llava(tmp_path_factory.mktemp("llava"), vocab=320, image_size=16, patch=4)
    return model, make_tokenizer_dir(path, "llava")
