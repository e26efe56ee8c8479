"""`welore`: WeLore's one-shot, data-free compression, and fine-tuning of its low-rank parts.

Every targeted matrix gets the rank its normalised singular-value spectrum supports under one
global threshold, searched so the targeted matrices lose `ratio` of their parameters
(`welore_rank.py` has the math and its reading of the reference code). Low-rank components
(LRCs) become `WeLoreLinear` factors B (m×k) · A (k×n), trained; the other matrices (N-LRCs)
keep their dense weight, frozen. With `train_rest = false` (default) every parameter
outside the targeted layers is frozen too, so fine-tuning trains only the factors.

Two ways in:
  * `compressed = ""`: compress the weights the model holds when the parametrization is
    applied (Python: `gp.apply_parametrization(trained_model, {"kind": "welore"}, names)`);
  * `compressed = "PATH"`: the model *is* the checkpoint `gradproj compress SPEC --ratio r`
    wrote (safetensors: the converted model's state dict; the kept ranks in its metadata).
    Layers are built with those ranks and every tensor of the model — factors, frozen
    matrices, embeddings, norms — is loaded from it. On the meta device (the planner) only
    the ranks are read.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import PARAMETRIZATIONS
from . import welore_rank
from .base import Parametrization, ParametrizedLinear

FORMAT = "gradproj-welore-1"   # metadata "format" of a compressed checkpoint


class WeLoreLinear(ParametrizedLinear):
    """A WeLore layer: factors B·A (an LRC, trained) or its dense weight (an N-LRC, frozen)."""

    def __init__(self, in_features: int, out_features: int, kept: int | None, *, bias: bool,
                 dtype: torch.dtype, device=None, project_factors: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.kept = in_features, out_features, kept
        empty = dict(dtype=dtype, device=device)
        if kept is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **empty),
                                       requires_grad=False)
            self.projected = ()
        else:
            self.B = nn.Parameter(torch.empty(out_features, kept, **empty))
            self.A = nn.Parameter(torch.empty(kept, in_features, **empty))
            # the reference fine-tunes the factors with AdamW; GaLore on them on request
            self.projected = ("B", "A") if project_factors else ()
        self.bias = nn.Parameter(torch.empty(out_features, **empty)) if bias else None

    @property
    def low_rank(self) -> bool:
        return self.kept is not None

    def dense_weight(self) -> torch.Tensor:
        return self.B @ self.A if self.low_rank else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_rank:  # x·Aᵀ·Bᵀ: k(m + n) multiply-adds per token instead of m·n
            return F.linear(F.linear(x, self.A), self.B, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        form = f"rank {self.kept} factors (trained)" if self.low_rank else "dense (frozen)"
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}"


def read_ranks(path: str | Path) -> dict:
    """The metadata of a compressed checkpoint: {"ranks": {module: k or None}, ...}."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"option 'compressed' must name a file written by `gradproj compress`, "
                         f"got {str(path)!r} (no such file)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"option 'compressed': {path} is not a safetensors file "
                         f"({type(exc).__name__})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"option 'compressed': {path} was not written by `gradproj compress` "
                         f"(metadata format {meta.get('format')!r}, expected {FORMAT!r})")
    info = json.loads(meta["welore"])
    info["ranks"] = {k: (None if v == 0 else int(v)) for k, v in info["ranks"].items()}
    return info


@PARAMETRIZATIONS.register("welore")
class WeLore(Parametrization):
    """WeLore (Jaiswal et al. 2024): per-matrix ranks from the spectrum, one global threshold; factors trained."""

    defaults = {
        "ratio": 0.5,            # share of the targeted matrices' parameters removed
        "min_ratio": welore_rank.MIN_RATIO,  # an LRC drops more than this share of its rank
        "compressed": "",        # a `gradproj compress` checkpoint to start from ("" = compress now)
        "train_rest": False,     # train embeddings, norms, head, biases too (default: factors only)
        "project_factors": False,  # GaLore-project the factors' gradients (reference: AdamW)
    }

    def validate(self) -> None:
        ratio = self.options["ratio"]
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
            raise ValueError(f"option 'ratio' must be a number in (0, 1), got {ratio!r}")
        self._number("min_ratio", 0.0, 1.0, open_lo=False)
        for key in ("train_rest", "project_factors"):
            if not isinstance(self.options[key], bool):
                raise ValueError(f"option '{key}' must be true or false, got {self.options[key]!r}")
        if not isinstance(self.options["compressed"], str):
            raise ValueError(f"option 'compressed' must be a path (string), got "
                             f"{self.options['compressed']!r}")

    def __init__(self, **options):
        super().__init__(**options)
        self.names: list[str] = []                 # targeted modules, in `index` order
        self.ranks: dict[str, int | None] = {}     # kept rank per module; None: N-LRC
        self.info: dict = {}                       # threshold, compression, ... (metadata)

    # -- the global decision -----------------------------------------------------------
    def prepare(self, model: nn.Module, module_names: Sequence[str]) -> None:
        self.names = list(module_names)
        linears = {n: model.get_submodule(n) for n in self.names}
        meta = any(m.weight.is_meta for m in linears.values())
        path = self.options["compressed"]
        if path:
            self.info = read_ranks(path)
            wanted, saved = set(self.names), set(self.info["ranks"])
            if wanted != saved:
                extra = sorted(wanted - saved) or sorted(saved - wanted)
                raise ValueError(f"option 'compressed': {path} does not match the model's "
                                 f"targeted layers (e.g. {extra[0]!r}); compress with the same "
                                 f"[model] and targets")
            self.ranks = dict(self.info["ranks"])
            if not meta:
                self._load_others(model, path)
        else:
            if meta:
                raise ValueError("option 'compressed' must name a `gradproj compress` checkpoint "
                                 "when the model has no weights yet (the memory planner builds "
                                 "it on the meta device)")
            weights = {n: m.weight for n, m in linears.items()}
            shapes = {n: tuple(w.shape) for n, w in weights.items()}
            threshold, choices = welore_rank.search_threshold(
                welore_rank.spectra(weights), shapes, self.options["ratio"],
                self.options["min_ratio"])
            self.ranks = {n: c.kept if c.low_rank else None for n, c in choices.items()}
            self.info = {"threshold": threshold, "ratio": self.options["ratio"],
                         "min_ratio": self.options["min_ratio"],
                         "compression": welore_rank.compression(choices)}

    def _load_others(self, model: nn.Module, path: str) -> None:
        """Every tensor of the model outside the targeted layers, from the checkpoint."""
        from safetensors import safe_open
        targeted = tuple(f"{n}." for n in self.names)
        with torch.no_grad(), safe_open(path, "pt") as f:
            keys = set(f.keys())
            for name, t in model.state_dict().items():
                if name.startswith(targeted):
                    continue
                if name not in keys:
                    raise ValueError(f"option 'compressed': {path} has no tensor {name!r}; "
                                     f"compress with the same [model]")
                t.copy_(f.get_tensor(name))

    def freezes_rest(self) -> bool:
        return not self.options["train_rest"]

    # -- one layer -----------------------------------------------------------------------
    def convert(self, linear: nn.Linear, index: int) -> WeLoreLinear:
        name = self.names[index]
        w = linear.weight
        layer = WeLoreLinear(linear.in_features, linear.out_features, self.ranks[name],
                             bias=linear.bias is not None, dtype=w.dtype, device=w.device,
                             project_factors=self.options["project_factors"])
        if w.is_meta:
            return layer
        with torch.no_grad():
            path = self.options["compressed"]
            if path:
                from safetensors import safe_open
                with safe_open(path, "pt") as f:
                    for local, t in layer.state_dict().items():
                        t.copy_(f.get_tensor(f"{name}.{local}"))
            elif layer.low_rank:
                b, a = welore_rank.factorize(w, layer.kept)
                layer.B.copy_(b)
                layer.A.copy_(a)
            else:
                layer.weight.copy_(w)
            if linear.bias is not None and not path:
                layer.bias.copy_(linear.bias)
        if layer.bias is not None:
            layer.bias.requires_grad_(self.options["train_rest"])
        return layer


def compressed_metadata(param: WeLore) -> dict[str, str]:
    """safetensors metadata of a compressed checkpoint (`gradproj compress`)."""
    info = {**param.info, "ranks": {n: (k or 0) for n, k in param.ranks.items()}}
    return {"format": FORMAT, "welore": json.dumps(info, sort_keys=True)}


__all__ = ["FORMAT", "WeLore", "WeLoreLinear", "compressed_metadata", "read_ranks"]
