"""Every figure README.md prints from the planner, asserted exactly.

The "Memory" section's 60M–7B table is `python -m gradproj.memory.tables`; each cell is
pinned here to the byte (optimizer memory, total), the README's table must be the
planner's output character for character, and the 7B paragraphs' figures (bytes, GB,
GiB, % less) must be the ones the planner computes. The two baseline columns are also
recomputed from the models' parameter shapes with bitsandbytes' rules spelled out
(2 moments × 2 bytes; q8: 1 byte + 4 per block of 256, fp32 below 4096 elements), so they
do not lean on the planner alone. A change that moves a published number fails here:
update the README with it (and this file's pins) or find the bug.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

import gradproj as gp
from gradproj.memory.report import GB, change
from gradproj.memory.tables import SIZES, example, table
from gradproj.train.model import build_model
from gradproj.train.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
MEMORY = README[README.index("\n## Memory"):README.index("\n## Distributed")]
FLAT = " ".join(MEMORY.split())  # the paragraphs with their line breaks folded

#: (optimizer memory, total) in bytes per (size, method), as `tables.table()` computes them
CELLS = {
    ('60m', 'GaLore'): (163743744, 479878148),
    ('60m', 'AdamW BF16'): (232294400, 548428804),
    ('60m', '8-bit Adam'): (118013952, 434148356),
    ('60m', 'GaLore 8-bit'): (86815744, 319570948),
    ('60m', 'Q-GaLore'): (81425408, 289278980),
    ('60m', 'ours (best)'): (38785248, 246638820),
    ('130m', 'GaLore'): (342961152, 1025704964),
    ('130m', 'AdamW BF16'): (536423424, 1219167236),
    ('130m', '8-bit Adam'): (272517120, 955260932),
    ('130m', 'GaLore 8-bit'): (190531584, 654215684),
    ('130m', 'Q-GaLore'): (166275072, 546351620),
    ('130m', 'ours (best)'): (69925200, 450001748),
    ('350m', 'GaLore'): (652808192, 2458184708),
    ('350m', 'AdamW BF16'): (1471877120, 3277253636),
    ('350m', '8-bit Adam'): (747737088, 2553113604),
    ('350m', 'GaLore 8-bit'): (375155712, 1510129668),
    ('350m', 'Q-GaLore'): (310471680, 1147787268),
    ('350m', 'ours (best)'): (116826784, 954142372),
    ('1b', 'GaLore'): (2084921344, 8074759172),
    ('1b', 'AdamW BF16'): (5356331008, 11346168836),
    ('1b', '8-bit Adam'): (2720610816, 8710448644),
    ('1b', 'GaLore 8-bit'): (1232756352, 4675500676),
    ('1b', 'Q-GaLore'): (974020224, 3227727748),
    ('1b', 'ours (best)'): (327238304, 2580945828),
    ('7b', 'GaLore'): (9404694528, 37994728452),
    ('7b', 'AdamW BF16'): (26953662464, 55543696388),
    ('7b', '8-bit Adam'): (13687406720, 42277440644),
    ('7b', 'GaLore 8-bit'): (5700665472, 21076012164),
    ('7b', 'Q-GaLore'): (4320739456, 13321268356),
    ('7b', 'ours (best)'): (1277056128, 10277585028),
}


@pytest.fixture(scope="module")
def planned():
    return table()  # ~25 s on one CPU thread: 5 sizes x 4 specs, each with its 2 baselines


def test_table_cells_are_pinned_to_the_byte(planned):
    _, plans = planned
    assert plans == CELLS


def test_readme_table_is_the_planners_output(planned):
    text, _ = planned
    start = MEMORY.index("| model | AdamW BF16 |")
    printed = MEMORY[start:MEMORY.index("\n\n", start)]
    assert printed == text


def _parameter_numels(size: str) -> list[int]:
    spec = load_spec(example(size))
    return [p.numel() for p in build_model(spec.model, device="meta").parameters()]


@pytest.mark.parametrize("size", SIZES)
def test_baseline_columns_spelled_out(size):
    numels = _parameter_numels(size)
    adamw_bf16 = sum(2 * 2 * n for n in numels)
    adam_8bit = sum(2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 2 * 4 * n for n in numels)
    assert CELLS[size, "AdamW BF16"][0] == adamw_bf16
    assert CELLS[size, "8-bit Adam"][0] == adam_8bit
    if size == "7b":
        assert sum(numels) == 6_738_415_616


def _gb(x: int) -> str:
    return f"{x / GB:.2f} GB"


def test_7b_galore_paragraph():
    plan = gp.plan_memory(ROOT / "examples" / "llama-7b-galore.toml", dtype="bfloat16")
    spec, adamw = plan.spec, plan.baselines["adamw-bf16"]
    figures = {
        "optimizer states + bases": (spec.optimizer_memory, 9_404_694_528),
        "moments": (spec.optimizer_states, 7_525_646_336),
        "bases": (spec.projector_bases, 1_879_048_192),
        "BF16 AdamW": (adamw.optimizer_memory, 26_953_662_464),
    }
    for what, (got, published) in figures.items():
        assert got == published, what
        assert f"{published:,}" in FLAT, what
    # embedding, untied head (32000 x 4096 each) and 65 RMSNorm vectors: full bf16 M and V
    full_rank = 2 * 2 * (2 * 32000 * 4096 + 65 * 4096)
    assert f"{full_rank:,} B" in FLAT
    assert f"**{100 * plan.reduction():.1f} % less**" in FLAT and change(plan.reduction()) == "65.1% less"
    without = 1 - (spec.optimizer_memory - full_rank) / (adamw.optimizer_memory - full_rank)
    assert f"{100 * without:.1f} %" in FLAT and f"{100 * without:.1f}" == "67.7"
    assert f"Total {spec.total / GB:.2f} GB vs {adamw.total / GB:.2f} GB" in FLAT
    assert (round(spec.total / GB, 2), round(adamw.total / GB, 2)) == (37.99, 55.54)


def test_7b_galore_8bit_per_layer_line():
    opt, total = CELLS["7b", "GaLore 8-bit"]
    adamw_opt, adamw_total = CELLS["7b", "AdamW BF16"]
    line = (f"{opt / GB:.2f} GB of optimizer memory (−{100 * (1 - opt / adamw_opt):.1f} %; "
            f"paper −82.5 %) and {total / GB:.2f} GB in total (−{100 * (1 - total / adamw_total):.1f} %;")
    assert line == "5.70 GB of optimizer memory (−78.9 %; paper −82.5 %) and 21.08 GB in total (−62.1 %;"
    assert line in FLAT


def test_7b_best_paragraph():
    plan = gp.plan_memory(ROOT / "examples" / "llama-7b-best.toml", dtype="bfloat16")
    spec = plan.spec
    assert spec.optimizer_memory == 1_277_056_128 == CELLS["7b", "ours (best)"][0]
    assert spec.total == 10_277_585_028 == CELLS["7b", "ours (best)"][1]
    assert f"optimizer memory {spec.optimizer_memory:,} B, **{100 * plan.reduction():.1f} % less**" in FLAT
    assert f"**{spec.total / GB:.2f} GB in total** ({spec.total:,} B, {spec.total / 2 ** 30:.2f} GiB;" in FLAT
    scales = sum(spec.scales.values())
    assert scales == spec.quantization_scales
    parts = (f"weights {spec.weights / GB:.2f} GB", f"gradients {spec.gradients / GB:.2f} GB",
             f"moments {spec.optimizer_states / GB:.2f} GB",
             f"quantization scales {scales / GB:.2f} GB", f"activations {spec.activations / GB:.2f} GB")
    for part in parts:
        assert part in FLAT, part
    assert [p.split()[-2] for p in parts] == ["7.00", "0.26", "1.20", "0.18", "1.64"]
    assert spec.projector_bases == 0  # seed-regenerated basis


def test_7b_best_at_rank_256():
    plan = gp.plan_memory(load_spec(ROOT / "examples" / "llama-7b-best.toml",
                                    ["optimizer.lowrank.rank=256"]), dtype="bfloat16")
    sentence = (f"Rank 256 instead of 1024 plans {plan.spec.optimizer_memory / GB:.2f} GB of optimizer "
                f"memory ({100 * plan.reduction():.1f} % less) and {plan.spec.total / GB:.2f} GB in total.")
    assert sentence in FLAT, sentence
    assert (plan.spec.optimizer_memory, plan.spec.total) == (528_372_864, 9_528_901_764)
