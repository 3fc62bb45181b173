"""msplora_dist: fine-tuning LLaMA-family models with MSPLoRA (multi-scale pyramid LoRA) on DeepSpeed."""

from msplora_dist.adapters.config import ALL_LINEAR_TARGETS, MSPLoRAConfig, mid_groups
from msplora_dist.adapters.inject import (
    MSPLoRAHierarchy,
    adapter_params,
    apply_msplora,
    count_params,
    get_hierarchy,
    merge_adapter,
    merge_and_unload,
    param_report,
    unmerge_adapter,
)
from msplora_dist.adapters.io import load_adapter, read_adapter_config, save_adapter
from msplora_dist.adapters.layers import LoRAPair, MSPLoRALinear
from msplora_dist.errors import CheckpointError, ConfigError, DataError, UserError

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR_TARGETS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LoRAPair",
    "MSPLoRAConfig",
    "MSPLoRAHierarchy",
    "MSPLoRALinear",
    "UserError",
    "adapter_params",
    "apply_msplora",
    "count_params",
    "get_hierarchy",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "mid_groups",
    "param_report",
    "read_adapter_config",
    "save_adapter",
    "unmerge_adapter",
]
