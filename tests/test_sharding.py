"""Params sharded on a (data=2, fsdp=2, tensor=2) mesh of 8 virtual CPU devices give single-device logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rftjax import sharding
from rftjax.models import VLM, dummy_inputs, get_preset, init_params

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices: see tests/conftest.py")


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_sharded_params_give_single_device_logits(scan):
    config = get_preset("tiny", scan_layers=scan).replace(
        text={"num_heads": 4, "num_kv_heads": 2, "vocab_size": 128})
    model = VLM(config)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    pixels, ids = dummy_inputs(config, batch_size=4, text_len=6)
    ids = ids.at[:, -6:].set(jax.random.randint(jax.random.key(5), (4, 6), 4, 128))
    pixels = jax.random.normal(jax.random.key(6), pixels.shape)
    mask = jnp.ones_like(ids, bool).at[1, :2].set(False)

    params, shardings = sharding.init_sharded_params(model, jax.random.key(0), pixels, ids, mesh=mesh)
    # Really sharded: the big kernels are split over both fsdp and tensor.
    lm = params["language_model"]
    q_kernel = lm["layers"]["q_proj"]["kernel"] if scan else lm["layers_0"]["q_proj"]["kernel"]
    spec = q_kernel.sharding.spec
    assert "fsdp" in jax.tree.leaves(tuple(spec)) and "tensor" in jax.tree.leaves(tuple(spec)), spec
    assert len(q_kernel.addressable_shards) == 8 and q_kernel.addressable_shards[0].data.size < q_kernel.size

    batch = sharding.batch_sharding(mesh)
    apply = jax.jit(lambda p, x, i, m: model.apply({"params": p}, x, i, m).logits,
                    in_shardings=(shardings, sharding.batch_sharding(mesh, 4), batch, batch))
    sharded_logits = np.asarray(apply(params, pixels, ids, mask))

    single = init_params(config, jax.random.key(0))
    single = jax.device_put(single, jax.devices()[0])
    ref = np.asarray(model.apply({"params": single}, pixels, ids, mask).logits)
    np.testing.assert_allclose(sharded_logits, ref, atol=1e-5, rtol=0)


def test_fit_spec_drops_axes_that_do_not_divide():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert sharding.fit_spec(PartitionSpec("tensor", "fsdp"), (3, 4), mesh.shape) == PartitionSpec(None, "fsdp")
    assert sharding.fit_spec(PartitionSpec(("data", "fsdp")), (6,), mesh.shape) == PartitionSpec("data")


def test_make_mesh_errors_and_fill():
    assert sharding.make_mesh(data=-1, fsdp=2, tensor=2).shape["data"] == 2
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        sharding.make_mesh(data=3, fsdp=2, tensor=1)


def test_sharded_qwen_vl_forward_equals_single_device():
    """Qwen2.5-VL tiny on a (data=2, fsdp=2, tensor=2) mesh: images of different sizes per row, left padding."""
    from rftjax.models import QwenImages, model_for

    config = get_preset("qwen_vl_tiny", max_image_tokens=16)
    model = model_for(config)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rng = np.random.default_rng(0)
    grids = np.array([[1, 8, 6], [1, 4, 10], [1, 4, 4], [1, 8, 8]], np.int32)  # 12, 10, 4, 16 tokens
    patches = np.zeros((4, 64, config.vision.patch_dim), np.float32)
    ids = rng.integers(4, 150, (4, 24)).astype(np.int32)
    mask = np.ones((4, 24), bool)
    for b, g in enumerate(grids):
        n = int(g.prod())
        patches[b, :n] = rng.standard_normal((n, config.vision.patch_dim))
        ids[b, 24 - 2 - n // 4:22] = config.image_token_id
        mask[b, :24 - 4 - n // 4] = b % 2 == 0  # odd rows left-padded
    images = QwenImages(jnp.asarray(patches), jnp.asarray(grids))
    params, shardings = sharding.init_sharded_params(model, jax.random.key(0), *dummy_inputs(config), mesh=mesh)
    kernel = params["language_model"]["layers_0"]["q_proj"]["kernel"]
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.size < kernel.size
    image_shardings = QwenImages(sharding.batch_sharding(mesh, 3), sharding.batch_sharding(mesh, 2))
    batch = sharding.batch_sharding(mesh)
    apply = jax.jit(lambda p, x, i, m: model.apply({"params": p}, x, i, m).logits,
                    in_shardings=(shardings, image_shardings, batch, batch))
    sharded = np.asarray(apply(params, images, jnp.asarray(ids), jnp.asarray(mask)))
    single = jax.device_put(jax.device_get(params), jax.devices()[0])
    ref = np.asarray(jax.jit(lambda p, x, i, m: model.apply({"params": p}, x, i, m).logits)(single, images, ids, mask))
    np.testing.assert_allclose(sharded[mask], ref[mask], atol=1e-5, rtol=0)
