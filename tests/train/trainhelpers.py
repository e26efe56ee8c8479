"""Shared helpers for the training tests: a micro spec that trains in about a second."""
from __future__ import annotations

from pathlib import Path



# dim 32, 2 layers, seq 32, batch 4: ~30K parameters, ~20 ms a step on one CPU thread
MICRO_SPEC = """
[model]
preset = "tiny"
dim = 32
n_layers = 2
n_heads = 2
ffn_dim = 64

[data]
seq_len = 32

[optimizer]
rule = "adamw"
lr = 1e-2

[optimizer.lowrank]
projector = "randomized"
rank = 8
update_gap = 4

[train]
steps = 8
batch_size = 4
threads = 1
eval_batches = 2
warmup_steps = 1

[checkpoint]
dir = "{run_dir}"
every = 3

[log]
every = 1
progress = false
plot = false
"""


def write_spec(folder: Path, text: str = MICRO_SPEC, name: str = "spec.toml",
               run_dir: Path | None = None) -> Path:
    path = folder / name
    path.write_text(text.replace("{run_dir}", str(run_dir or folder / "run")))
    return path


