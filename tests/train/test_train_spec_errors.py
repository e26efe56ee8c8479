"""The bad-input suite: every malformed spec exits 2 with one line naming the place.

Each case edits the micro spec (a valid spec) in one way and states the place the one
error line must name. Most run the CLI in-process (`main([...])`, ~50 ms each); a few
run `python -m gradproj` as a subprocess to check the real exit code and stderr.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gradproj.train.cli import main

from trainhelpers import MICRO_SPEC, write_spec


def edit(old: str, new: str):
    def apply(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return apply


def append(extra: str):
    return lambda text: text + "\n" + extra + "\n"


# (id, edit of the micro spec, extra CLI args, substrings the single error line must hold)
CASES = [
    ("syntax-unclosed-table", edit("[model]", "[model"), [], ["line 2", "TOML syntax error"]),
    ("syntax-missing-value", edit("steps = 8", "steps ="), [], ["line", "TOML syntax error"]),
    ("syntax-duplicate-key", edit("steps = 8", "steps = 8\nsteps = 9"), [], ["TOML syntax error"]),
    ("unknown-table", append("[modle]\ndim = 3"), [], ["[modle]", "did you mean 'model'"]),
    ("unknown-key", edit("steps = 8", "stesp = 8"), [], ["[train].stesp", "did you mean 'steps'"]),
    ("wrong-type-int", edit("steps = 8", 'steps = "8"'), [], ["[train].steps", "expected an integer", "'8' (string)"]),
    ("wrong-type-bool", edit("threads = 1", 'threads = 1\nper_layer = "yes"'), [], ["[train].per_layer", "true or false"]),
    ("out-of-range-steps", edit("steps = 8", "steps = 0"), [], ["[train].steps", ">= 1", "got 0"]),
    ("negative-lr", edit("lr = 1e-2", "lr = -1e-2"), [], ["[optimizer].lr", ">= 0"]),
    ("infinite-lr", edit("lr = 1e-2", "lr = inf"), [], ["[optimizer].lr", "finite"]),
    ("unknown-rule", edit('rule = "adamw"', 'rule = "adamm"'), [], ["[optimizer].rule", "did you mean 'adamw'"]),
    ("unknown-projector", edit('projector = "randomized"', 'projector = "randomised"'), [], ["[optimizer.lowrank].projector", "did you mean 'randomized'"]),
    ("unknown-state-format", edit('rule = "adamw"', 'rule = "adamw"\nstate_format = "fp33"'), [], ["[optimizer].state_format", "fp32"]),
    ("unknown-residual", edit("rank = 8", 'rank = 8\nresidual = "fria"'), [], ["[optimizer.lowrank].residual", "did you mean 'fira'"]),
    ("unknown-preset", edit('rule = "adamw"', 'preset = "galor"'), [], ["[optimizer].preset", "did you mean 'galore'"]),
    ("unknown-model-preset", edit('preset = "tiny"', 'preset = "tinyy"'), [], ["[model].preset", "did you mean 'tiny'"]),
    ("plugin-option-range", edit("lr = 1e-2", "lr = 1e-2\nbetas = [0.9, 1.5]"), [], ["[optimizer].betas", "expected", "1.5"]),
    ("plugin-option-negative", edit("lr = 1e-2", "lr = 1e-2\neps = -1.0"), [], ["[optimizer].eps", "expected a number >= 0"]),
    ("unknown-plugin-option", edit("lr = 1e-2", "lr = 1e-2\nbetaz = [0.9, 0.99]"), [], ["[optimizer].betaz", "did you mean 'betas'"]),
    ("option-in-wrong-table", edit("lr = 1e-2", "lr = 1e-2\nupdate_gap = 3"), [], ["[optimizer].update_gap", "belongs in [optimizer.lowrank]"]),
    ("rank-zero", edit("rank = 8", "rank = 0"), [], ["[optimizer.lowrank].rank", ">= 1"]),
    ("proj-type", edit("rank = 8", 'rank = 8\nproj_type = "sideways"'), [], ["[optimizer.lowrank].proj_type", "'std'"]),
    ("empty-targets", edit("rank = 8", "rank = 8\ntargets = []"), [], ["[optimizer.lowrank].targets", "at least 1"]),
    ("projector-unknown-option", edit("rank = 8", "rank = 8\nprojector_options = {overample = 2}"), [], ["[optimizer.lowrank].projector_options", "overample"]),
    ("projector-bad-option", edit("rank = 8", "rank = 8\nprojector_options = {oversample = -1}"), [], ["[optimizer.lowrank.projector_options].oversample", ">= 0"]),
    ("per-layer-with-clip", edit("threads = 1", "threads = 1\nper_layer = true\ngrad_clip = 1.0"), [], ["[train].grad_clip", "per_layer"]),
    ("warmup-too-long", edit("warmup_steps = 1", "warmup_steps = 8"), [], ["[train].warmup_steps", "fewer than"]),
    ("text-without-path", edit("seq_len = 32", 'seq_len = 32\nsource = "text"'), [], ["[data].path", "'text'"]),
    ("tokens-missing-file", edit("seq_len = 32", 'seq_len = 32\nsource = "tokens"\npath = "nope.bin"'), [], ["[data].path", "no such file"]),
    ("embedded-with-path", edit("seq_len = 32", 'seq_len = 32\npath = "x.txt"'), [], ["[data].path", "only read when"]),
    ("heads-do-not-divide", edit("n_heads = 2", "n_heads = 3"), [], ["[model].n_heads", "divisor of dim 32"]),
    ("rope-table-too-short", edit("n_heads = 2", "n_heads = 2\nmax_seq_len = 16"), [], ["[model].max_seq_len", ">= [data].seq_len 32"]),
    ("vocab-too-small", edit("n_heads = 2", "n_heads = 2\nvocab_size = 100"), [], ["[model].vocab_size", ">= 256"]),
    ("table-as-value", lambda t: "log = 3\n" + t.replace("[log]\nevery = 1\nprogress = false\nplot = false", ""), [], ["[log]", "expected a table"]),
    ("set-without-equals", None, ["--set", "trainsteps"], ["--set", "KEY=VALUE"]),
    ("set-unknown-key", None, ["--set", "train.stepz=3"], ["[train].stepz (from --set train.stepz)", "did you mean 'steps'"]),
    ("set-bad-value", None, ["--set", "train.steps=-4"], ["[train].steps (from --set train.steps)", "got -4"]),
]
if not torch.cuda.is_available():
    CASES.append(("cuda-absent", edit("threads = 1", 'threads = 1\ndevice = "cuda"'), [],
                  ["[train].device", "no CUDA"]))


def run_cli(capsys, args) -> tuple[int, list[str]]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err.strip().splitlines()


def assert_one_line(code: int, lines: list[str], needles: list[str], source: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert lines[0].startswith("error: ")
    assert source in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_spec_exits_2_with_one_line(case, tmp_path, capsys):
    _, change, extra, needles = case
    text = change(MICRO_SPEC) if change else MICRO_SPEC
    spec = write_spec(tmp_path, text)
    code, lines = run_cli(capsys, ["train", str(spec), *extra])
    assert_one_line(code, lines, needles, str(spec))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_all_problems_reported_together(tmp_path, capsys):
    text = edit("steps = 8", 'steps = "8"')(edit('rule = "adamw"', 'rule = "adamm"')(MICRO_SPEC))
    text = edit("n_heads = 2", "n_heads = 3")(text)
    code, lines = run_cli(capsys, ["train", str(write_spec(tmp_path, text))])
    assert code == 2 and len(lines) == 3
    assert {"[train].steps", "[optimizer].rule", "[model].n_heads"} == {
        next(p for p in ("[train].steps", "[optimizer].rule", "[model].n_heads") if p in line)
        for line in lines}


def test_missing_and_folder_spec(tmp_path, capsys):
    code, lines = run_cli(capsys, ["train", str(tmp_path / "absent.toml")])
    assert_one_line(code, lines, ["no such file"], "absent.toml")
    code, lines = run_cli(capsys, ["train", str(tmp_path)])
    assert_one_line(code, lines, ["is a folder"], str(tmp_path))


def test_runtime_data_errors_name_the_data_key(tmp_path, capsys):
    tokens = tmp_path / "short.bin"
    tokens.write_bytes(bytes(20))  # 10 uint16 tokens: fewer than seq_len + 2
    text = edit("seq_len = 32", f'seq_len = 32\nsource = "tokens"\npath = "{tokens.name}"')(MICRO_SPEC)
    code, lines = run_cli(capsys, ["train", str(write_spec(tmp_path, text))])
    assert_one_line(code, lines, ["[data].seq_len", "9 tokens"], "spec.toml")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    text = edit("seq_len = 32", 'seq_len = 32\nsource = "jsonl"\npath = "bad.jsonl"')(MICRO_SPEC)
    code, lines = run_cli(capsys, ["train", str(write_spec(tmp_path, text, "j.toml"))])
    assert_one_line(code, lines, ["[data].text_key", "bad.jsonl:2"], "j.toml")


def test_other_commands_reject_bad_input(tmp_path, capsys):
    code, lines = run_cli(capsys, ["resume", str(tmp_path)])
    assert_one_line(code, lines, ["not a run folder"], str(tmp_path))
    code, lines = run_cli(capsys, ["plot", str(tmp_path)])
    assert_one_line(code, lines, ["metrics.jsonl"], str(tmp_path))
    code, lines = run_cli(capsys, ["list", "projector"])
    assert_one_line(code, lines, ["did you mean 'projectors'"], "list")
    code, lines = run_cli(capsys, ["train"])
    assert_one_line(code, lines, ["SPEC"], "gradproj")
    code, lines = run_cli(capsys, ["trian"])
    assert_one_line(code, lines, ["invalid choice"], "gradproj")


SUBPROCESS_CASES = [
    ("syntax", edit("[model]", "[model"), ["line 2"]),
    ("unknown-rule", edit('rule = "adamw"', 'rule = "lionn"'), ["[optimizer].rule", "did you mean 'lion'"]),
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_subprocess_exit_code_and_stderr(case, tmp_path):
    _, change, needles = case
    spec = write_spec(tmp_path, change(MICRO_SPEC))
    proc = subprocess.run([sys.executable, "-m", "gradproj", "train", str(spec)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = proc.stderr.strip().splitlines()
    assert_one_line(proc.returncode, lines, needles, str(spec))
    assert proc.stdout == ""


def test_cases_are_distinct_real_edits():
    """The suite's own inventory: at least 25 in-process cases with distinct ids, each one
    either an edit that changes the valid micro spec or bad CLI arguments, and no two
    testing the same input (a copied case would pad the count and test nothing new)."""
    assert len(CASES) >= 25, len(CASES)
    assert len({case[0] for case in CASES}) == len(CASES)
    inputs = [(case[1](MICRO_SPEC) if case[1] else MICRO_SPEC, tuple(case[2])) for case in CASES]
    assert all(text != MICRO_SPEC or args for text, args in inputs)
    assert len(set(inputs)) == len(CASES)
