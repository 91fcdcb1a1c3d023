"""A zoo of HuggingFace transformers architectures and the chain every one of them goes through.

Every model is built from a tiny config with random weights (no download):
transformers of width 32 (16 to 32 for the vision ones) with 2 layers and a
vocabulary of 128, CNNs of two stages or a small width multiplier. ``run_chain`` takes one
model through these stages, in order, and stops at the first that fails:

- build: the model from its config, and its example inputs;
- sparsify: ``gf.sparsify`` with a GraNet config (final sparsity 0.5);
- ones: the initial all-ones masks leave every output unchanged;
- coverage: every parameter of two or more dimensions that the forward passes
  to a matmul-family op as a weight (recorded with a ``TorchFunctionMode``,
  following views, indexing and parametrizations back to their parameters;
  independent of granet_fx's own list) has a mask, except a weight that is
  also read as an embedding (tied embeddings); and random masks act: the
  outputs equal those of the original model with ``w * m`` for every masked
  weight;
- train: GraNet steps in eager mode (loss from the outputs, not ``labels=``):
  finite losses, masks that change at updates, the final sparsity reached,
  zeros under the masks;
- compile: no graph break that the dense model does not also have
  (``torch._dynamo.explain``), GraNet steps under ``torch.compile`` with no
  new graph when the masks change, compiled outputs equal to eager ones;
- save: ``gf.save``;
- export: ``granet-export`` in a fresh interpreter (a subprocess);
- parity: onnxruntime on the ONNX file against the model's own eager outputs.

When a stage from compile on fails, ``run_chain`` also takes the dense model
(never sparsified) through the same step with the same tools, so that the
result says whether sparsifying is what breaks it.
"""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

import granet_fx as gf

STAGES = ("build", "sparsify", "ones", "coverage", "train", "compile", "save", "export", "parity")
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
# The GraNet run of every model: 4 eager steps (updates at 2, 4), then 4 compiled ones (updates at 6, 8).
STEPS, EAGER_STEPS, EVERY, PRUNE_END, FINAL = 8, 4, 2, 6, 0.5
TOLERANCE = 1e-4        # |onnxruntime - eager| <= TOLERANCE * max |eager|


# Inputs ---------------------------------------------------------------------------------------------
def _ids(g, length=8):
    return torch.randint(3, VOCAB, (2, length), generator=g)


def tokens(g):
    return (_ids(g),)


def images(g):
    return (torch.randn(2, 3, 32, 32, generator=g),)


def seq2seq(g):                 # input_ids, attention_mask, decoder_input_ids
    ids = _ids(g)
    return ids, torch.ones_like(ids), _ids(g, 6)


def speech_seq2seq(g):          # Whisper: input_features (mel bins x 2 * max_source_positions), mask, decoder ids
    return torch.randn(2, 8, 32, generator=g), torch.ones(2, 32, dtype=torch.long), _ids(g, 6)


def waveform(g):
    return (torch.randn(2, 400, generator=g),)


def text_and_image(g):          # CLIP: input_ids, pixel_values
    return _ids(g), torch.randn(2, 3, 32, 32, generator=g)


# Models ---------------------------------------------------------------------------------------------
def _text(**kw):
    """A tiny BERT-like text config."""
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, **kw)


def _decoder(**kw):
    """A tiny decoder-only language model config, without a KV cache."""
    return dict(_text(), num_key_value_heads=2, head_dim=8, use_cache=False, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, **kw)


def _seq2seq(**kw):
    """A tiny BART-like encoder-decoder config."""
    return dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, **kw)


def _audio(**kw):
    """A tiny wav2vec2-like config: two feature convolutions (stride 10 in all)."""
    return dict(_text(), conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                num_conv_pos_embedding_groups=2, apply_spec_augment=False, layerdrop=0.0, **kw)


def _vit(**kw):
    return dict(image_size=32, patch_size=8, **{k: v for k, v in _text().items() if k not in
                                                ("vocab_size", "max_position_embeddings")}, **kw)


@dataclass(frozen=True)
class Spec:
    """One model of the zoo: how to build it and what it takes."""

    name: str
    family: str
    cls: str                   # transformers model class
    config: str                # transformers config class
    kwargs: dict
    inputs: Callable           # generator -> tuple of positional input tensors
    lm: bool = False           # loss: next-token cross entropy on the logits (else mean square of the outputs)
    he_init: bool = False      # He-initialized convs, identity batch norms (else the outputs underflow to 0)

    def build(self) -> nn.Module:
        import transformers
        config = getattr(transformers, self.config)(**self.kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(transformers, self.cls)(config)
        if self.he_init:
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        return model


_CLIP = dict(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=16, eos_token_id=2),
             vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4),
             projection_dim=16)

ZOO = {s.name: s for s in [
    # text encoders
    Spec("bert", "text encoder", "BertForMaskedLM", "BertConfig", _text(), tokens),
    Spec("roberta", "text encoder", "RobertaModel", "RobertaConfig", _text(pad_token_id=1), tokens),
    Spec("distilbert", "text encoder", "DistilBertModel", "DistilBertConfig",
          dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64), tokens),
    Spec("albert", "text encoder", "AlbertModel", "AlbertConfig", _text(embedding_size=16), tokens),
    Spec("electra", "text encoder", "ElectraModel", "ElectraConfig", _text(embedding_size=16), tokens),
    Spec("deberta-v2", "text encoder", "DebertaV2Model", "DebertaV2Config",
          _text(relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16,
                position_buckets=8), tokens),
    # decoders
    Spec("gpt2", "decoder", "GPT2LMHeadModel", "GPT2Config",
          dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
               bos_token_id=1, eos_token_id=2), tokens, lm=True),
    Spec("gpt-neox", "decoder", "GPTNeoXForCausalLM", "GPTNeoXConfig", _decoder(), tokens, lm=True),
    Spec("llama", "decoder", "LlamaForCausalLM", "LlamaConfig", _decoder(), tokens, lm=True),
    Spec("mistral", "decoder", "MistralForCausalLM", "MistralConfig", _decoder(), tokens, lm=True),
    Spec("qwen2", "decoder", "Qwen2ForCausalLM", "Qwen2Config", _decoder(), tokens, lm=True),
    Spec("qwen3", "decoder", "Qwen3ForCausalLM", "Qwen3Config", _decoder(), tokens, lm=True),
    Spec("gemma", "decoder", "GemmaForCausalLM", "GemmaConfig", _decoder(), tokens, lm=True),
    Spec("phi", "decoder", "PhiForCausalLM", "PhiConfig", _decoder(), tokens, lm=True),
    Spec("falcon", "decoder", "FalconForCausalLM", "FalconConfig",
          {k: v for k, v in _decoder().items() if k != "head_dim"}, tokens, lm=True),   # head_dim is derived
    Spec("opt", "decoder", "OPTForCausalLM", "OPTConfig",
          _decoder(ffn_dim=64, word_embed_proj_dim=32), tokens, lm=True),
    # mixtures of experts
    Spec("mixtral", "MoE decoder", "MixtralForCausalLM", "MixtralConfig",
          _decoder(num_local_experts=4, num_experts_per_tok=2), tokens, lm=True),
    Spec("qwen2-moe", "MoE decoder", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
          _decoder(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   shared_expert_intermediate_size=32, decoder_sparse_step=1), tokens, lm=True),
    # encoder-decoders
    Spec("t5", "encoder-decoder", "T5ForConditionalGeneration", "T5Config",
          dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, use_cache=False,
               pad_token_id=0, eos_token_id=2, decoder_start_token_id=0), seq2seq),
    Spec("bart", "encoder-decoder", "BartForConditionalGeneration", "BartConfig", _seq2seq(), seq2seq),
    Spec("marian", "encoder-decoder", "MarianMTModel", "MarianConfig", _seq2seq(), seq2seq),
    Spec("pegasus", "encoder-decoder", "PegasusForConditionalGeneration", "PegasusConfig", _seq2seq(), seq2seq),
    # audio
    Spec("whisper", "audio", "WhisperForConditionalGeneration", "WhisperConfig",
          _seq2seq(num_mel_bins=8, max_source_positions=16, max_target_positions=32), speech_seq2seq),
    Spec("wav2vec2", "audio", "Wav2Vec2Model", "Wav2Vec2Config", _audio(), waveform),
    Spec("hubert", "audio", "HubertModel", "HubertConfig", _audio(), waveform),
    # vision transformers
    Spec("vit", "vision transformer", "ViTModel", "ViTConfig", _vit(), images),
    Spec("deit", "vision transformer", "DeiTModel", "DeiTConfig", _vit(), images),
    Spec("beit", "vision transformer", "BeitModel", "BeitConfig", _vit(use_relative_position_bias=True), images),
    Spec("swin", "vision transformer", "SwinModel", "SwinConfig",
          dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4), images),
    Spec("segformer", "vision transformer", "SegformerModel", "SegformerConfig",
          dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
               strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]), images),
    # vision CNNs
    Spec("resnet", "vision CNN", "ResNetModel", "ResNetConfig",
          dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), images),
    Spec("convnext", "vision CNN", "ConvNextModel", "ConvNextConfig",
          dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), images),
    Spec("mobilenetv2", "vision CNN", "MobileNetV2Model", "MobileNetV2Config",
          dict(depth_multiplier=0.35, image_size=32), images, he_init=True),
    Spec("efficientnet", "vision CNN", "EfficientNetModel", "EfficientNetConfig",
          dict(image_size=32, width_coefficient=0.1, depth_coefficient=0.25, hidden_dim=128), images, he_init=True),
    Spec("regnet", "vision CNN", "RegNetModel", "RegNetConfig",
          dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8), images),
    # text and image
    Spec("clip", "text and image", "CLIPModel", "CLIPConfig", _CLIP, text_and_image),
]}


# Failures outside granet_fx, with the dense model failing in the same step, at the edge of a tolerance (they
# may pass): (name, backend) -> (stage, text in the error, why). tests/test_zoo.py lets each of them fail just so.
KNOWN_EXTERNAL: dict[tuple[str, str], tuple[str, str, str]] = {
    ("mobilenetv2", "inductor"): (
        "compile", "compiled outputs differ from eager",
        "inductor's numerics: after compiled training steps the dense model's compiled eval outputs too differ "
        "from eager ones by more than 1e-4 x their largest value (52 convolutions, ReLU6 saturating at 6)"),
}


# Failures inside granet_fx whose cause is known: name -> (stage, text in the error, cause), for the table.
DIAGNOSED: dict[str, tuple[str, str, str]] = {
}


# Outputs and losses ---------------------------------------------------------------------------------
def leaves(out) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, tuple, dict or ModelOutput), in pytree order."""
    if isinstance(out, dict):                   # ModelOutput is a dict whose values are its set fields
        out = list(out.values())
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def loss_of(spec: Spec, out, inputs: tuple) -> torch.Tensor:
    """A language model's next-token cross entropy on its logits; else the mean square of every float output."""
    ys = [t for t in leaves(out) if t.is_floating_point()]
    if spec.lm:
        ids = inputs[0]
        return F.cross_entropy(ys[0][:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return sum(y.pow(2).mean() for y in ys)


def outputs_close(got, want, tolerance: float = TOLERANCE) -> str:
    """'' when every output tensor of ``got`` matches ``want`` within ``tolerance`` x max |want|, else what differs.

    Relative to the largest value, not to max(1, ...): a tiny random
    MobileNetV2's outputs are around 1e-26.
    """
    a, b = leaves(got), leaves(want)
    if len(a) != len(b):
        return f"{len(a)} outputs instead of {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return f"output {i} has shape {tuple(x.shape)} instead of {tuple(y.shape)}"
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return f"output {i} differs"
            continue
        if not y.numel():
            continue
        scale = float(y.double().abs().max()) or 1.0
        err = float((x.double() - y.double()).abs().max())
        if not err <= tolerance * scale:
            return f"output {i} differs by {err / scale:.3g} x its largest value {scale:.3g}"
    return ""


def run_eval(model: nn.Module, inputs: tuple):
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            return model(*inputs)
        finally:
            model.train(was)


# Which parameters the forward uses as matmul weights (the coverage reference) -----------------------
# ops whose weight is one argument: name -> (position, keyword)
_WEIGHT_ARG = {"linear": (1, "weight"), "conv1d": (1, "weight"), "conv2d": (1, "weight"),
               "conv3d": (1, "weight"), "conv_transpose1d": (1, "weight"), "conv_transpose2d": (1, "weight"),
               "conv_transpose3d": (1, "weight"), "addmm": (2, "mat2"), "bilinear": (2, "weight")}
# ops that multiply every tensor operand as a matrix
_MATMUL_OPS = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addbmm", "addmv", "mv",
               "einsum", "tensordot", "chain_matmul", "multi_dot", "_grouped_mm", "grouped_mm",
               "grouped_mm_fallback", "inner", "outer", "dot", "vdot"}


def _op_name(func) -> str:
    """``linear`` for F.linear, ``grouped_mm_fallback`` for torch.ops.transformers.grouped_mm_fallback.default."""
    return getattr(func, "__name__", str(func)).split(".")[0]


class WeightRecorder(TorchFunctionMode):
    """Records which parameters reach a matmul-family op as a weight, and which reach an embedding.

    A tensor computed only from parameters (views, indexing, transposes,
    weight-norm parametrizations, integer index tensors aside) counts as the
    largest of those parameters.
    """

    def __init__(self, params: dict[int, torch.Tensor]):
        super().__init__()
        self.params = {i: n for i, (n, p) in params.items()}   # id(parameter of >= 2 dims) -> name
        self.numel = {n: p.numel() for n, p in params.values()}
        self.derived: dict[int, set[str]] = {}
        self.keep: list[torch.Tensor] = []     # keeps the ids in ``derived`` valid during the forward
        self.weights: dict[str, set[str]] = {}   # name -> ops that used it as a weight
        self.embeddings: set[str] = set()

    def origin(self, t) -> set[str]:
        if not isinstance(t, torch.Tensor):
            return set()
        if id(t) in self.params:
            return {self.params[id(t)]}
        return self.derived.get(id(t), set())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        operands = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name == "embedding":
            self.embeddings |= self.origin(args[1] if len(args) > 1 else kwargs.get("weight"))
        elif name in _WEIGHT_ARG:
            i, key = _WEIGHT_ARG[name]
            for p in self.origin(args[i] if len(args) > i else kwargs.get(key)):
                self.weights.setdefault(p, set()).add(name)
        elif name in _MATMUL_OPS:
            for t in operands:
                for p in self.origin(t):
                    self.weights.setdefault(p, set()).add(name)
        else:   # a tensor computed from parameters alone (and integer indices) still is those parameters
            floats = [t for t in operands if t.is_floating_point()]
            sources = [self.origin(t) for t in floats]
            if floats and all(sources):
                # the largest of them: weight norm's g (one scale per channel) scales v, the weight itself
                names = set().union(*sources)
                largest = max(self.numel[n] for n in names)
                names = {n for n in names if self.numel[n] == largest}
                for o in pytree.tree_leaves(out):
                    if isinstance(o, torch.Tensor):
                        self.derived[id(o)] = names
                        self.keep.append(o)
        return out


def matmul_weights(model: nn.Module, inputs: tuple) -> tuple[dict[str, set[str]], set[str]]:
    """Names of the >= 2-dim parameters that one eval forward uses as matmul weights, and those read as embeddings."""
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.dim() >= 2}
    recorder = WeightRecorder(params)
    with recorder:
        run_eval(model, inputs)
    return recorder.weights, recorder.embeddings


# The chain ------------------------------------------------------------------------------------------
class StageFailed(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


@dataclass
class Result:
    """How far one model got, and why it stopped."""

    name: str
    family: str
    backend: str
    reached: str = ""            # the last stage passed
    failed: str = ""             # the first stage that failed ('' when the whole chain passed)
    reason: str = ""
    dense: str = ""              # on failure: how the dense model does in the same step
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return asdict(self)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(e: BaseException) -> str:
    """The type and first line of the innermost cause of ``e`` (torch.onnx's own summary line, if any)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [l.strip() for l in _ANSI.sub("", str(e)).splitlines() if l.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1:]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _check(stage: str, ok: bool, reason: str) -> None:
    if not ok:
        raise StageFailed(stage, reason)


def _graph_breaks(model: nn.Module, inputs: tuple) -> int:
    """Graph breaks of a train-mode forward, on a copy (batch-norm statistics stay as they were)."""
    torch._dynamo.reset()
    model = copy.deepcopy(model).train()
    return torch._dynamo.explain(model)(*inputs).graph_break_count


def _steps(spec: Spec, model, forward, opt, granet, g, n: int, masks: list) -> list[float]:
    losses = []
    model.train()
    for _ in range(n):
        inputs = spec.inputs(g)
        loss = loss_of(spec, forward(*inputs), inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if granet.step():
            masks.append(granet.masks())
        losses.append(loss.item())
    return losses


def export_subprocess(archive: Path, onnx_file: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``granet-export ARCHIVE -o ONNX`` in a fresh interpreter."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "granet_fx.export.cli", str(archive), "-o", str(onnx_file)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))


def _error_line(stderr: str) -> str:
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def run_chain(name: str, backend: str = "aot_eager", workdir: str | os.PathLike | None = None) -> Result:
    """Take ``ZOO[name]`` through every stage; the result names the first that fails and why."""
    spec = ZOO[name]
    result = Result(name, spec.family, backend)
    start = time.perf_counter()
    state: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        state["dir"] = Path(workdir or tmp)
        try:
            for stage in STAGES:
                began = time.perf_counter()
                try:
                    _STAGE_FUNCS[stage](spec, backend, state, result)
                except StageFailed:
                    raise
                except Exception as e:
                    raise StageFailed(stage, first_line(e)) from e
                finally:
                    result.facts.setdefault("stage_seconds", {})[stage] = round(time.perf_counter() - began, 1)
                result.reached = stage
        except StageFailed as e:
            result.failed, result.reason = e.stage, e.reason
            try:
                result.dense = _dense_attempt(e.stage, spec, backend, state)
            except Exception as d:
                result.dense = f"dense check failed: {first_line(d)}"
    torch._dynamo.reset()
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def _build(spec, backend, state, result):
    torch.manual_seed(0)
    state["model"] = spec.build()
    state["inputs"] = spec.inputs(torch.Generator().manual_seed(1))
    state["dense"] = copy.deepcopy(state["model"])          # never sparsified, never trained
    state["names"] = {id(p): n for n, p in state["model"].named_parameters()}
    state["dense_out"] = run_eval(state["dense"], state["inputs"])
    result.facts["parameters"] = sum(p.numel() for p in state["dense"].parameters())


def _sparsify(spec, backend, state, result):
    config = gf.GraNetConfig(final_sparsity=FINAL, total_steps=STEPS, update_every=EVERY, prune_end=PRUNE_END)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state["sparse"] = gf.sparsify(state["model"], config, example_inputs=state["inputs"])
    info = gf.sparse_info(state["sparse"])
    result.facts["masked"] = len(info.masked)
    result.facts["dense_layers"] = {l.name: l.dense_reason for l in info.layers if l.mask_name is None}


def _ones(spec, backend, state, result):
    sparse, info = state["sparse"], gf.sparse_info(state["sparse"])
    _check("ones", all(bool(sparse.get_buffer(l.mask_name).all()) for l in info.masked),
           "the initial masks are not all ones")
    diff = outputs_close(run_eval(sparse, state["inputs"]), state["dense_out"], tolerance=0.0)
    _check("ones", not diff, f"all-ones masks change the outputs: {diff}")


def _coverage(spec, backend, state, result):
    dense, sparse, inputs = state["dense"], state["sparse"], state["inputs"]
    used, embeddings = matmul_weights(dense, inputs)
    info = gf.sparse_info(sparse)
    # ``dense`` is a copy of the model made before sparsify: name each masked parameter as it was then
    name_of = {id(sparse.get_parameter(l.name)): l for l in info.masked}
    masked = {state["names"][i]: l for i, l in name_of.items() if i in state["names"]}
    expected = {n for n in used if n not in embeddings}
    missing = sorted(expected - set(masked))
    result.facts["matmul_weights"] = len(expected)
    result.facts["tied_embeddings"] = sorted(set(used) & embeddings)
    _check("coverage", not missing, f"{len(missing)} of {len(expected)} matmul weights have no mask: "
           + ", ".join(f"{n} ({'/'.join(sorted(used[n]))})" for n in missing[:4]) + (" ..." if len(missing) > 4 else ""))
    extra = sorted(set(masked) - expected)
    _check("coverage", not extra, f"masks on {len(extra)} parameters that no matmul uses as a weight: "
           + ", ".join(extra[:4]) + (" ..." if len(extra) > 4 else ""))
    # random masks act on every masked weight: outputs as the original model's with w * m
    sc, rc = copy.deepcopy(sparse), copy.deepcopy(dense)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, l in masked.items():
            m = torch.rand(l.shape, generator=g) < 0.5
            sc.get_buffer(l.mask_name).copy_(m)
            w = rc.get_parameter(name)
            w.mul_(m.to(w.dtype))
    diff = outputs_close(run_eval(sc, inputs), run_eval(rc, inputs), tolerance=1e-5)
    _check("coverage", not diff, f"random masks do not act as w * m: {diff}")
    _check("coverage", outputs_close(run_eval(sc, inputs), state["dense_out"], tolerance=1e-5) != "",
           "random masks leave the outputs unchanged")


def _train(spec, backend, state, result):
    sparse = state["sparse"]
    opt = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        granet = gf.GraNet(sparse, opt)
    state.update(opt=opt, granet=granet, masks=[], g=torch.Generator().manual_seed(4))
    before = granet.masks()
    losses = _steps(spec, sparse, sparse, opt, granet, state["g"], EAGER_STEPS, state["masks"])
    _check("train", all(math.isfinite(x) for x in losses), f"losses {losses}")
    _check("train", len(state["masks"]) == EAGER_STEPS // EVERY,
           f"{len(state['masks'])} mask updates in {EAGER_STEPS} steps, not {EAGER_STEPS // EVERY}")
    for old, new in zip([before] + state["masks"], state["masks"]):
        _check("train", any(not torch.equal(old[k], new[k]) for k in new), "an update left every mask as it was")
    _zeros_under_masks("train", sparse)
    result.facts["losses"] = [round(x, 4) for x in losses]


def _zeros_under_masks(stage, sparse):
    for l in gf.sparse_info(sparse).masked:
        w, m = sparse.get_parameter(l.name), sparse.get_buffer(l.mask_name)
        _check(stage, bool((w[~m] == 0).all()), f"{l.name} is not zero where its mask is")


def _compile(spec, backend, state, result):
    sparse, inputs = state["sparse"], state["inputs"]
    dense_breaks = _graph_breaks(state["dense"], inputs)
    sparse_breaks = _graph_breaks(sparse, inputs)
    result.facts["graph_breaks"] = {"dense": dense_breaks, "sparse": sparse_breaks}
    _check("compile", sparse_breaks <= dense_breaks,
           f"{sparse_breaks} graph breaks, the dense model has {dense_breaks}")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    step_fn = torch.compile(sparse, backend=backend)
    granet, masks = state["granet"], state["masks"]
    losses = _steps(spec, sparse, step_fn, state["opt"], granet, state["g"], 1, masks)
    graphs = counters["stats"]["unique_graphs"]
    losses += _steps(spec, sparse, step_fn, state["opt"], granet, state["g"], STEPS - EAGER_STEPS - 1, masks)
    _check("compile", all(math.isfinite(x) for x in losses), f"compiled losses {losses}")
    _check("compile", counters["stats"]["unique_graphs"] == graphs,
           f"{counters['stats']['unique_graphs'] - graphs} new graphs compiled after the masks changed")
    _check("compile", len(masks) > EAGER_STEPS // EVERY, "no mask update in the compiled steps")
    for old, new in zip(masks[EAGER_STEPS // EVERY - 1:], masks[EAGER_STEPS // EVERY:]):
        _check("compile", any(not torch.equal(old[k], new[k]) for k in new), "an update left every mask as it was")
    _zeros_under_masks("compile", sparse)
    report = granet.report()
    total = sum(l.numel for l in report.layers if l.masked)
    _check("compile", abs(report.global_sparsity - FINAL) <= 1 / total + 1e-9,
           f"global sparsity {report.global_sparsity:.4f}, not {FINAL}")
    sparse.eval()
    with torch.no_grad():
        diff = outputs_close(step_fn(*inputs), run_eval(sparse, inputs), tolerance=1e-4)
    _check("compile", not diff, f"compiled outputs differ from eager: {diff}")
    result.facts["losses"] += [round(x, 4) for x in losses]
    torch._dynamo.reset()


def _save(spec, backend, state, result):
    state["archive"] = state["dir"] / f"{spec.name}.pt2"
    state["sparse"].eval()
    gf.save(state["sparse"], state["archive"], example_inputs=state["inputs"])


def _export(spec, backend, state, result):
    state["onnx"] = state["dir"] / f"{spec.name}.onnx"
    done = export_subprocess(state["archive"], state["onnx"])
    _check("export", done.returncode == 0, f"granet-export exit {done.returncode}: {_error_line(done.stderr)}")
    _check("export", state["onnx"].exists(), "granet-export wrote no file")


def _parity(spec, backend, state, result):
    from granet_fx.export.onnx_export import run_onnxruntime
    want = leaves(run_eval(state["sparse"], state["inputs"]))
    got = [torch.from_numpy(a) for a in run_onnxruntime(state["onnx"].read_bytes(), list(state["inputs"]))]
    diff = outputs_close(got, want)
    _check("parity", not diff, f"onnxruntime vs eager: {diff}")


_STAGE_FUNCS = {"build": _build, "sparsify": _sparsify, "ones": _ones, "coverage": _coverage, "train": _train,
                "compile": _compile, "save": _save, "export": _export, "parity": _parity}


def _dense_attempt(stage: str, spec: Spec, backend: str, state: dict) -> str:
    """How the dense model does in the step that failed: 'dense fails too: ...' or 'dense passes'.

    The same step, the same tools (torch.compile; granet_fx's torch.export and
    ONNX export, onnxruntime), the model never sparsified.
    """
    dense, inputs = state.get("dense"), state.get("inputs")
    if dense is None or stage in ("sparsify", "ones", "coverage", "train"):
        return ""
    dense = copy.deepcopy(dense)
    try:
        if stage == "compile":      # the compiled steps of the chain, then compiled against eager outputs
            torch._dynamo.reset()
            step_fn = torch.compile(dense, backend=backend)
            opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)
            g = torch.Generator().manual_seed(4)
            dense.train()
            for _ in range(STEPS - EAGER_STEPS):
                x = spec.inputs(g)
                opt.zero_grad()
                loss_of(spec, step_fn(*x), x).backward()
                opt.step()
            dense.eval()
            with torch.no_grad():
                diff = outputs_close(step_fn(*inputs), run_eval(dense, inputs), tolerance=1e-4)
            if diff:
                return f"dense fails too: compiled outputs differ from eager: {diff}"
        else:
            from granet_fx.export.archive import export_program
            from granet_fx.export.onnx_export import run_onnxruntime, to_onnx
            dense.eval()
            program, _ = export_program(dense, inputs, dynamic_batch=None)
            if stage in ("export", "parity"):
                onnx_model = to_onnx(program)
                got = [torch.from_numpy(a) for a in run_onnxruntime(onnx_model.SerializeToString(), list(inputs))]
                diff = outputs_close(got, state["dense_out"])
                if diff:
                    return f"dense fails too: onnxruntime vs eager: {diff}"
    except Exception as e:
        return f"dense fails too: {first_line(e)}"
    finally:
        torch._dynamo.reset()
    return "dense passes"


if __name__ == "__main__":      # python tests/zoo.py NAME [BACKEND]: one model, its result as JSON
    import json
    r = run_chain(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "aot_eager")
    print(json.dumps(r.to_dict()))
