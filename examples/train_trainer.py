"""GraNet inside transformers.Trainer: a tiny GPT-2, built from a config, on random tokens (no downloads).

    python examples/train_trainer.py                        # 60 steps to 80% sparsity, checkpoints in OUT
    python examples/train_trainer.py --resume               # continue from the last checkpoint in OUT
    torchrun --nproc_per_node=2 examples/train_trainer.py   # DistributedDataParallel (gloo on CPU)
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import granet_fx as gf
from granet_fx.integrations.transformers import GraNetCallback


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences; the labels are the inputs (language modelling)."""

    def __init__(self, n: int = 256, length: int = 32, vocab: int = 100):
        self.tokens = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="trainer-out", help="checkpoints go here (default trainer-out)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="final sparsity (default 0.8)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    a = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                       use_cache=False))
    # total_steps is left out: the callback takes the Trainer's max_steps.
    callback = GraNetCallback(gf.GraNetConfig(final_sparsity=a.sparsity, update_every=10))
    args = TrainingArguments(output_dir=a.output_dir, max_steps=a.steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=10, save_steps=20, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    if trainer.is_world_process_zero():
        print(callback.granet.report())


if __name__ == "__main__":
    main()
