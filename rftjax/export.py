"""Export a run's checkpoint as a Hugging Face directory that transformers loads.

    python -m rftjax.export --workdir runs/geo3k --out exported/geo3k [--step 200]

Writes config.json + safetensors in the Hub layout of the run's model family
(`LlavaForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, `Qwen2VLForConditionalGeneration`:
`rftjax.models.hf.save_pretrained`) and the tokenizer: the source checkpoint's own files (tokenizer.json, its
config and chat template, the processor configs) for a run started from `model.checkpoint`, else the packaged
tokenizer with its chat template. The run's config is read from the checkpoint itself, so no config file is
needed; only the policy params are read (no optimizer state).

LoRA runs (`model.lora.rank > 0`): `OUT` holds the merged weights (`W + A B alpha / r`), and `OUT/adapter/` the
adapters alone in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`), for
`peft.PeftModel.from_pretrained(base_model, "OUT/adapter")` on the base checkpoint. Runs that freeze params
(LoRA, `optim.freeze`) checkpoint the trained params only: the frozen ones are rebuilt as the run built them
(`model.checkpoint`'s weights, or the seed's random init).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from rftjax import sharding, trainable
from rftjax.build import init_params, model_config_of, tokenizer_of
from rftjax.checkpoint import Checkpointer
from rftjax.models import abstract_params
from rftjax.models import hf as rhf

log = logging.getLogger("rftjax")
ADAPTER_DIR = "adapter"  # LoRA runs: the PEFT adapter directory inside the export


def restore_policy(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, object, dict, int]:
    """`(run config, model config, policy params, step)` of `workdir`'s checkpoint `step` (default the latest),
    the params on one device, read without the optimizer state; the run config comes from the checkpoint.

    Raises:
      ValueError: `workdir` has no checkpoint (or not `step`).
    """
    ckpt = Checkpointer(workdir)
    steps = ckpt.manager.all_steps()
    step = ckpt.latest_step() if step is None else int(step)
    if step is None or step not in steps:
        raise ValueError(f"{workdir} has no checkpoint{'' if step is None else f' at step {step}'} (steps: "
                         f"{sorted(steps)}); train first: python -m rftjax.train ...")
    config = ml_collections.ConfigDict(json.loads(ckpt.read_meta(step)["config"]))
    model_config = model_config_of(config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = abstract_params(model_config)
    paths = trainable.trainable_paths(shapes, model_config, config.optim.freeze)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          trainable.split(shapes, paths)[0])
    params = ckpt.restore_params(step, target)
    if len(paths) < len(trainable.flat_paths(shapes)):  # the frozen params, as the run built them
        mesh = sharding.make_mesh(devices=jax.devices()[:1])
        frozen = trainable.split(init_params(config, model_config, mesh, jax.random.key(config.seed))[0], paths)[1]
        params = trainable.combine(params, frozen)
    return config, model_config, params, step


def export(workdir: str, out: str, step: int | None = None) -> str:
    """Write the policy params of `workdir`'s checkpoint `step` (default the latest) and the run's tokenizer to
    the HF directory `out`, LoRA adapters merged, plus `out/adapter/` (PEFT) for a LoRA run (see the module
    docstring). Returns `out`.

    Raises:
      ValueError: `workdir` has no checkpoint (or not `step`).
    """
    config, model_config, params, step = restore_policy(workdir, step)
    rhf.save_pretrained(out, model_config, params)
    tokenizer_of(config, model_config).save_pretrained(out)
    if model_config.lora is not None:
        rhf.save_adapter(os.path.join(out, ADAPTER_DIR), model_config, params, config.model.checkpoint)
    log.info("exported %s step %d to %s", workdir, step, out)
    return out


def main(argv):
    from absl import flags

    from rftjax.configs import setup_logging

    setup_logging()
    f = flags.FLAGS
    path = export(f.workdir, f.out, f.step)
    print(f"wrote {path}: load it with transformers' AutoModelForImageTextToText.from_pretrained({path!r})")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "run directory with checkpoints/")
    flags.DEFINE_string("out", None, "output directory (Hugging Face layout)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
