"""DistributedDataParallel: two CPU processes (gloo) keep identical masks, equal to one process's.

Each rank trains on its half of every batch. DDP averages the two halves'
gradients, so every rank sees the same gradient and must compute the same
masks. The reference is one process that computes the two halves' gradients
itself and averages them: (g0 + g1) / 2 is exactly what the all-reduce gives,
so masks and weights must agree bit for bit.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import granet_fx as gf

from helpers import MLP, batches

WORLD = 2
STEPS = 12
METHODS = ("granet", "set")


def make(method):
    torch.manual_seed(0)
    config = gf.GraNetConfig(method=method, final_sparsity=0.8, total_steps=STEPS, update_every=2, prune_end=8)
    model = gf.sparsify(MLP(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def halves(x):
    return x.chunk(WORLD)


def train_ddp(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    result = {}
    for method in METHODS:
        model, opt = make(method)
        ddp = DistributedDataParallel(model)
        granet = gf.GraNet(ddp, opt)
        masks = []
        for x, y in batches(STEPS, (16, 20), 10):
            loss = F.cross_entropy(ddp(halves(x)[rank]), halves(y)[rank])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if granet.step():
                masks.append(granet.masks())
        result[method] = {"masks": masks, "state": model.state_dict()}
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def train_one_process(method):
    torch.set_num_threads(1)
    model, opt = make(method)
    granet = gf.GraNet(model, opt)
    params = list(model.parameters())
    masks = []
    for x, y in batches(STEPS, (16, 20), 10):
        grads = []
        for xs, ys in zip(halves(x), halves(y)):
            loss = F.cross_entropy(model(xs), ys)
            grads.append(torch.autograd.grad(loss, params))
        for p, g0, g1 in zip(params, *grads):
            p.grad = (g0 + g1) / WORLD
        opt.step()
        if granet.step():
            masks.append(granet.masks())
    return {"masks": masks, "state": model.state_dict()}


def test_ddp_masks_agree_on_every_rank_and_with_one_process(tmp_path):
    mp.spawn(train_ddp, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for method in METHODS:
        reference = train_one_process(method)
        assert len(reference["masks"]) == 5                 # updates at steps 2, 4, 6, 8, 10
        changed = [any(not torch.equal(a[k], b[k]) for k in a)
                   for a, b in zip(reference["masks"], reference["masks"][1:])]
        assert all(changed), "every update changes the masks"
        for r, run in enumerate(ranks):
            got = run[method]
            assert len(got["masks"]) == len(reference["masks"])
            for i, (a, b) in enumerate(zip(got["masks"], reference["masks"])):
                for k in b:
                    assert torch.equal(a[k], b[k]), f"{method}: rank {r}, update {i}, {k}"
            for k, v in reference["state"].items():
                assert torch.equal(got["state"][k], v), f"{method}: rank {r}, {k}"
