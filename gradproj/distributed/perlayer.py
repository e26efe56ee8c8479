"""Per-layer (optimizer-in-backward) mode under DDP: each weight steps as soon as its
gradient has been averaged over the ranks, and no gradient outlives its bucket.

    model = replicate(model)                          # not DistributedDataParallel
    stepper = DDPPerLayerStepper(optimizer, grad_accum)

Why not DDP's reducer with an optimizer hook (torch's `_hook_then_optimizer` pattern):
the reducer allocates flat buckets for *every* gradient when it wraps the model and keeps
them for the whole run, so stepping inside its communication hook still leaves one full
copy of the gradients alive — per-layer mode would save nothing. Here the parameters are
broadcast from rank 0 as DDP does, and the stepper reduces gradients itself, with DDP's
bucketing:
  * buckets as DDP builds them (`bucket_assignment`, the reducer's rule): parameters in
    reverse order — the order backward produces their gradients (checked on the model
    presets; a bucket whose members arrive out of order only stays open longer) — a
    1 MiB first bucket, then 25 MiB ones, one dtype per bucket; except that a gradient
    of at least a bucket's size gets a bucket of its own, so it is never copied;
  * a post-accumulate hook copies a gradient into its bucket and frees `.grad` (a bucket
    of one weight is that gradient itself, no copy); a full bucket is divided by W and
    all-reduced asynchronously, in bucket order on every rank;
  * at most one all-reduce is in flight: launching a bucket first waits for the previous
    one, whose weights then step from views of its buffer, and frees it. The last ones
    are finished by an autograd callback at the end of backward.
Alive at any time: the bucket being filled, the one in flight and the gradient being
copied in — `grad_peak_bytes` counts exactly these (`.grad` + bucket buffers).

Gradient accumulation over k micro-batches (the first k − 1 reduce nothing, as DDP's
`no_sync`):
  * a projected weight whose residual reads R alone (`accumulates_low_rank`) sums its
    *local* projections R_i = project(G_i) and, on the last micro-batch, all-reduces that
    r×n (or m×r) sum instead of the m×n gradient: projection is linear, so the average of
    the ranks' sums is the projection of the global summed gradient. On a refresh step the
    basis is fit on the first micro-batch's gradient, as one process does
    (`train/perlayer.py`): that gradient is all-reduced first (a full-size reduction once
    per refresh) and its projection kept as the first term of the sum;
  * every other weight accumulates its full local gradient in `.grad` and is all-reduced
    and stepped on the last micro-batch.
A non-finite averaged gradient skips that weight on every rank (all ranks see the same
reduced values), and marks the step as skipped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..train.perlayer import PerLayerStepper, _nbytes

FIRST_BUCKET_BYTES = 1024 * 1024        # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
BUCKET_CAP_BYTES = 25 * 1024 * 1024     # DistributedDataParallel(bucket_cap_mb=25)
MAX_IN_FLIGHT = 1                       # all-reduces outstanding while backward goes on


def bucket_assignment(sizes: list[tuple[int, object]], limits: list[int], *,
                      large_alone: bool = False) -> list[list[int]]:
    """DDP's bucketing (the C++ reducer's compute_bucket_assignment_by_size): tensors in
    the given order, one open bucket per key (dtype), closed once it reaches its limit;
    the limits are taken in turn, the last repeating. `sizes`: (bytes, key) per tensor.
    Buckets come out ordered by their first tensor.

    `large_alone`: a tensor that reaches the limit by itself closes the open bucket and
    takes one of its own — such a bucket is the gradient itself, never copied (DDP would
    copy the 7B embedding's 262 MB gradient into a 262 MB buffer shared with a norm)."""
    open_: dict = {}
    done: list[list[int]] = []
    for i, (nbytes, key) in enumerate(sizes):
        members, size, turn = open_.get(key, ([], 0, 0))
        if large_alone and members and nbytes >= limits[min(turn, len(limits) - 1)]:
            done.append(members)
            members, size, turn = [], 0, turn + 1
        members.append(i)
        size += nbytes
        if size >= limits[min(turn, len(limits) - 1)]:
            done.append(members)
            members, size, turn = [], 0, turn + 1
        open_[key] = (members, size, turn)
    done += [members for members, _, _ in open_.values() if members]
    return sorted(done, key=min)


def replicate(model: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Every rank starts from rank 0's parameters and buffers (what DDP's constructor
    does); the model itself is returned unwrapped."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.detach(), 0, group=process_group)
    return model


@dataclass(eq=False)
class _Bucket:
    members: list          # (p, kind, offset, numel, shape)
    numel: int
    dtype: torch.dtype
    buffer: torch.Tensor | None = None
    work: object = None
    slot: dict = field(default_factory=dict)   # p -> index in members
    got: set = field(default_factory=set)      # members whose tensor is in the buffer

    @property
    def ready(self) -> bool:
        return len(self.got) == len(self.members)


class DDPPerLayerStepper(PerLayerStepper):
    """`PerLayerStepper` whose weights step on the rank-averaged gradient (module doc)."""

    def __init__(self, optimizer, grad_accum: int = 1, *, module: torch.nn.Module | None = None,
                 track_norms: bool = False, process_group=None,
                 bucket_cap_bytes: int = BUCKET_CAP_BYTES,
                 first_bucket_bytes: int = FIRST_BUCKET_BYTES):
        super().__init__(optimizer, grad_accum, track_norms=track_norms)
        self.process_group = process_group
        self.world = dist.get_world_size(process_group)
        self.limits = [first_bucket_bytes, bucket_cap_bytes]
        # the order backward produces gradients: the module's parameters reversed (the
        # optimizer's groups list them by kind, not by layer)
        ordered = [q for q in (module.parameters() if module is not None else ())
                   if q in self.group_index]
        seen = set(ordered)
        ordered += [q for q in self.group_index if q not in seen]
        self.order = list(reversed(ordered))
        self.global_low: dict[torch.Tensor, torch.Tensor] = {}  # p -> project(averaged G_1)
        self.bucket_bytes = 0        # bytes of bucket buffers alive right now
        self.bucket_peak_bytes = 0   # max of bucket_bytes since reset_peak()
        self._buckets: list[_Bucket] | None = None  # this backward's, built at its first hook
        self._bucket_of: dict[torch.Tensor, _Bucket] = {}
        self._next = 0               # the next bucket to launch
        self._in_flight: deque[_Bucket] = deque()
        self._callback_queued = False

    # -- this backward's buckets -----------------------------------------------------------
    def _members(self) -> list[tuple]:
        """(p, kind, shape, dtype) of what this micro-batch's backward reduces, in order."""
        last = self.micro == self.grad_accum - 1
        out = []
        for p in self.order:
            if p in self.bad:
                continue
            group = self.opt.param_groups[self.group_index[p]]
            if self.low_rank[p]:
                if last:  # this micro-batch's projection joins a sum that exists already
                    low = self.low_sums.get(p, self.global_low.get(p))
                    out.append((p, "low", tuple(low.shape), low.dtype))
                elif self.micro == 0 and self.opt.refresh_due(p, group):
                    out.append((p, "fit", tuple(p.shape), _grad_dtype(p)))
            elif last:
                out.append((p, "full", tuple(p.shape), _grad_dtype(p)))
        return out

    def _build_buckets(self) -> None:
        members = self._members()
        sizes = [(_numel(shape) * torch.empty((), dtype=dtype).element_size(), dtype)
                 for _, _, shape, dtype in members]
        self._buckets, self._bucket_of, self._next = [], {}, 0
        for indices in bucket_assignment(sizes, self.limits, large_alone=True):
            rows, offset = [], 0
            for i in indices:
                p, kind, shape, _ = members[i]
                rows.append((p, kind, offset, _numel(shape), shape))
                offset += _numel(shape)
            bucket = _Bucket(rows, offset, members[indices[0]][3])
            bucket.slot = {row[0]: j for j, row in enumerate(rows)}
            self._buckets.append(bucket)
            for row in rows:
                self._bucket_of[row[0]] = bucket

    # -- the hook ----------------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if p not in self.counted:
            self.held_bytes += _nbytes(p.grad)
            self.counted.add(p)
        self._track_peak()
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
        if self._buckets is None:
            self._build_buckets()
        last = self.micro == self.grad_accum - 1
        bucket = self._bucket_of.get(p)
        if p in self.bad:
            self._release(p)
        elif self.low_rank[p] and not (bucket and bucket.members[bucket.slot[p]][1] == "fit"):
            low = self.opt.project_grad(p, p.grad, self.opt.param_groups[self.group_index[p]])
            self._release(p)
            total = self.low_sums.get(p)
            total = low if total is None else total.add_(low)
            self.low_sums[p] = total
            self.accum_peak_bytes = max(self.accum_peak_bytes,
                                        sum(_nbytes(t) for t in self.low_sums.values()))
            if last:
                self._put(p, self.low_sums.pop(p), bucket)
        elif bucket is not None:  # "fit" (first micro-batch) or "full" (last)
            self._put(p, p.grad, bucket)
            self._release(p)
        self._track_peak()

    def _put(self, p: torch.Tensor, tensor: torch.Tensor, bucket: _Bucket) -> None:
        _, _, offset, numel, _ = bucket.members[bucket.slot[p]]
        if tensor.numel() != numel:
            raise RuntimeError(f"per-layer DDP: a {tuple(tensor.shape)} tensor arrived for a "
                               f"{numel}-value slot of its bucket")
        if bucket.buffer is None:
            if len(bucket.members) == 1 and tensor.is_contiguous():
                bucket.buffer = tensor.detach().view(-1)  # the gradient itself: no copy
                self.bucket_bytes += _nbytes(bucket.buffer)  # and no longer a .grad (below)
            else:
                bucket.buffer = torch.empty(bucket.numel, dtype=bucket.dtype, device=tensor.device)
                self.bucket_bytes += _nbytes(bucket.buffer)
                self._track_peak()  # the gradient and the new buffer are both alive here
        if bucket.buffer.data_ptr() != tensor.data_ptr():
            bucket.buffer[offset:offset + numel].copy_(tensor.reshape(-1))
        bucket.got.add(p)
        if bucket.ready:
            self._launch_ready()

    def _track_peak(self) -> None:
        self.grad_peak_bytes = max(self.grad_peak_bytes, self.held_bytes + self.bucket_bytes)
        self.bucket_peak_bytes = max(self.bucket_peak_bytes, self.bucket_bytes)

    # -- reduction and the steps ---------------------------------------------------------
    def _launch_ready(self) -> None:
        while self._next < len(self._buckets) and self._buckets[self._next].ready:
            bucket = self._buckets[self._next]
            self._next += 1
            bucket.buffer.div_(self.world)  # DDP's averaging: divide, then sum
            bucket.work = dist.all_reduce(bucket.buffer, group=self.process_group, async_op=True)
            self._in_flight.append(bucket)
            while len(self._in_flight) > MAX_IN_FLIGHT:
                self._finish(self._in_flight.popleft())

    def _finish(self, bucket: _Bucket) -> None:
        bucket.work.wait()
        for p, kind, offset, numel, shape in bucket.members:
            group = self.opt.param_groups[self.group_index[p]]
            reduced = bucket.buffer[offset:offset + numel].view(shape)
            if not torch.isfinite(reduced).all():  # the same verdict on every rank
                self.bad.add(p)
                self.global_low.pop(p, None)
                if self.track_norms:
                    self.norms[p] = torch.tensor(float("nan"))
            elif kind == "fit":  # fits the basis on the averaged G_1, as one process does
                self.global_low[p] = self.opt.project_grad(p, reduced, group)
            elif kind == "full":
                if self.track_norms:
                    self.norms[p] = torch.linalg.vector_norm(reduced)
                self.opt.step_param(p, group, grad=reduced)
            else:
                first = self.global_low.pop(p, None)
                total = reduced if first is None else first + reduced
                if self.track_norms:
                    self.norms[p] = torch.linalg.vector_norm(total)
                self.opt.step_param(p, group, low_grad=total)
        self.bucket_bytes -= _nbytes(bucket.buffer)
        bucket.buffer = bucket.work = None

    @torch.no_grad()
    def _end_of_backward(self) -> None:
        self._callback_queued = False
        buckets, self._buckets = self._buckets or [], None
        missing = [p for b in buckets for p, *_ in b.members if p not in b.got]
        try:
            if missing:
                raise RuntimeError(f"per-layer DDP: {len(missing)} trained parameter(s) of "
                                   f"shape {tuple(missing[0].shape)}… got no gradient in this "
                                   f"backward; every trained parameter must be used")
            while self._in_flight:
                self._finish(self._in_flight.popleft())
        finally:
            self._in_flight.clear()
            self._bucket_of = {}

    # -- step bookkeeping ------------------------------------------------------------------
    def reset_peak(self) -> None:
        super().reset_peak()
        self.grad_peak_bytes = self.held_bytes + self.bucket_bytes
        self.bucket_peak_bytes = self.bucket_bytes

    def abort(self) -> None:
        super().abort()
        self.global_low.clear()

    def end_step(self) -> bool:
        if self._in_flight or self._buckets:
            raise RuntimeError("per-layer DDP: the step ended with gradients still being reduced")
        return super().end_step()


def _grad_dtype(p: torch.Tensor) -> torch.dtype:
    return getattr(p, "grad_dtype", None) or p.dtype  # fp32 for INT8 QuantLinear weights


def _numel(shape) -> int:
    return torch.Size(shape).numel()


__all__ = ["BUCKET_CAP_BYTES", "FIRST_BUCKET_BYTES", "DDPPerLayerStepper", "bucket_assignment",
           "replicate"]
