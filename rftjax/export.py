"""Export a run's checkpoint as a Hugging Face directory that transformers loads.

    python -m rftjax.export --workdir runs/geo3k --out exported/geo3k [--step 200]

Writes config.json + safetensors in the Hub layout of the run's model family
(`LlavaForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, `Qwen2VLForConditionalGeneration`:
`rftjax.models.hf.save_pretrained`) and the tokenizer: the source checkpoint's own files (tokenizer.json, its
config and chat template, the processor configs) for a run started from `model.checkpoint`, else the packaged
tokenizer with its chat template. The run's config is read from the checkpoint itself, so no config file is
needed; only the policy params are read (no optimizer state).
"""

from __future__ import annotations

import json
import logging

import jax
import ml_collections

from rftjax.build import model_config_of, tokenizer_of
from rftjax.checkpoint import Checkpointer
from rftjax.models import abstract_params
from rftjax.models import hf as rhf

log = logging.getLogger("rftjax")


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
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract_params(model_config))
    return config, model_config, ckpt.restore_params(step, target), step


def export(workdir: str, out: str, step: int | None = None) -> str:
    """Write the policy params of `workdir`'s checkpoint `step` (default the latest) and the run's tokenizer to
    the HF directory `out` (see the module docstring). Returns `out`.

    Raises:
      ValueError: `workdir` has no checkpoint (or not `step`).
    """
    config, model_config, params, step = restore_policy(workdir, step)
    rhf.save_pretrained(out, model_config, params)
    tokenizer_of(config, model_config).save_pretrained(out)
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
