"""What the training loop asks of Accelerate's distribution: whether parameters are sharded, and the DeepSpeed
engine told the recipe's clipping (ift/training/zero.py)."""

from __future__ import annotations

from ift.training.zero import deepspeed_updates


def shards_parameters(accelerator) -> bool:
    """FSDP, DeepSpeed and Megatron replace the parameters with flat sharded ones at `prepare()`."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                            DistributedType.MEGATRON_LM)


def configure_deepspeed(accelerator, max_grad_norm: float) -> None:
    """The engine must clip and accumulate as the recipe says; no-op outside DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config.update(deepspeed_updates(plugin.deepspeed_config, plugin.zero_stage, max_grad_norm))
