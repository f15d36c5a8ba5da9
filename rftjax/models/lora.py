"""LoRA adapters on the model's linear layers, through qwix (google/qwix, `qwix.LoraProvider`).

Why qwix: it is Google's maintained JAX library for LoRA/QLoRA (tunix uses it); it wraps an existing Linen module
without changing its code, intercepting the `lax.dot_general` of every `Linear` whose module path matches a
regex, and it creates the adapter params next to the kernel (`kernel_lora_a`, `kernel_lora_b`) with the kernel's
logical axis names, so `rftjax.sharding` shards them like everything else, under `nn.scan` (stacked on the
`layers` axis) and `nn.remat` as well. The forward pass is `x @ W + (x @ A) @ B * alpha / rank`
(Hu et al. 2021, eq. 3; PEFT's default scaling), with `A` `[prod(in), rank]` (He-uniform) and `B`
`[rank, prod(out)]` (zeros), so a fresh adapter leaves the model exactly as it was.

What rftjax adds: the target presets (`TARGETS`), merging the adapters into the kernels (`merge`), and the
names and layouts of the PEFT adapter export (`peft_tensors`, `peft_config`).
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

LORA_A, LORA_B = "kernel_lora_a", "kernel_lora_b"

_DECODER = (r"language_model/layers(_\d+)?/(\w+_\d+/)?(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|"
            r"in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj)")
TARGETS = ("decoder", "decoder+vision", "vision")
"""Named target sets (module-path regexes, `re.fullmatch`): the decoder's attention, Gated DeltaNet and MLP
projections (PEFT's `all-linear` minus the LM head), optionally the vision tower's linears (each family names them:
`Family.lora_vision_targets`). The patch embeddings, the projector / merger and the LM head are not adapted by
these presets; a custom regex may name them (export: linear layers only)."""


def target_pattern(targets: str, vision: str) -> str:
    """The module-path regex of a `TARGETS` name (with `vision`, the family's vision-linear regex), or `targets`
    itself (a custom regex)."""
    named = {"decoder": _DECODER, "decoder+vision": f"{_DECODER}|{vision}", "vision": vision}
    return named.get(targets, targets)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings (a field of the model config, so `model_for` builds the adapted module everywhere).

    Attributes:
      rank: r, the adapters' inner dimension (> 0).
      alpha: the scale numerator: the adapter output is multiplied by `alpha / rank` (PEFT `lora_alpha`).
      dropout: dropout on the adapter's input in training forward passes (PEFT `lora_dropout`); never when
        sampling or computing old/reference log-probs.
      targets: a `TARGETS` name or a regex `re.fullmatch`ed against module paths such as
        `language_model/layers_3/q_proj` (`language_model/layers/q_proj` with `scan_layers`).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = "decoder"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(target_pattern(self.targets, ""))
        except re.error as e:
            raise ValueError(f"LoraConfig.targets={self.targets!r} is not a regex ({e}); or use one of "
                             f"{list(TARGETS)}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapt(module: nn.Module, lora: LoraConfig, train: bool = False, vision_targets: str = "") -> nn.Module:
    """`module` with LoRA adapters on the linear layers `lora.targets` names (`qwix.apply_lora_to_model`;
    `vision_targets`: the family's vision-linear regex for the named target sets); every method the sampler
    calls is adapted. `train=True` applies `lora.dropout` (the call then needs `rngs={"dropout": key}`);
    otherwise dropout is off."""
    import qwix

    provider = qwix.LoraProvider(module_path=target_pattern(lora.targets, vision_targets), rank=lora.rank,
                                 alpha=lora.alpha, dropout=lora.dropout if train else 0.0)
    return qwix.apply_lora_to_model(module, provider, methods=("__call__", "encode_images", "head"))


def is_adapter(path: tuple[str, ...]) -> bool:
    """Whether the param at `path` (keys) is a LoRA adapter matrix."""
    return path[-1] in (LORA_A, LORA_B)


def adapted_kernels(params: dict) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array]]:
    """`{path of the kernel: (A, B)}` for every adapter in `params` (A `[..., prod(in), r]`, B `[..., r,
    prod(out)]`; a leading layers axis when scanned)."""
    flat = traverse_util.flatten_dict(params)
    return {k[:-1] + ("kernel",): (flat[k], flat[k[:-1] + (LORA_B,)]) for k in flat if k[-1] == LORA_A}


def merge(params: dict, lora: LoraConfig) -> dict:
    """The base params with every adapter folded into its kernel, `W + (A @ B).reshape(W.shape) * alpha / r`
    (float32 math, the kernel's dtype), adapter leaves removed: params of the plain `model_for(config)` that
    compute what the adapted model computes."""
    flat = {k: v for k, v in traverse_util.flatten_dict(params).items() if not is_adapter(k)}
    for path, (a, b) in adapted_kernels(params).items():
        w = flat[path]
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * lora.scale
        flat[path] = (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def peft_config(lora: LoraConfig, module_names: list[str], base_model: str = "") -> dict:
    """The `adapter_config.json` of a PEFT LoRA adapter on `module_names` (their full transformers names)."""
    return {"peft_type": "LORA", "task_type": None, "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": sorted(module_names), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model or None}


def peft_tensors(a: np.ndarray, b: np.ndarray, module: str) -> dict[str, np.ndarray]:
    """PEFT's two tensors of one adapted `nn.Linear` named `module` (its transformers name): `lora_A.weight`
    `[r, in] = A.T` and `lora_B.weight` `[out, r] = B.T`, under PEFT's `base_model.model.` prefix."""
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": np.ascontiguousarray(np.asarray(a).T),
            f"{prefix}.lora_B.weight": np.ascontiguousarray(np.asarray(b).T)}
