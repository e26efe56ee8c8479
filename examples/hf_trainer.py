"""gradproj inside Hugging Face's Trainer: a random LlamaForCausalLM on the embedded corpus.

    pip install -e ".[hf]"
    python examples/hf_trainer.py                                     # GaLore, normal mode
    python examples/hf_trainer.py --optim galore_adamw_layerwise --accum 4
    python examples/hf_trainer.py --optim apollo_adamw --optim-args "rank=32,proj=random,scale_type=channel"

The model is built from a LlamaConfig (the tiny preset's shape: hidden 128, 4 layers, byte
vocabulary), the data are 128-byte windows of the Python standard library's source (the
same offline corpus as `gradproj train`), and the only line that differs from a plain HF
script is `GradprojTrainer` in place of `Trainer`.
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from gradproj.integrations.transformers import GradprojTrainer
from gradproj.train.data import load_embedded


class Windows(torch.utils.data.Dataset):
    """Fixed, non-overlapping windows of the byte stream: input_ids = labels (HF shifts)."""

    def __init__(self, tokens, seq_len: int):
        usable = len(tokens) // seq_len * seq_len
        self.rows = torch.from_numpy(tokens[:usable].astype("int64")).view(-1, seq_len)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optim", default="galore_adamw")
    p.add_argument("--optim-args", default="rank=32,update_proj_gap=100,scale=0.25")
    p.add_argument("--targets", nargs="+", default=["attn", "mlp"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--accum", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="default 1.0 (HF's); 0 in per-layer mode, which cannot clip")
    p.add_argument("--out", default="runs/hf-trainer")
    args = p.parse_args()

    torch.set_num_threads(1)  # see README: OpenMP threads stall on a shared small VM
    corpus = load_embedded()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=corpus.vocab_size, hidden_size=128, intermediate_size=344,
        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128))
    training = TrainingArguments(
        args.out, optim=args.optim, optim_target_modules=args.targets, optim_args=args.optim_args,
        learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=0.1, max_steps=args.steps,
        per_device_train_batch_size=16 // args.accum, gradient_accumulation_steps=args.accum,
        max_grad_norm=(args.max_grad_norm if args.max_grad_norm is not None
                       else 0.0 if args.optim.endswith("_layerwise") else 1.0),
        logging_steps=10, save_steps=100, report_to="none", use_cpu=True, seed=0)
    trainer = GradprojTrainer(model=model, args=training,
                              train_dataset=Windows(corpus.train, 128),
                              eval_dataset=Windows(corpus.eval[:128 * 64], 128))
    trainer.train()
    print(trainer.evaluate())


if __name__ == "__main__":
    main()
