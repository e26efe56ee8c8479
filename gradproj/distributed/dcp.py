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
- `blocked`: a moment a format stores in parts under its key prefix (q8/q4 codes and
  per-256-value absmax of a row-sharded moment: the blocks follow the rank's rows):
  saved per rank (`…@rank<r>`, every rank's shape in meta.json). The same world size
  reads its own parts back (bit-exact); another dequantizes every writer's blocks with
  the format, joins the rows and stores this rank's rows as a fresh run would (codes in
  its own blocks, or fp32 below the 4096-value threshold) — `_requantize`;
- `per_rank`: anything else that differs between ranks (none of gradproj's own state):
  the same world size only, another is refused with a message.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

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


def _in_blocks(key: str, stored: set[str]) -> bool:
    """Whether `key` is part of a moment a format stores in parts under its key prefix
    (`formats/base.py`: "exp_avg.codes", "exp_avg.absmax" of moment "exp_avg")."""
    moment = key.split(".")[0]
    return any(k != moment and k.startswith(moment + ".") for k in stored)


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
    layout, scalars, candidates, blocked = {}, {}, {}, {}
    for (p, group), name in zip(_parameters(opt), names):
        row_shape = _row_moment_shape(opt, p, group)
        entries = opt.state.get(p, {})
        stored = {key for key, v in entries.items() if torch.is_tensor(v)}
        for key, value in entries.items():
            if not torch.is_tensor(value):
                scalars.setdefault(name, {})[key] = _plain(value, f"state[{name}].{key}")
                continue
            value = value.detach()
            basis = key.startswith(tuple(BASIS_KEYS.values()))
            if row_shape is not None and not basis and _in_blocks(key, stored):
                blocked[f"{name}/{key}"] = value  # a format's blocks over this rank's rows
            elif row_shape is not None and not basis and tuple(value.shape) == row_shape:
                whole = (p.shape[0], *value.shape[1:])
                stride = torch.empty(whole, device="meta").stride()
                tensors[f"optim/{name}/{key}"] = DTensor.from_local(
                    value.contiguous(), p.device_mesh, [Shard(0)], run_check=False, shape=whole,
                    stride=stride)
                layout[f"{name}/{key}"] = ["shard0", list(whole), str(value.dtype)]
            else:
                candidates[f"{name}/{key}"] = value
    # an entry is replicated when every rank holds the same bytes; blocked entries keep
    # every rank's shape (one object all-gather for both)
    mine = ({k: _digest(v) for k, v in candidates.items()},
            {k: list(v.shape) for k, v in blocked.items()})
    every = [mine]
    if distributed:
        every = [None] * world
        dist.all_gather_object(every, mine)
    for entry, value in candidates.items():
        same = all(d.get(entry) == mine[0][entry] for d, _ in every)
        kind = "replicated" if same else "per_rank"
        tensors[f"optim/{entry}" + ("" if same else f"@rank{rank}")] = value.contiguous()
        layout[entry] = [kind, list(value.shape), str(value.dtype)]
    for entry, value in blocked.items():
        tensors[f"optim/{entry}@rank{rank}"] = value.contiguous()
        layout[entry] = ["blocked", [shapes[entry] for _, shapes in every], str(value.dtype)]
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
            raise CheckpointError(f"{folder}: optimizer state {name}.{key} differs between the "
                                  f"{saved['world_size']} ranks that wrote it; resume it on "
                                  f"{saved['world_size']} ranks")
        if kind == "blocked":  # same world: this rank's blocks; else every writer's
            for j in [rank] if same_world else range(saved["world_size"]):
                tensors[f"optim/{entry}@rank{j}"] = torch.empty(shape[j], dtype=_dtype(dtype),
                                                                device=_device(p))
            continue
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
        with warnings.catch_warnings():  # "assuming ... a single process": we said so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            _dcp().load(tensors, storage_reader=reader, no_dist=not distributed)
    except Exception as exc:  # DCP raises many kinds; name the folder and the cause
        raise CheckpointError(f"{folder}: cannot be read at this world size ({world}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    state: dict[int, dict] = {}
    index = {name: i for i, name in enumerate(names)}
    rebuild: dict[str, set[str]] = {}
    for entry, (kind, _, _) in saved["tensors"].items():
        name, key = entry.split("/", 1)
        if kind == "blocked" and not same_world:
            rebuild.setdefault(name, set()).add(key.split(".")[0])
            continue
        mine = "@rank{}".format(rank) if kind in ("per_rank", "blocked") else ""
        value = tensors[f"optim/{entry}{mine}"]
        state.setdefault(index[name], {})[key] = value.to_local() if isinstance(value, DTensor) else value
    for name, values in saved["state"].items():
        state.setdefault(index[name], {}).update(values)
    for name, moments in rebuild.items():
        p, group = _parameters(opt)[index[name]]
        for moment in sorted(moments):
            _requantize(state[index[name]], moment, name, p, opt.plugins(group)[2], saved, tensors)
    groups = []
    for group_meta, current in zip(saved["param_groups"], opt.param_groups):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list)
                       else v for k, v in group_meta.items()})
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"{folder}: checkpoint has {len(groups)} parameter groups, the "
                              f"optimizer {len(opt.param_groups)}")
    opt.load_state_dict({"state": state, "param_groups": groups})
    return {key: tensors[f"extra/{key}@rank{source}"] for key in extra_keys}


def _requantize(target: dict, moment: str, name: str, p, fmt, saved: dict, tensors: dict) -> None:
    """Rebuild a blockwise-stored row-sharded moment at this world size: dequantize every
    writer's blocks with the format (`fmt.read`), join the rows, take this rank's rows
    and store them as a fresh run here would (`fmt.zeros` decides codes or fp32 by the
    local size, `fmt.write` quantizes in this rank's blocks). Exact for fp32 values; the
    codes themselves change by at most one quantization step of the new blocks."""
    scalars = saved["state"].get(name, {})
    parts = []
    for j in range(saved["world_size"]):
        part = dict(scalars)
        for entry, (kind, _, _) in saved["tensors"].items():
            owner, key = entry.split("/", 1)
            if owner == name and kind == "blocked" and key.split(".")[0] == moment:
                part[key] = tensors[f"optim/{entry}@rank{j}"]
        parts.append(fmt.read(part, moment))
    whole = torch.cat(parts)
    if isinstance(p, DTensor):
        local, offset = compute_local_shape_and_global_offset(tuple(whole.shape), p.device_mesh,
                                                              [Shard(0)])
        whole = whole[offset[0]: offset[0] + local[0]]
    for key in [k for k in target if k.split(".")[0] == moment]:
        del target[key]
    fmt.zeros(target, moment, tuple(whole.shape), whole.device,
              scalars.get(f"{moment}.signed", True))
    fmt.write(target, moment, whole.contiguous())


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
