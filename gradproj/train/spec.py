"""The TOML run spec: frozen, keyword-only dataclasses, checked in full before a run starts.

    spec = load_spec("examples/tiny.toml", overrides=["train.steps=50"])

Every value is type- and range-checked; plugin names are checked against the registries
as they are at load time (so a plugin registered later is accepted with no change here);
optimizer options a rule or residual declares in its `defaults` pass through; the
optimizer's own validation runs on a 4×4 dummy weight so a bad plugin option is caught
before the model is built. All problems are collected into one SpecError.

Paths under [data] are relative to the spec file; [checkpoint].dir is relative to the
working directory. The resolved spec (every default filled in, absolute paths, the
optimizer's effective options) is what `write_resolved` saves into the run folder.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import RESIDUALS, RULES  # noqa: F401  (importing gradproj registers built-ins)
from .checks import (Issue, SpecError, boolean, choice, did_you_mean, integer, number,
                     spec_field, string, string_list)
from .loggers import BACKENDS, missing_package
from .hfmodel import HFModelSpec
from .model import MODEL_PRESETS, ModelConfig, model_config
from .spec_hf import check_hf_model, tokenizer_vocab
from .tokenizer import BYTES
from .optspec import OptimizerSpec, parse_optimizer
from ..parametrizations import create_parametrization
from .paramspec import TABLE as PARAM_TABLE, parse_parametrization
from .spec_gradient import ZO_KEYS, check_curvature, check_zeroth_order, int8_weights
from .tomlio import apply_overrides, dump_toml, parse_override, read_toml

TABLES = ("model", "data", "optimizer", "train", "checkpoint", "log")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    preset: str = spec_field("tiny", choice(*MODEL_PRESETS), "shape preset; keys below override it")
    vocab_size: int | None = spec_field(None, integer(2), "vocabulary (256 for byte-level data)")
    dim: int | None = spec_field(None, integer(2), "hidden size")
    n_layers: int | None = spec_field(None, integer(1), "decoder blocks")
    n_heads: int | None = spec_field(None, integer(1), "attention heads")
    n_kv_heads: int | None = spec_field(None, integer(1), "key/value heads (GQA)")
    ffn_dim: int | None = spec_field(None, integer(1), "SwiGLU hidden size")
    max_seq_len: int | None = spec_field(None, integer(1), "rotary table length; default seq_len")
    tie_embeddings: bool | None = spec_field(None, boolean(), "share embedding and head")
    norm_eps: float | None = spec_field(None, number(0, lo_open=True), "RMSNorm epsilon")
    rope_theta: float | None = spec_field(None, number(0, lo_open=True), "rotary base")
    init_std: float | None = spec_field(None, number(0, lo_open=True), "init std")
    hf_config: str | None = spec_field(None, string(), "transformers config.json (random init; "
                                       "replaces preset and shape keys)")
    hf_pretrained: str | None = spec_field(None, string(), "local folder with config.json and "
                                           "*.safetensors (fine-tuning)")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    source: str = spec_field("embedded", choice("embedded", "text", "jsonl", "tokens"),
                             "embedded stdlib text | text files | jsonl | .bin token memmap")
    path: str | None = spec_field(None, string(), "file or folder (text, jsonl, tokens)")
    eval_path: str | None = spec_field(None, string(), "held-out .bin (tokens); else a tail split")
    glob: str = spec_field("**/*.txt", string(), "files read from a text folder")
    text_key: str = spec_field("text", string(), "JSONL field holding the text")
    tokenizer: str = spec_field("bytes", string(), "\"bytes\" or a local tokenizer.json (HF "
                                "tokenizers); the model's vocab_size follows it")
    dtype: str = spec_field("uint16", choice("uint16", "uint32"), "token dtype of .bin files")
    seq_len: int = spec_field(128, integer(2), "tokens per training sequence")
    eval_fraction: float = spec_field(0.05, number(0, 0.5, lo_open=True),
                                      "held-out tail share when no eval split exists")


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    steps: int = spec_field(500, integer(1), "optimizer steps")
    batch_size: int = spec_field(16, integer(1), "sequences per micro-batch (global: split over ranks)")
    grad_accum: int = spec_field(1, integer(1), "micro-batches per optimizer step")
    per_layer: bool = spec_field(False, boolean(), "optimizer in backward, one layer's gradient")
    parallel: str = spec_field("none", choice("none", "ddp", "fsdp2"),
                               "none | ddp | fsdp2; launch with torchrun --nproc_per_node=N")
    seed: int = spec_field(0, integer(0), "init, data order and projector seeds")
    lr_schedule: str = spec_field("cosine", choice("cosine", "linear", "constant"),
                                  "after warmup: decay to min_lr_ratio·lr")
    warmup_steps: int = spec_field(0, integer(0), "linear warmup from 0")
    warmup: float | None = spec_field(None, number(0, 0.99),
                                      "warmup as a fraction of the steps (0.1 = GaLore's 10 %)")
    min_lr_ratio: float = spec_field(0.1, number(0, 1), "final lr / peak lr (GaLore: 0.1)")
    grad_clip: float = spec_field(0.0, number(0), "global gradient-norm clip; 0 = off")
    dtype: str = spec_field("float32", choice("float32", "bfloat16"),
                            "weight storage dtype (bfloat16: the papers' pure-BF16 training)")
    autocast: str = spec_field("none", choice("none", "bf16"), "mixed-precision forward")
    activation_checkpointing: bool = spec_field(False, boolean(), "recompute blocks in backward")
    max_bad_steps: int = spec_field(5, integer(1), "stop after this many non-finite steps in a row")
    eval_every: int = spec_field(0, integer(0), "steps between evals; 0 = only at the end")
    eval_batches: int = spec_field(8, integer(1), "held-out batches per eval")
    device: str = spec_field("cpu", choice("cpu", "cuda", "auto"), "where to train")
    threads: int = spec_field(0, integer(0), "torch CPU threads; 0 = torch's default")
    gradient: str = spec_field("backprop", choice("backprop", "zeroth-order"),
                               "backprop | zeroth-order (MeZO: SPSA from two forwards, no backward)")
    zo_eps: float = spec_field(1e-3, number(0, lo_open=True),
                               "zeroth-order: perturbation scale ε (MeZO's 1e-3)")
    zo_perturbations: int = spec_field(1, integer(1), "zeroth-order: SPSA perturbations per step")
    zo_subspace: bool = spec_field(False, boolean(), "zeroth-order: perturb projected weights in "
                                   "their optimizer basis, z = P·z_low")


@dataclass(frozen=True, kw_only=True)
class CheckpointSpec:
    dir: str = spec_field("runs/run", string(), "run folder (spec, metrics, plot, checkpoints)")
    every: int = spec_field(100, integer(0), "steps between checkpoints; 0 = only the last")
    keep_last: int = spec_field(2, integer(1), "complete checkpoints kept")


@dataclass(frozen=True, kw_only=True)
class LogSpec:
    every: int = spec_field(10, integer(1), "steps between metric records")
    progress: bool = spec_field(True, boolean(), "progress bar on stderr")
    plot: bool = spec_field(True, boolean(), "loss-curve PNG at the end")
    backends: tuple[str, ...] = spec_field(("jsonl",), string_list(),
                                           "metric sinks: jsonl (always), tensorboard, wandb (offline)")


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    source: str
    model: ModelConfig | HFModelSpec
    model_preset: str   # "hf" for hf_config / hf_pretrained
    data: DataSpec
    optimizer: OptimizerSpec
    train: TrainSpec
    checkpoint: CheckpointSpec
    log: LogSpec
    notices: tuple[Issue, ...] = ()  # one line each, printed before the run ("notice: ...")

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoint.dir)

    def resolved(self) -> dict:
        """Nested plain dict of every setting: the TOML saved into the run folder."""
        if isinstance(self.model, HFModelSpec):
            key = "hf_pretrained" if self.model.pretrained else "hf_config"
            model = {key: self.model.pretrained or self.model.config,
                     "vocab_size": self.model.vocab_size}
        else:
            model = {"preset": self.model_preset, **asdict(self.model)}
            if model["n_kv_heads"] is None:
                model["n_kv_heads"] = self.model.kv_heads
        if self.optimizer.parametrization:
            model["parametrization"] = dict(self.optimizer.parametrization)
        data = {k: v for k, v in asdict(self.data).items() if v is not None}
        return {"model": model, "data": data, "optimizer": self.optimizer.resolved(),
                "train": {k: v for k, v in asdict(self.train).items() if v is not None
                          and (k not in ZO_KEYS or self.train.gradient == "zeroth-order")},
                "checkpoint": asdict(self.checkpoint),
                "log": {**asdict(self.log), "backends": list(self.log.backends)}}


class _Collector:
    """Gathers issues; names a place `[table].key`, marking values that came from --set."""

    def __init__(self, overridden: set[tuple[str, ...]]):
        self.issues: list[Issue] = []
        self.notices: list[Issue] = []  # not errors: a value adjusted, said in one line
        self.overridden = overridden

    def place(self, table: str, key: str | None = None) -> str:
        where = f"[{table}]" + (f".{key}" if key else "")
        dotted = tuple(table.split(".")) + ((key,) if key else ())
        return where + (f" (from --set {'.'.join(dotted)})" if dotted in self.overridden else "")

    def add(self, table: str, key: str | None, message: str) -> None:
        self.issues.append(Issue(self.place(table, key), message))


def parse_table(cls, table: str, raw: Any, out: _Collector) -> dict:
    """Check `raw` against the dataclass `cls`'s fields; returns the valid values."""
    if not isinstance(raw, dict):
        out.add(table, None, f"expected a table, got {type(raw).__name__}")
        return {}
    known = {f.name: f for f in fields(cls) if "check" in f.metadata}
    values = {}
    for key, value in raw.items():
        if key not in known:
            out.add(table, key, f"unknown key{did_you_mean(key, known)} "
                                f"(expected one of: {', '.join(known)})")
            continue
        converted, problem = known[key].metadata["check"](value)
        if problem:
            out.add(table, key, problem)
        else:
            values[key] = converted
    return values


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def spec_from_dict(raw: dict, source: str = "<spec>", base_dir: Path | None = None,
                   overridden: Iterable[tuple[str, ...]] = ()) -> RunSpec:
    """Build and check a RunSpec from parsed TOML; raises SpecError listing every problem."""
    out = _Collector(set(overridden))
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    for key in raw:
        if key not in TABLES:
            out.add(key, None, f"unknown table{did_you_mean(key, TABLES)} "
                               f"(expected one of: {', '.join(TABLES)})")
    raw_model = raw.get("model", {})
    raw_param = None
    if isinstance(raw_model, dict) and "parametrization" in raw_model:
        raw_model = dict(raw_model)
        raw_param = raw_model.pop("parametrization")
        raw = {**raw, "model": raw_model}
    parsed = {name: parse_table(cls, name, raw.get(name, {}), out) for name, cls in
              (("model", ModelSpec), ("data", DataSpec), ("train", TrainSpec),
               ("checkpoint", CheckpointSpec), ("log", LogSpec))}
    train = {**_defaults(TrainSpec), **parsed["train"]}
    optimizer = parse_optimizer(raw.get("optimizer", {}), out, seed=train["seed"])
    if raw_param is not None:
        table = parse_parametrization(raw_param, out)
        if table is not None and optimizer.effective.get("quantize_weights", False):
            try:  # q-galore's INT8 weights: the kind's INT8 variant (sltrain), or refused
                create_parametrization(table).with_int8_weights(
                    optimizer.effective.get("weight_group_size", 256))
            except ValueError:
                out.add(PARAM_TABLE, "kind", f"{table['kind']!r} cannot be combined with "
                        f"quantize_weights = true (INT8 weights; the q-galore preset sets it): "
                        f"set [optimizer].quantize_weights = false, or kind = 'int8' (or "
                        f"'sltrain', which has an INT8 variant)")
        optimizer = replace(optimizer, parametrization=table)

    data = {**_defaults(DataSpec), **parsed["data"]}
    for key in ("path", "eval_path"):
        if data.get(key) is not None:
            data[key] = str((base_dir / data[key]).expanduser().resolve())
    if data["tokenizer"] != BYTES:
        data["tokenizer"] = str((base_dir / data["tokenizer"]).expanduser().resolve())
    _check_data(data, parsed["data"], out)
    token_vocab = tokenizer_vocab(data, parsed["data"], out)

    model_values = parsed["model"]
    if "hf_config" in model_values or "hf_pretrained" in model_values:
        preset = "hf"
        model = check_hf_model(model_values, data, token_vocab, base_dir, out)
        if train["parallel"] == "fsdp2":
            out.add("train", "parallel", "expected 'none' or 'ddp' with a transformers model "
                                         "(fsdp2 shards the built-in LLaMA's blocks), got 'fsdp2'")
    else:
        preset = model_values.pop("preset", "tiny")
        if "max_seq_len" not in model_values:
            model_values["max_seq_len"] = max(data["seq_len"], MODEL_PRESETS[preset].max_seq_len)
        if token_vocab and "vocab_size" not in model_values:
            model_values["vocab_size"] = token_vocab  # the model's vocabulary follows the tokenizer's
        model = _check_model(preset, model_values, data, out)
        if token_vocab and model.vocab_size < token_vocab:
            out.add("model", "vocab_size", f"expected >= the tokenizer's {token_vocab} ids, "
                                           f"got {model.vocab_size}")

    _check_train(train, parsed["train"], out)
    check_curvature(optimizer.effective, train, out, int8_weights(optimizer))
    if int8_weights(optimizer) and train["parallel"] == "fsdp2":
        out.add("train", "parallel", "expected 'none' or 'ddp' with INT8 weights (quantize_weights, "
                "or [model.parametrization] kind = 'int8' / int8 = true: FSDP2 cannot shard "
                "int8 weights that take fp32 gradients), got 'fsdp2'")
    check_zeroth_order(train, parsed["train"], optimizer, out)
    _check_log(parsed["log"], out)
    width = model.width if isinstance(model, HFModelSpec) else model.dim
    optimizer = optimizer.with_width(width)
    ckpt = {**_defaults(CheckpointSpec), **parsed["checkpoint"]}
    ckpt["dir"] = str(Path(ckpt["dir"]).expanduser().resolve())
    if out.issues:
        raise SpecError(source, out.issues)
    return RunSpec(source=source, notices=tuple(out.notices), model=model, model_preset=preset,
                   data=DataSpec(**data),
                   optimizer=optimizer, train=TrainSpec(**train),
                   checkpoint=CheckpointSpec(**ckpt), log=LogSpec(**{**_defaults(LogSpec),
                                                                     **parsed["log"]}))


def _check_data(data: dict, given: dict, out: _Collector) -> None:
    source = data["source"]
    if source == "embedded":
        for key in ("path", "eval_path"):
            if key in given:
                out.add("data", key, f"is only read when source is 'text', 'jsonl' or 'tokens', "
                                     f"got source {source!r}")
        return
    if data.get("path") is None:
        out.add("data", "path", f"expected a file or folder path for source {source!r}, got nothing")
    elif source in ("jsonl", "tokens") and not Path(data["path"]).is_file():
        out.add("data", "path", f"expected an existing file, got {given['path']!r} "
                                f"(no such file: {data['path']})")
    elif source == "text" and not Path(data["path"]).exists():
        out.add("data", "path", f"expected an existing file or folder, got {given['path']!r} "
                                f"(not found: {data['path']})")
    if data.get("eval_path") is not None:
        if source != "tokens":
            out.add("data", "eval_path", f"is only read when source is 'tokens', got {source!r}")
        elif not Path(data["eval_path"]).is_file():
            out.add("data", "eval_path", f"expected an existing file, got {given['eval_path']!r}")


def _check_model(preset: str, values: dict, data: dict, out: _Collector) -> ModelConfig:
    cfg = model_config(preset, **values)
    if cfg.dim % cfg.n_heads or cfg.head_dim % 2:
        out.add("model", "n_heads", f"expected a divisor of dim {cfg.dim} giving an even head "
                                    f"size, got {cfg.n_heads}")
    elif cfg.n_heads % cfg.kv_heads:
        out.add("model", "n_kv_heads", f"expected a divisor of n_heads {cfg.n_heads}, "
                                       f"got {cfg.n_kv_heads}")
    if cfg.max_seq_len < data["seq_len"]:
        out.add("model", "max_seq_len", f"expected >= [data].seq_len {data['seq_len']}, "
                                        f"got {cfg.max_seq_len}")
    if data["source"] != "tokens" and data["tokenizer"] == BYTES and cfg.vocab_size < 256:
        out.add("model", "vocab_size", f"expected >= 256 for byte-level {data['source']!r} data, "
                                       f"got {cfg.vocab_size}")
    return cfg


def _check_log(given: dict, out: _Collector) -> None:
    backends = given.get("backends", ("jsonl",))
    for name in backends:
        if name not in BACKENDS:
            out.add("log", "backends", f"expected names from {', '.join(BACKENDS)}, got "
                                       f"{name!r}{did_you_mean(name, BACKENDS)}")
        elif missing_package(name):
            out.add("log", "backends", f"{name!r} needs its package here: {missing_package(name)}")
    if "jsonl" not in backends:
        out.add("log", "backends", f"expected 'jsonl' among {list(backends)} (metrics.jsonl is "
                                   f"the run's record: plots and resume read it)")


def _check_train(train: dict, given: dict, out: _Collector) -> None:
    if train["per_layer"] and train["grad_clip"] > 0:
        out.add("train", "grad_clip", "expected 0 with per_layer = true (each weight is updated "
                                      "during backward, before a global norm exists), "
                                      f"got {train['grad_clip']}")
    if "warmup" in given:
        if "warmup_steps" in given:
            out.add("train", "warmup", "expected warmup (a fraction of the steps) or "
                                       "warmup_steps, not both")
        train["warmup_steps"] = round(train["warmup"] * train["steps"])
    train["warmup"] = None  # resolved into warmup_steps (the saved spec has the integer)
    if train["warmup_steps"] >= train["steps"] and "warmup_steps" in given:
        if ("train", "steps") in out.overridden and ("train", "warmup_steps") not in out.overridden:
            clamped = train["steps"] // 10
            out.notices.append(Issue(out.place("train", "warmup_steps"),
                f"{train['warmup_steps']} >= --set train.steps {train['steps']}: warmup "
                f"clamped to {clamped} steps (10 %); [train].warmup = 0.1 scales with any run"))
            train["warmup_steps"] = clamped
        else:
            out.add("train", "warmup_steps", f"expected fewer than [train].steps {train['steps']}, "
                                             f"got {train['warmup_steps']} (or set [train].warmup "
                                             f"= 0.1, a fraction of the steps)")
    if train["device"] == "cuda" and not torch.cuda.is_available():
        out.add("train", "device", "expected a device this machine has, got 'cuda' "
                                   "(torch sees no CUDA GPU; use 'cpu' or 'auto')")


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> RunSpec:
    """Read, override (`table.key=value`, value parsed as TOML) and check a run spec."""
    path = Path(path)
    raw = read_toml(path)
    try:
        overridden = apply_overrides(raw, [parse_override(o) for o in overrides])
    except ValueError as exc:
        raise SpecError(str(path), [Issue("--set", str(exc).removeprefix("--set "))]) from None
    return spec_from_dict(raw, str(path), path.resolve().parent, overridden)


def write_resolved(spec: RunSpec, path: Path) -> None:
    header = (f"Resolved run spec, written by gradproj from {spec.source}.\n"
              "Every default is filled in; `gradproj resume` reads this file.")
    path.write_text(dump_toml(spec.resolved(), header), encoding="utf-8")


def field_docs(cls) -> list[tuple[str, Any, str]]:
    """(key, default, doc) of a spec table, for documentation and `gradproj list`."""
    return [(f.name, f.default, f.metadata.get("doc", "")) for f in fields(cls)
            if "check" in f.metadata]

