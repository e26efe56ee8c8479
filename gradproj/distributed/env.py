"""Process-group setup from the variables `torchrun` exports.

    env = init_distributed("fsdp2")      # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    ...
    shutdown()

The backend follows the device: NCCL when CUDA is available (one GPU per local rank),
gloo otherwise, so the same command runs on a laptop's CPU and on a GPU node.
`parallel = "none"` under a multi-process launch is refused: N processes would each
train their own copy and overwrite each other's checkpoints.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

PARALLEL_MODES = ("none", "ddp", "fsdp2")

# A collective that has not completed after this long means a rank died or diverged
# (e.g. took a different branch); fail loudly instead of hanging a CI job forever.
DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size, its device and backend."""

    parallel: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun exported it (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def default_device(local_rank: int = 0, device: str = "auto") -> torch.device:
    """cuda:<local rank> when asked ("cuda") or available ("auto"); else the CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(parallel: str, *, device: str = "auto",
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join (or create) the default process group for `parallel`; a no-op for "none".

    `device`: "auto" (CUDA if present), "cuda" or "cpu" — [train] device; "cpu" on a GPU
    machine gives gloo, which is how the CPU tests run anywhere."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"option 'parallel' must be one of {', '.join(PARALLEL_MODES)}, "
                         f"got {parallel!r}")
    world = launched_world_size()
    if parallel == "none":
        if world > 1:
            raise ValueError(f"launched with WORLD_SIZE={world} but [train] parallel = \"none\"; "
                             f"set parallel to \"ddp\" or \"fsdp2\"")
        return DistEnv(device=default_device(0, device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = default_device(local_rank, device)
    backend = backend_for(where)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain `python -m gradproj` with parallel set
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": where} if where.type == "cuda" else {}))
    return DistEnv(parallel, dist.get_rank(), dist.get_world_size(), local_rank, backend, where)


def shutdown() -> None:
    """Destroy the default process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        # every rank done talking before any closes its connections: a gloo rank torn down
        # while a peer still used them aborted that peer once in CI (SIGABRT, "terminate
        # called without an active exception", 4 ranks on 2 cores); the group's timeout
        # bounds the wait if a peer is gone
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on right now (for tests and single-process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
