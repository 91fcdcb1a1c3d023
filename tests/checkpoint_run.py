"""A GraNet training run that checkpoints every few steps; the checkpoint tests kill and resume it.

usage: python checkpoint_run.py FOLDER [--resume] [--pause SECONDS]

Writes FOLDER/ckpt.pt every 5 steps (printing "saved STEP") and, at the end,
the masks and the model state to FOLDER/final.pt.
"""

import argparse
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import granet_fx as gf

from helpers import SmallCNN, batches

STEPS, EVERY = 40, 5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    config = gf.GraNetConfig(final_sparsity=0.8, total_steps=STEPS, update_every=4, prune_end=24)
    model = gf.sparsify(SmallCNN(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    granet = gf.GraNet(model, opt)
    ckpt = f"{args.folder}/ckpt.pt"
    start = gf.load_checkpoint(ckpt, model, opt, granet)["step"] if args.resume else 0
    data = batches(STEPS, (8, 1, 12), 4)
    for step in range(start, STEPS):
        x, y = data[step]
        # Noise from all three generators, so that a resume must restore each of them.
        x = x + 0.01 * (torch.rand(()) + random.random() + float(np.random.rand()))
        loss = F.cross_entropy(model(x), y)     # dropout draws from torch's generator
        opt.zero_grad()
        loss.backward()
        opt.step()
        granet.step()
        if (step + 1) % EVERY == 0:
            gf.save_checkpoint(ckpt, model, opt, granet, step=step + 1)
            print("saved", step + 1, flush=True)
        time.sleep(args.pause)
    torch.save({"masks": granet.masks(), "model": model.state_dict()}, f"{args.folder}/final.pt")
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
