"""Training beyond one process: torchrun, DDP and FSDP2, and the distributed subspace refresh.

    env = init_distributed("fsdp2")                       # from torchrun's environment
    model = wrap_model(build_model(cfg), env)             # DDP, or fully_shard per block
    opt = distribute_optimizer(gp.build_optimizer(model, "galore"), env.parallel)

Modules: env (process group; gloo on CPU, NCCL on CUDA), rank0 (rank-0-only output),
wrap (DDP / FSDP2), optimizer (the distributed optimizer), sharded (plugin wrappers),
exchange (owners, broadcast of fitted bases), rangefinder (row-sharded range finders),
costs (bytes per step and refresh by projection side), checkpoint and dcp (FSDP2
checkpoints through torch.distributed.checkpoint, resumable at any world size),
perlayer (per-layer mode under DDP: bucketed all-reduce, each weight stepped on its
averaged gradient).
"""
from .env import (DEFAULT_TIMEOUT_S, PARALLEL_MODES, DistEnv, free_port, init_distributed,
                  launched_world_size, shutdown)
from .optimizer import DistributedLowRankOptimizer, distribute_optimizer
from .rangefinder import cholesky_qr, range_finder_floats, sharded_range_finder
from .rank0 import Rank0, is_main_process, print0, rank_zero_only
from .wrap import blocks, is_sharded, local_tensor, unwrap, wrap_model

__all__ = ["DEFAULT_TIMEOUT_S", "DistEnv", "DistributedLowRankOptimizer", "PARALLEL_MODES", "Rank0",
           "blocks", "cholesky_qr", "distribute_optimizer", "free_port", "init_distributed",
           "is_main_process", "is_sharded", "launched_world_size", "local_tensor", "print0",
           "range_finder_floats", "rank_zero_only", "sharded_range_finder", "shutdown", "unwrap",
           "wrap_model"]
