"""FSDP2 checkpoints through torch.distributed.checkpoint (DCP), resumable at any world size.

Every rank writes its own safetensors file with DCP's `HuggingFaceStorageWriter`
(`save_distributed=True`): each tensor is stored as this rank's chunk together with its
offset in the global tensor (safetensors metadata), and `HuggingFaceStorageReader`
reassembles any other chunking from those offsets — so a checkpoint written by W ranks
loads on W' ranks, or in one process (evaluation, export, `parallel = "none"`). The files
stay plain safetensors; scalars and options go to `meta.json` as in every gradproj
checkpoint, and the folder is published by `CheckpointManager._publish` (temp folder,
fsync, rename, `latest`), so the damaged-folder rule applies unchanged.

Keys: `model/<name>` (the model's state dict: DTensors under FSDP2) and
`optim/<parameter name>/<state key>` — optimizer state keyed by parameter name, never by
position or rank. How a state tensor is laid out under FSDP2 decides how it is saved:
- `shard0`: a moment of a row-sharded layout (a right-side m_k×r moment, the moments of
  a full-rank weight): saved as a Shard(0) DTensor of its global shape, resharded on load;
- `replicated`: the same on every rank — bases (stored whole: n×r right, m×r left), a
  left/full side's r×n / r×r moments, 0-d norms, windows: saved once (DCP dedups);
- `per_rank`: anything else that differs between ranks — the codes and scales of a
  blockwise-quantized (q8/q4) row-sharded moment, whose 256-value blocks follow the
  rank's rows: saved under `…@rank<r>` and loadable only at the same world size (a
  different one is refused with a message naming the state and the way out).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from ..optimizers.lowrank import matrix_shape
from ..projectors.base import BASIS_KEYS, low_rank_shape
from ..train.checkpoint import CheckpointError, _plain
from .wrap import unwrap

LAYOUT = "dcp"


def _dcp():
    import torch.distributed.checkpoint as dcp  # lazily: plain runs never import it
    return dcp


def _parameters(opt) -> list[tuple[torch.Tensor, dict]]:
    return [(p, group) for group in opt.param_groups for p in group["params"]]


def _sharded(opt) -> bool:
    """Whether the ranks hold different pieces (FSDP2's DTensors): DCP then plans the files
    together. Plain tensors (one process, DDP) read everything locally, without collectives
    (rank 0 alone may load an FSDP2 checkpoint into a single-process model)."""
    return any(isinstance(p, DTensor) for p, _ in _parameters(opt))


def parameter_names(model: torch.nn.Module, opt) -> list[str]:
    """The model's name of every parameter the optimizer holds, in the optimizer's order."""
    names = {id(p): name for name, p in unwrap(model).named_parameters()}
    missing = [i for i, (p, _) in enumerate(_parameters(opt)) if id(p) not in names]
    if missing:
        raise CheckpointError(f"optimizer parameter {missing[0]} is not a parameter of the model")
    return [names[id(p)] for p, _ in _parameters(opt)]


def _row_moment_shape(opt, p: torch.Tensor, group: dict) -> tuple[int, ...] | None:
    """The local shape of p's row-sharded moments (None: p's moments are not row-sharded)."""
    if not isinstance(p, DTensor):
        return None
    local = p.to_local()
    if opt.is_low_rank(p, group):
        if opt.side(p, group) != "right":
            return None  # left/full: R, N and the moments are the same on every rank
        return low_rank_shape(matrix_shape(local), group["rank"], "right")
    return tuple(local.shape)


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha1(data + str((tuple(t.shape), t.dtype)).encode()).hexdigest()


def save_state(folder: Path, model, opt, extra: dict[str, torch.Tensor]) -> dict:
    """Write model and optimizer tensors into `folder` (every rank); return what meta.json
    needs to read them back (the same on every rank)."""
    distributed = _sharded(opt)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    names = parameter_names(model, opt)
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v.detach()
                                         for k, v in unwrap(model).state_dict().items()}
    layout, scalars, candidates = {}, {}, {}
    for (p, group), name in zip(_parameters(opt), names):
        row_shape = _row_moment_shape(opt, p, group)
        for key, value in opt.state.get(p, {}).items():
            if not torch.is_tensor(value):
                scalars.setdefault(name, {})[key] = _plain(value, f"state[{name}].{key}")
                continue
            value = value.detach()
            basis = key.startswith(tuple(BASIS_KEYS.values()))
            if row_shape is not None and not basis and tuple(value.shape) == row_shape:
                whole = (p.shape[0], *value.shape[1:])
                stride = torch.empty(whole, device="meta").stride()
                tensors[f"optim/{name}/{key}"] = DTensor.from_local(
                    value.contiguous(), p.device_mesh, [Shard(0)], run_check=False, shape=whole,
                    stride=stride)
                layout[f"{name}/{key}"] = ["shard0", list(whole), str(value.dtype)]
            else:
                candidates[f"{name}/{key}"] = value
    # an entry is replicated when every rank holds the same bytes (one object all-gather)
    digests = {k: _digest(v) for k, v in candidates.items()}
    every = [digests]
    if distributed:
        every = [None] * world
        dist.all_gather_object(every, digests)
    for entry, value in candidates.items():
        same = all(d.get(entry) == digests[entry] for d in every)
        kind = "replicated" if same else "per_rank"
        tensors[f"optim/{entry}" + ("" if same else f"@rank{rank}")] = value.contiguous()
        layout[entry] = [kind, list(value.shape), str(value.dtype)]
    for key, value in extra.items():
        tensors[f"extra/{key}@rank{rank}"] = value
    writer = _dcp().HuggingFaceStorageWriter(str(folder), save_distributed=True)
    _dcp().save(tensors, storage_writer=writer, no_dist=not distributed)
    groups = opt.state_dict()["param_groups"]
    return {"layout": LAYOUT, "world_size": world, "names": names, "tensors": layout,
            "state": scalars, "extra": {k: list(v.shape) for k, v in extra.items()},
            "param_groups": [_plain(g, f"param_groups[{i}]") for i, g in enumerate(groups)]}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def load_state(folder: Path, meta: dict, model, opt) -> dict[str, torch.Tensor]:
    """Read a DCP checkpoint into `model` and `opt` at this process's world size (DTensor
    parameters: FSDP2 at any world size; plain ones: one process or DDP). Returns this
    rank's extra tensors (RNG states)."""
    distributed = _sharded(opt)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    saved = meta["optimizer"]
    names = parameter_names(model, opt)
    if sorted(names) != sorted(saved["names"]):
        extra = sorted(set(names) ^ set(saved["names"]))
        raise CheckpointError(f"{folder}: the optimizer's parameters do not match the spec "
                              f"(differ: {extra[:3]})")
    params = {name: p for (p, _), name in zip(_parameters(opt), names)}
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v
                                         for k, v in unwrap(model).state_dict().items()}
    same_world = saved["world_size"] == world
    for entry, (kind, shape, dtype) in saved["tensors"].items():
        name, key = entry.split("/", 1)
        p = params[name]
        if kind == "per_rank" and not same_world:
            raise CheckpointError(
                f"{folder}: optimizer state {name}.{key} was written per rank by "
                f"{saved['world_size']} ranks (a blockwise-quantized moment of a row-sharded "
                f"weight: its blocks follow each rank's rows); resume it on "
                f"{saved['world_size']} ranks, or train with state_format = \"fp32\" or "
                f"\"bf16\" to change the world size")
        if kind == "shard0" and isinstance(p, DTensor):
            target = torch.distributed.tensor.empty(*shape, dtype=_dtype(dtype),
                                                    device_mesh=p.device_mesh,
                                                    placements=[Shard(0)])
        else:
            target = torch.empty(shape, dtype=_dtype(dtype), device=_device(p))
        tensors[f"optim/{entry}" + (f"@rank{rank}" if kind == "per_rank" else "")] = target
    source = rank if same_world else 0   # RNG: this rank's own, else rank 0's
    extra_keys = sorted(saved["extra"])
    for key in extra_keys:  # RNG states: bytes
        tensors[f"extra/{key}@rank{source}"] = torch.empty(saved["extra"][key], dtype=torch.uint8)
    reader = _dcp().HuggingFaceStorageReader(str(folder))
    try:
        _dcp().load(tensors, storage_reader=reader, no_dist=not distributed)
    except Exception as exc:  # DCP raises many kinds; name the folder and the cause
        raise CheckpointError(f"{folder}: cannot be read at this world size ({world}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    state: dict[int, dict] = {}
    index = {name: i for i, name in enumerate(names)}
    for entry in saved["tensors"]:
        name, key = entry.split("/", 1)
        value = tensors[f"optim/{entry}" + (f"@rank{rank}" if saved["tensors"][entry][0] == "per_rank" else "")]
        state.setdefault(index[name], {})[key] = value.to_local() if isinstance(value, DTensor) else value
    for name, values in saved["state"].items():
        state.setdefault(index[name], {}).update(values)
    groups = []
    for group_meta, current in zip(saved["param_groups"], opt.param_groups):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list)
                       else v for k, v in group_meta.items()})
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"{folder}: checkpoint has {len(groups)} parameter groups, the "
                              f"optimizer {len(opt.param_groups)}")
    opt.load_state_dict({"state": state, "param_groups": groups})
    return {key: tensors[f"extra/{key}@rank{source}"] for key in extra_keys}


def _device(p: torch.Tensor) -> torch.device:
    return p.to_local().device if isinstance(p, DTensor) else p.device




def rng_states() -> dict[str, torch.Tensor]:
    """This rank's RNG states (CPU, and its CUDA device's when there is one)."""
    states = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["rng/cuda"] = torch.cuda.get_rng_state()
    return states


def load_checkpoint(folder: Path, meta: dict, model, opt, scheduler):
    """`CheckpointManager.load` for a DCP folder, in any process layout."""
    from ..train.checkpoint import Loaded
    extra = load_state(folder, meta, model, opt)
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    torch.set_rng_state(extra["rng/torch_cpu"])
    if "rng/cuda" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng/cuda"])
    return Loaded(step=int(meta["step"]), path=folder, loop=meta["loop"])


__all__ = ["LAYOUT", "load_checkpoint", "load_state", "parameter_names", "rng_states", "save_state"]
