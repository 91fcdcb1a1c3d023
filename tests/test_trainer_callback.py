"""GraNetCallback in transformers.Trainer: tiny GPT-2 and BERT, built from configs (no downloads).

Config: GraNet to 80% from dense, an update every 5 steps, pruning until step
20, 30 Trainer steps (total_steps comes from the Trainer's max_steps). The
expected values are worked out by hand from the model sizes and the schedule
formulas of DESIGN.md section 1, and the masks are read from the model's own
``*_mask`` buffers.
"""

import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, Trainer,
                          TrainerCallback, TrainingArguments)

import granet_fx as gf
from granet_fx.integrations.transformers import STATE_FILE, GraNetCallback

# GPT-2's lm_head is tied to its token embedding and stays dense: sparsify says so in a warning.
pytestmark = pytest.mark.filterwarnings("ignore:granet_fx. 1 weight.*get no mask:UserWarning")

STEPS, EVERY, PRUNE_END, FINAL = 30, 5, 20, 0.8
VOCAB, LENGTH = 100, 16
GPT2 = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, use_cache=False)
BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, num_labels=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: several threads on a busy machine are ~30x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, the same on every call: language modelling (GPT-2) or classification (BERT)."""

    def __init__(self, classify=False, n=48):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.y = torch.randint(0, BERT["num_labels"], (n,), generator=g)
        self.classify = classify

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        labels = self.y[i] if self.classify else self.x[i]
        return {"input_ids": self.x[i], "labels": labels}


def config(**kw):
    return gf.GraNetConfig(**{"final_sparsity": FINAL, "update_every": EVERY, "prune_end": PRUNE_END, **kw})


def make(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**GPT2))
    return BertForSequenceClassification(BertConfig(**BERT))


class MaskRecorder(TrainerCallback):
    """Copies the model's mask buffers at the end of the given step."""

    def __init__(self, step):
        self.step, self.masks = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.masks = masks_of(model)


def masks_of(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("_mask")}


def train(model, out, callback, resume=None, extra=(), **args):
    settings = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, save_steps=10,
                    logging_steps=5, report_to=[], use_cpu=True, seed=0, learning_rate=1e-2,
                    disable_tqdm=True, dataloader_num_workers=0)
    settings.update(args)
    trainer = Trainer(model=model, args=TrainingArguments(**settings),
                      train_dataset=Tokens(classify=not isinstance(model, GPT2LMHeadModel)),
                      callbacks=[callback, *extra])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def masked_weights(kind):
    """The conv/linear weights that get a mask, by hand: GPT-2's Conv1D layers (its lm_head is tied to the
    token embedding and stays dense); BERT's query/key/value/output, feed-forward, pooler and classifier."""
    if kind == "gpt2":
        d = GPT2["n_embd"]
        sizes = {"attn.c_attn": d * 3 * d, "attn.c_proj": d * d, "mlp.c_fc": d * 4 * d, "mlp.c_proj": 4 * d * d}
        return {f"transformer.h.{i}.{k}.weight": v for i in range(GPT2["n_layer"]) for k, v in sizes.items()}
    h, inter = BERT["hidden_size"], BERT["intermediate_size"]
    sizes = {"attention.self.query": h * h, "attention.self.key": h * h, "attention.self.value": h * h,
             "attention.output.dense": h * h, "intermediate.dense": h * inter, "output.dense": inter * h}
    out = {f"bert.encoder.layer.{i}.{k}.weight": v for i in range(BERT["num_hidden_layers"]) for k, v in sizes.items()}
    out.update({"bert.pooler.dense.weight": h * h, "classifier.weight": h * BERT["num_labels"]})
    return out


def cubic(t):
    t = min(t, PRUNE_END)
    return FINAL * (1 - (1 - t / PRUNE_END) ** 3)


def cosine(t):
    return 0.005 + 0.5 * (0.5 - 0.005) * (1 + math.cos(math.pi * t / STEPS))


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def run(request, tmp_path_factory):
    """One uninterrupted 30-step run, with the masks at step 20 (end of pruning) recorded."""
    kind = request.param
    out = tmp_path_factory.mktemp(kind)
    model, callback, recorder = make(kind), GraNetCallback(config()), MaskRecorder(PRUNE_END)
    trainer = train(model, out, callback, extra=[recorder])
    return dict(kind=kind, out=out, model=model, callback=callback, trainer=trainer, at_end_of_pruning=recorder.masks)


def test_final_sparsity_and_masks(run):
    model = run["model"]
    masks = masks_of(model)
    expected = masked_weights(run["kind"])
    assert {n[: -len("_mask")] for n in masks} == set(expected)
    assert all(masks[n + "_mask"].numel() == size for n, size in expected.items())
    total = sum(expected.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round((1 - FINAL) * total)                   # global pruning to 80%, exact up to rounding
    for name, mask in masks.items():
        weight = model.get_parameter(name[: -len("_mask")])
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert torch.all(weight.detach()[~mask] == 0)
        assert torch.count_nonzero(weight.detach()[mask]) > 0
    # After pruning ends, regrowth (step 25) moves connections but keeps every layer's count.
    before = run["at_end_of_pruning"]
    assert all(int(before[n].sum()) == int(masks[n].sum()) for n in masks)
    assert any(not torch.equal(before[n], masks[n]) for n in masks)
    # The masks are in the model's state_dict (the Trainer saves them with the weights).
    assert all(torch.equal(model.state_dict()[n], m) for n, m in masks.items())


def test_total_steps_from_trainer_and_one_controller_step_per_optimizer_step(run):
    assert gf.sparse_info(run["model"]).config.total_steps == STEPS
    assert run["callback"].granet.step_count == run["trainer"].state.global_step == STEPS


def test_logged_values(run):
    total = sum(masked_weights(run["kind"]).values())
    logged = {e["step"]: e for e in run["trainer"].state.log_history if "loss" in e}
    assert sorted(logged) == list(range(EVERY, STEPS + 1, EVERY))
    for t, entry in logged.items():
        assert entry["granet/target_sparsity"] == pytest.approx(cubic(t))
        assert entry["granet/regrow_fraction"] == pytest.approx(cosine(t))
        # every logging step is an update step: the measured sparsity is the target, up to one weight
        assert abs(entry["granet/global_sparsity"] - cubic(t)) <= 1 / total + 1e-12
    kept = sum(int(m.sum()) for m in masks_of(run["model"]).values())
    assert logged[STEPS]["granet/global_sparsity"] == pytest.approx(1 - kept / total)


def test_controller_state_beside_each_checkpoint(run):
    for step in (10, 20, 30):
        data = torch.load(run["out"] / f"checkpoint-{step}" / STATE_FILE, weights_only=True)
        assert data["granet"]["step"] == step
        assert data["granet"]["config"]["total_steps"] == STEPS


def test_resume_from_checkpoint_gives_the_same_masks_bit_for_bit(run, tmp_path):
    # An interrupted run leaves only checkpoint-10; resume=True finds it in output_dir.
    shutil.copytree(run["out"] / "checkpoint-10", tmp_path / "checkpoint-10")
    model, callback = make(run["kind"]), GraNetCallback(config())
    trainer = train(model, tmp_path, callback, resume=True)
    assert trainer.state.global_step == callback.granet.step_count == STEPS
    expected = masks_of(run["model"])
    got = masks_of(model)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    for (name, p), q in zip(run["model"].named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


def test_resume_from_a_folder_outside_output_dir(tmp_path):
    """The controller state is found through TrainingArguments(resume_from_checkpoint=...)."""
    first = make("bert")
    train(first, tmp_path / "a", GraNetCallback(config()), max_steps=20, save_steps=10)
    source = str(tmp_path / "a" / "checkpoint-10")
    model, callback = make("bert"), GraNetCallback(config())
    train(model, tmp_path / "b", callback, resume=source, resume_from_checkpoint=source, max_steps=20)
    assert callback.granet.step_count == 20
    assert all(torch.equal(a, b) for a, b in zip(masks_of(first).values(), masks_of(model).values()))


def test_resume_without_the_controller_state_is_an_error(run, tmp_path):
    shutil.copytree(run["out"] / "checkpoint-10", tmp_path / "checkpoint-10")
    os.remove(tmp_path / "checkpoint-10" / STATE_FILE)
    with pytest.raises(FileNotFoundError, match=f"{STATE_FILE}.*step 10|step 10.*{STATE_FILE}"):
        train(make(run["kind"]), tmp_path, GraNetCallback(config()), resume=True)


def test_resume_with_a_callback_added_after_the_checkpoint_was_loaded_is_an_error(run, tmp_path):
    # trainer.add_callback skips on_init_end: the model is not sparsified when train() loads the checkpoint
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, report_to=[], use_cpu=True)
    trainer = Trainer(model=make(run["kind"]), args=args,
                      train_dataset=Tokens(classify=run["kind"] == "bert"))
    trainer.add_callback(GraNetCallback(config()))
    with pytest.raises(RuntimeError, match="not sparsified when the checkpoint was loaded"):
        trainer.train(resume_from_checkpoint=str(run["out"] / "checkpoint-10"))


def test_a_model_sparsified_before_the_trainer(tmp_path):
    model = gf.sparsify(make("bert"), config(total_steps=10, prune_end=5))
    callback = GraNetCallback()
    train(model, tmp_path, callback, max_steps=10, save_steps=100)
    masks = masks_of(model)
    total = sum(masked_weights("bert").values())
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - FINAL) * total)
    assert callback.granet.step_count == 10


def test_a_config_other_than_the_models_is_refused(tmp_path):
    model = gf.sparsify(make("bert"), config())
    with pytest.raises(ValueError, match="final_sparsity"):
        Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                callbacks=[GraNetCallback(gf.GraNetConfig(final_sparsity=0.5))])


def test_a_model_that_traces_whole_must_be_sparsified_before_the_trainer(tmp_path):
    # sparsify would return a new GraphModule, which the Trainer does not hold
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="sparsify it before building the Trainer"):
        Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                callbacks=[GraNetCallback(config())])


def test_gradient_accumulation_steps_the_controller_once_per_optimizer_step(tmp_path):
    model, callback = make("bert"), GraNetCallback(config(total_steps=6, prune_end=4, update_every=2))
    trainer = train(model, tmp_path, callback, max_steps=6, gradient_accumulation_steps=2, save_steps=100)
    assert trainer.state.global_step == callback.granet.step_count == 6


def test_importing_granet_fx_does_not_import_the_integrations():
    code = "import sys, granet_fx; print('granet_fx.integrations' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# DistributedDataParallel: two CPU processes (gloo) under accelerate launch -----------------------------------------------
def ddp_worker(out):
    """Run under accelerate launch: train, then resume from checkpoint-10 in another folder; each rank saves its masks."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = make("gpt2")
    train(model, f"{out}/a", GraNetCallback(config()), ddp_find_unused_parameters=False)
    torch.save(masks_of(model), f"{out}/masks-{rank}.pt")
    source = f"{out}/a/checkpoint-10"
    resumed = make("gpt2")
    train(resumed, f"{out}/b", GraNetCallback(config()), resume=source, resume_from_checkpoint=source,
          ddp_find_unused_parameters=False)
    torch.save(masks_of(resumed), f"{out}/resumed-{rank}.pt")


@pytest.mark.slow   # about 20 s: two processes, each importing transformers
def test_ddp_two_processes(tmp_path):
    """Both ranks hold the same masks (DDP averages the gradients), at the target sparsity, and a resume from
    a checkpoint gives them again, bit for bit."""
    with socket.socket() as s:      # a free port (port 0, "any", hangs the Trainer's init)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # accelerate launch --multi_gpu starts torchrun's processes; TrainingArguments(use_cpu=True) makes them gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}",
               __file__, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    masks = [torch.load(tmp_path / f"masks-{r}.pt", weights_only=True) for r in range(2)]
    resumed = [torch.load(tmp_path / f"resumed-{r}.pt", weights_only=True) for r in range(2)]
    assert set(masks[0]) == {n + "_mask" for n in masked_weights("gpt2")}
    total = sum(masked_weights("gpt2").values())
    assert sum(int(m.sum()) for m in masks[0].values()) == round((1 - FINAL) * total)
    for other in (masks[1], resumed[0], resumed[1]):
        assert other.keys() == masks[0].keys()
        assert all(torch.equal(other[n], masks[0][n]) for n in masks[0])


# FSDP2 ------------------------------------------------------------------------------------------------------
def test_fsdp_asked_for_but_not_sharded_warns():
    """On CPU accelerate trains with DDP when TrainingArguments ask for FSDP: the callback says so."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    model, callback = make("gpt2"), GraNetCallback(config())
    callback.on_init_end(None, TrainerState(), TrainerControl(), model=model)
    with pytest.warns(UserWarning, match="asks for FSDP but the model's weights are not sharded"):
        callback.on_train_begin(SimpleNamespace(fsdp=["full_shard"]), TrainerState(max_steps=STEPS), TrainerControl(),
                                model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def fsdp2_worker():
    """One gloo process: a BERT sharded by fully_shard reaches on_train_begin; prints the error it gets."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    model, callback = make("bert"), GraNetCallback(config())
    callback.on_init_end(None, TrainerState(), TrainerControl(), model=model)
    fully_shard(model)
    state = TrainerState(max_steps=STEPS)
    try:
        callback.on_train_begin(None, state, TrainerControl(), model=model,
                                optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    except NotImplementedError as e:
        print(e)
    dist.destroy_process_group()


def test_fsdp2_sharded_weights_are_refused_clearly():
    """Not supported yet: a sharded model gets one clear error rather than masks that do not fit its shards."""
    done = subprocess.run([sys.executable, __file__, "--fsdp2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded (FSDP2 DTensors)" in done.stdout


if __name__ == "__main__":
    if sys.argv[1] == "--fsdp2":
        fsdp2_worker()
    else:
        ddp_worker(sys.argv[1])
