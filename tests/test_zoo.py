"""The HuggingFace zoo (tests/zoo.py) through the whole chain: sparsify, coverage, train, compile, save, export, ONNX.

The default run takes a decoder and a CNN through the chain, compiled with the
aot_eager backend; ``-m slow`` adds an encoder-decoder and an audio model with
aot_eager, and takes every model of the zoo through it compiled with inductor. ``benchmarks/zoo.py`` writes the same
results as a table.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo import KNOWN_EXTERNAL, STAGES, ZOO, matmul_weights, run_chain

DEFAULT = ("llama", "resnet")
WIDER = ("t5", "wav2vec2")        # aot_eager too, with -m slow: the default run stays short

CASES = [pytest.param(n, "aot_eager", id=f"{n}-aot_eager") for n in DEFAULT] + \
        [pytest.param(n, "aot_eager", id=f"{n}-aot_eager", marks=pytest.mark.slow) for n in WIDER] + \
        [pytest.param(n, "inductor", id=f"{n}-inductor", marks=pytest.mark.slow) for n in ZOO]


def test_the_zoo_spans_the_families():
    families = {s.family for s in ZOO.values()}
    assert {"text encoder", "decoder", "MoE decoder", "encoder-decoder", "audio", "vision transformer",
            "vision CNN", "text and image"} <= families
    assert len(ZOO) >= 30
    assert {ZOO[n].family for n in DEFAULT} >= {"decoder", "vision CNN"}
    assert {ZOO[n].family for n in DEFAULT + WIDER} >= {"decoder", "encoder-decoder", "vision CNN", "audio"}


class Uses(nn.Module):
    """Weights reaching matmul-family ops in the ways HF models use them, and some that do not."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)                            # tied: also the output projection
        self.experts = nn.Parameter(torch.randn(3, 4, 4))         # indexed per expert, then F.linear
        self.mix = nn.Parameter(torch.randn(4, 4))                # einsum
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 1))   # weight = g * v / |v|
        self.pos = nn.Parameter(torch.randn(5, 4))                # added, not multiplied
        self.unused = nn.Linear(4, 4)                             # never called

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        h = F.linear(h, self.experts[int(ids[0, 0]) % 3].t())
        h = torch.einsum("bti,io->bto", h, self.mix)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return h @ self.emb.weight.T


def test_weight_recorder_finds_the_matmul_weights_through_views_indexing_and_parametrizations():
    used, embeddings = matmul_weights(Uses(), (torch.randint(0, 10, (2, 5)),))
    assert set(used) == {"emb.weight", "experts", "mix", "conv.parametrizations.weight.original1"}
    assert used["experts"] == {"linear"} and used["mix"] == {"einsum"}
    assert embeddings == {"emb.weight"}


@pytest.mark.parametrize("name, backend", CASES)
def test_whole_chain(name, backend, tmp_path):
    result = run_chain(name, backend, tmp_path)
    known = KNOWN_EXTERNAL.get((name, backend))
    if known is not None:
        stage, match, why = known
        # a known failure outside granet_fx: the same stage, the same error, and the dense model fails there too
        # (at the edge of the tolerance, so it may pass too: then it must pass every stage, as below)
        if result.failed == stage and match in result.reason + result.dense and result.dense.startswith("dense fails too"):
            pytest.xfail(why)
    assert result.passed, (f"{name} fails at {result.failed} (after {result.reached or 'nothing'}): "
                           f"{result.reason}; {result.dense}")
    assert result.reached == STAGES[-1]


# channel pruning through the command line: models that each needed a fix (GQA's repeat_kv sizes, OPT's
# flattening reshape and SegFormer's reshape back, written as numbers in the exported graph and rewritten;
# EfficientNet's depthwise convolutions with padding="same"; GPT-2's Conv1D and fused q, k, v), every model
# of the zoo with -m slow
CHANNEL_DEFAULT = ("gpt2",)
CHANNEL_CASES = [pytest.param(n, id=n, marks=() if n in CHANNEL_DEFAULT else pytest.mark.slow) for n in ZOO]


@pytest.mark.parametrize("name", CHANNEL_CASES)
def test_channel_pruned_model_compacts_through_granet_export(name, tmp_path):
    """Channel GraNet (half of every group), gf.save, then ``granet-export --compact`` in a fresh interpreter:
    it compacts, checks onnxruntime against the masked model, and removes as many channels as compacting
    the model in this process does (in the file, the sizes the graph writes as numbers are rewritten)."""
    import re
    import subprocess
    import sys
    import warnings

    import granet_fx as gf

    spec = ZOO[name]
    torch.manual_seed(0)
    model = spec.build().eval()
    inputs = spec.inputs(torch.Generator().manual_seed(1))
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5, total_steps=1, prune_end=1,
                             update_every=1, scope="layer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = gf.sparsify(model, config, example_inputs=inputs)
        gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
        removed_here = gf.compaction_report(gf.compact(sparse, inputs)).removed
        gf.save(sparse, tmp_path / "model.pt", example_inputs=inputs)
    run = subprocess.run([sys.executable, "-m", "granet_fx.export.cli", str(tmp_path / "model.pt"), "-o",
                          str(tmp_path / "model.onnx"), "--compact"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    removed = int(re.search(r"compaction: removed (\d+) of", run.stdout + run.stderr)[1])
    assert removed == removed_here
