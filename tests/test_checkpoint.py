"""Crash-safe checkpoints: a run killed with SIGKILL and resumed ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import granet_fx as gf
from granet_fx.checkpoint import CheckpointError, read_checkpoint

from helpers import MLP, batches, train

RUN = Path(__file__).with_name("checkpoint_run.py")


def run(folder, *args, **kw):
    return subprocess.Popen([sys.executable, str(RUN), str(folder), *args], stdout=subprocess.PIPE,
                            text=True, cwd=RUN.parent, **kw)


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir()
    crashed.mkdir()
    a = run(straight)
    b = run(crashed, "--pause", "0.1")
    try:
        for line in b.stdout:           # kill it some time after its third checkpoint
            if line.strip() == "saved 15":
                break
        b.send_signal(signal.SIGKILL)
        assert b.wait() == -signal.SIGKILL
        assert a.wait() == 0
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not (crashed / "final.pt").exists()
    step = read_checkpoint(crashed / "ckpt.pt")["extra"]["step"]
    assert 15 <= step < 40
    c = run(crashed, "--resume")
    assert c.wait(timeout=300) == 0
    assert sorted(os.listdir(crashed)) == ["ckpt.pt", "final.pt"], "no temporary file is left"
    want = torch.load(straight / "final.pt", weights_only=True)
    got = torch.load(crashed / "final.pt", weights_only=True)
    assert want["masks"].keys() == got["masks"].keys()
    for k, m in want["masks"].items():
        assert torch.equal(m, got["masks"][k]), k
    for k, v in want["model"].items():
        assert torch.equal(v, got["model"][k]), k


def make(seed=0):
    torch.manual_seed(seed)
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="set", final_sparsity=0.7, total_steps=20, update_every=2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, gf.GraNet(model, opt)


def test_checkpoint_restores_everything_in_process(tmp_path):
    path = tmp_path / "ckpt.pt"
    model, opt, granet = make()
    train(model, opt, granet, batches(6, (8, 20), 10))
    gf.save_checkpoint(path, model, opt, granet, step=6, note="six")
    after_save = torch.rand(3), granet.masks()
    train(model, opt, granet, batches(4, (8, 20), 10, seed=1))
    expected = granet.masks(), model.state_dict()

    other, other_opt, other_granet = make(seed=1)       # different initial weights and masks
    extra = gf.load_checkpoint(path, other, other_opt, other_granet)
    assert extra == {"step": 6, "note": "six"}
    assert other_granet.step_count == 6
    assert torch.equal(torch.rand(3), after_save[0])   # the global generator is back where it was
    assert all(torch.equal(after_save[1][k], v) for k, v in other_granet.masks().items())
    train(other, other_opt, other_granet, batches(4, (8, 20), 10, seed=1))
    assert all(torch.equal(expected[0][k], v) for k, v in other_granet.masks().items())
    assert all(torch.equal(expected[1][k], v) for k, v in other.state_dict().items())


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model, opt, granet = make()
    gf.save_checkpoint(path, model, opt, granet, step=0)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)    # the new file is written, not yet renamed
    train(model, opt, granet, batches(2, (8, 20), 10))
    with pytest.raises(OSError, match="disk full"):
        gf.save_checkpoint(path, model, opt, granet, step=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_bad_files_are_refused_with_a_clear_error(tmp_path):
    model, opt, granet = make()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pt is not a granet_fx checkpoint"):
        gf.load_checkpoint(corrupt, model, opt, granet)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": model.state_dict()}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt is not a granet_fx checkpoint"):
        gf.load_checkpoint(foreign, model, opt, granet)
    with pytest.raises(OSError, match="missing does not exist"):
        gf.save_checkpoint(tmp_path / "missing" / "ckpt.pt", model, opt, granet)


def test_every_flipped_byte_is_an_error_and_changes_nothing(tmp_path):
    path = tmp_path / "ckpt.pt"
    model, opt, granet = make()
    train(model, opt, granet, batches(2, (8, 20), 10))
    gf.save_checkpoint(path, model, opt, granet, step=2)
    data = path.read_bytes()
    fresh, fresh_opt, fresh_granet = make(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    # the header, zip headers, the pickle, every weight's bytes, and the end of the file
    offsets = sorted(set(range(0, 120)) | set(range(120, len(data), max(1, len(data) // 150))) | {len(data) - 1})
    for offset in offsets:
        path.write_bytes(data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1:])
        with pytest.raises(CheckpointError, match="ckpt.pt") as info:
            gf.load_checkpoint(path, fresh, fresh_opt, fresh_granet)
        assert "\n" not in str(info.value), offset
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert fresh_granet.step_count == 0
    for cut in (len(data) - 1, len(data) // 2, 30):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="ckpt.pt is a damaged"):
            gf.load_checkpoint(path, fresh, fresh_opt, fresh_granet)


def test_a_version_1_checkpoint_is_still_read(tmp_path):
    """Version 1 was the bare torch.save zip of the same state; it is read through the same checks."""
    path = tmp_path / "ckpt.pt"
    model, opt, granet = make()
    train(model, opt, granet, batches(3, (8, 20), 10))
    gf.save_checkpoint(path, model, opt, granet, step=3)
    state = read_checkpoint(path)
    torch.save({**state, "version": 1}, path)
    other, other_opt, other_granet = make(seed=1)
    assert gf.load_checkpoint(path, other, other_opt, other_granet) == {"step": 3}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())
    assert other_granet.step_count == 3


def test_a_temporary_file_of_a_killed_writer_is_removed_at_the_next_save(tmp_path):
    path = tmp_path / "ckpt.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ckpt.pt.{dead.pid}.abc123.tmp"        # how a killed writer leaves it
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".ckpt.pt.{os.getppid()}.def456.tmp"     # a writer that still runs
    live.write_bytes(b"being written")
    unrelated = tmp_path / ".other.pt.1.x.tmp"
    unrelated.write_bytes(b"not ours")
    model, opt, granet = make()
    gf.save_checkpoint(path, model, opt, granet, step=0)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", live.name, unrelated.name])
    assert read_checkpoint(path)["extra"] == {"step": 0}
