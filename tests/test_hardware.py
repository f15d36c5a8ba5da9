"""`model.dtype="auto"`: the compute dtype from a measured, cached probe (`rftjax.hardware`)."""

import json

import pytest

from rftjax import build, hardware
from rftjax.configs import base_config


@pytest.fixture
def fresh_probe(tmp_path, monkeypatch):
    """An empty probe cache (on disk and in memory) and a counter of real probes."""
    monkeypatch.setenv("RFTJAX_CACHE_DIR", str(tmp_path))
    hardware.cpu_matmul_rates.cache_clear()
    hardware.compute_dtype.cache_clear()
    calls = []
    real = hardware.probe_matmul_rates

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hardware, "probe_matmul_rates", counting)
    yield calls
    hardware.cpu_matmul_rates.cache_clear()
    hardware.compute_dtype.cache_clear()


def test_auto_resolves_to_a_supported_dtype_and_probes_once(fresh_probe):
    dtype = hardware.compute_dtype("auto")
    assert dtype in ("float32", "bfloat16")
    assert hardware.compute_dtype("auto") == dtype
    assert len(fresh_probe) == 1  # the second call used the in-memory result
    rates, source = hardware.cpu_matmul_rates()
    assert source == "probed" and rates["float32"] > 1e8 and rates["bfloat16"] > 1e8  # FLOP/s, measured
    assert dtype == ("bfloat16" if rates["bfloat16"] >= hardware.BF16_MARGIN * rates["float32"] else "float32")

    hardware.cpu_matmul_rates.cache_clear()  # as a new process: the disk cache answers, no second probe
    hardware.compute_dtype.cache_clear()
    assert hardware.compute_dtype("auto") == dtype
    assert len(fresh_probe) == 1
    assert hardware.cpu_matmul_rates()[1].startswith("cached in ")
    with open(hardware.probe_cache_path()) as f:
        assert len(json.load(f)) == 1


@pytest.mark.parametrize("bf16_rate, expected", [(300.0, "bfloat16"), (60.0, "float32"), (105.0, "float32")])
def test_auto_picks_bfloat16_only_when_its_matmul_is_faster(fresh_probe, monkeypatch, bf16_rate, expected):
    monkeypatch.setattr(hardware, "probe_matmul_rates", lambda: {"float32": 100.0, "bfloat16": bf16_rate})
    dtype, reason = hardware.choose_dtype()
    assert dtype == expected and f"{bf16_rate / 100:.2f}x" in reason


def test_explicit_dtypes_skip_the_probe_and_bad_names_fail(fresh_probe):
    assert hardware.compute_dtype("float32") == "float32" and hardware.compute_dtype("bfloat16") == "bfloat16"
    assert fresh_probe == []
    with pytest.raises(ValueError, match="model.dtype='fp16'; choose one of auto, float32, bfloat16"):
        hardware.compute_dtype("fp16")


def test_unreadable_cache_file_is_ignored_and_rewritten(fresh_probe):
    with open(hardware.probe_cache_path(), "w") as f:
        f.write("{not json")
    hardware.cpu_matmul_rates()
    assert len(fresh_probe) == 1
    with open(hardware.probe_cache_path()) as f:
        assert len(json.load(f)) == 1


def test_model_config_takes_model_dtype_and_the_old_override_with_a_warning(fresh_probe, caplog):
    c = base_config()
    c.model.dtype = "bfloat16"
    assert build.model_config_of(c).dtype == "bfloat16"
    c.model.dtype = "auto"
    c.model.overrides = {"dtype": "float32"}
    with caplog.at_level("WARNING", logger="rftjax"):
        assert build.model_config_of(c).dtype == "float32"
    assert "deprecated: use model.dtype=float32" in caplog.text
    assert fresh_probe == []  # an explicit dtype never probes
    c.model.dtype = "bfloat16"
    with pytest.raises(ValueError, match="disagree; set only model.dtype"):
        build.model_config_of(c)
