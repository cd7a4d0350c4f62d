"""palmlite: PaLM / Gopher / GLaM design choices as toggles of one small JAX + Flax NNX library."""

__version__ = "0.1.0"

from palmlite.files import use_compilation_cache

use_compilation_cache()  # before anything compiles: JAX reads it once

from palmlite import presets, sharding
from palmlite.accounting import (PEAK_FLOPS, count_params, device_peak_flops, flops_per_token,
                                 kv_cache_bytes_per_token, mfu)
from palmlite.attention import KVCache, init_cache
from palmlite.config import ModelConfig, MoEConfig
from palmlite.losses import cross_entropy_and_z_loss
from palmlite.model import Transformer
from palmlite.presets import dense_twin, moe_twin
from palmlite.train_config import TrainConfig


__all__ = [
    "ModelConfig", "MoEConfig", "Transformer", "presets", "count_params", "flops_per_token", "mfu",
    "kv_cache_bytes_per_token", "device_peak_flops", "PEAK_FLOPS", "cross_entropy_and_z_loss",
    "KVCache", "init_cache", "dense_twin", "moe_twin", "TrainConfig", "sharding",
]
