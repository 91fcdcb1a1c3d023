"""``nn.MultiheadAttention`` written so that channel analysis follows its heads.

torch's module computes everything inside ``F.multi_head_attention_forward``
(and, in inference, one fused op), which channel analysis does not follow: its
input channels and its heads stay. ``split_attention_heads`` (for ``sparsify``
with ``granularity="channel"``) gives each module that uses the common options
the class ``SplitHeadsAttention``, which computes the same thing the way HF's
GPT-2 attention does: the fused projection ``F.linear(x, in_proj_weight,
in_proj_bias)`` split by the int attribute ``split_size`` into q, k and v,
heads by a view with ``-1`` heads of ``head_dim``, ``scaled_dot_product_attention``,
heads merged with ``-1``, then the output projection. A head is then rows of
q, k and v and columns of ``out_proj``, and ``compact`` removes it, rewriting
``split_size`` (``channel_groups.split_owner``) and the module's sizes
(``resize``). Parameters, their names and the state_dict stay those of torch's
module; the module stays a module call in traced graphs (fx would write
``split_size`` into the parent's code as a number), its weights masked as
torch's module's are.

The fused split applies to self-attention (``query is key is value``); other
calls (cross-attention) project query, key and value with the three slices of
the weight, ``in_proj_weight.split(split_size)``: a head is then rows of each
slice (channel analysis follows a linear layer that reads rows of a split
weight), and the sequences read share the weight's input channels.
``add_bias_kv`` appends ``bias_k``/``bias_v`` to the keys and values before
the heads are split (a head then also owns its entries of the two biases),
``add_zero_attn`` a key and value of zeros to every head after it, both as
torch does. With ``kdim``/``vdim`` other than ``embed_dim`` the query, key
and value have weights of their own and one bias: a head is rows of each
weight and of each third of the bias.

In ``nn.TransformerDecoderLayer`` both attentions lose heads. ``nn.TransformerEncoderLayer``
in inference hands the attention's weights to one fused op that assumes every
head spans ``embed_dim``, bypassing the module's forward: such a layer (torch's
class itself, not a subclass) becomes ``SplitHeadsEncoderLayer``, which always
takes the layer's module path (the one torch takes in training), and an
``nn.TransformerEncoder`` holding it stops packing padded batches into nested
tensors (torch's fused path, whose outputs at padded positions are zeros; the
module path computes them, as in training).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SplitHeadsEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always computes through its modules (``self_attn``, a
    ``SplitHeadsAttention``, then the feed-forward block), as torch's layer does in training: never through
    torch's fused inference op, which reads the attention's weights itself and breaks once heads are gone."""

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


class SplitHeadsAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same parameters, options and results) computed as one fused projection
    split by ``split_size``, heads of ``head_dim``, scaled dot-product attention and ``out_proj``.

    After ``compact`` has removed heads (and maybe input channels), ``embed_dim`` is the width of the input
    and output, ``split_size`` that of each of q, k and v (``num_heads * head_dim``), which may differ."""

    split_size: int

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        # as torch: the hint replaces the mask only where scaled_dot_product_attention alone applies it
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None

        def batch_first(x: torch.Tensor) -> torch.Tensor:      # (batch, length, channels)
            if not batched:
                return x.unsqueeze(0)
            return x if self.batch_first else x.transpose(0, 1)

        if self._qkv_same_embed_dim and query is key and key is value:
            q, k, v = F.linear(batch_first(query), self.in_proj_weight, self.in_proj_bias).split(self.split_size, -1)
        else:   # with kdim or vdim, three weights (and one bias)
            w = self.in_proj_weight.split(self.split_size) if self._qkv_same_embed_dim else (
                self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            b = self.in_proj_bias.split(self.split_size) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = (F.linear(batch_first(x), *wb) for x, *wb in zip((query, key, value), w, b))
        n, length, source = q.shape[0], q.shape[1], k.shape[1]
        if self.bias_k is not None:     # one more key and value, the same for every batch entry (torch's order)
            k, v = (torch.cat([t, b.expand(n, 1, -1)], 1) for t, b in ((k, self.bias_k), (v, self.bias_v)))
        q, k, v = (t.view(n, t.shape[1], -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:          # then one key and value of zeros in every head
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
        mask = self._mask(attn_mask, key_padding_mask, n, length, source)
        if mask is not None and k.shape[2] > source:    # the keys added are never masked
            mask = F.pad(mask, (0, k.shape[2] - source))

        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights and self.training:
            # torch's way, so that the weights returned are those (after dropout) that make the output
            out, weights = _attention_by_hand(q, k, v, mask, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)
            if need_weights:     # beside it: channel analysis follows the attention, not these products
                _, weights = _attention_by_hand(q, k, v, mask, 0.0)
        out = F.linear(out.transpose(1, 2).reshape(n, length, -1), self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), weights.squeeze(0) if weights is not None else None
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, length: int,
              source: int) -> torch.Tensor | None:
        """The float masks as one additive mask broadcast over (batch, heads, length, source)."""
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (length, source):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                       f"{(length, source)}.")
                mask = attn_mask
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (n * self.num_heads, length, source):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                       f"{(n * self.num_heads, length, source)}.")
                mask = attn_mask.view(n, -1, length, source)     # one per head
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if key_padding_mask is not None:
            padding = key_padding_mask.reshape(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    def resize(self) -> None:
        """Set the size attributes from the weights (after ``compact`` has cut heads or channels)."""
        if self._qkv_same_embed_dim:
            self.split_size = self.in_proj_weight.shape[0] // 3
            self.embed_dim = self.kdim = self.vdim = self.in_proj_weight.shape[1]
        else:
            self.split_size = self.q_proj_weight.shape[0]
            self.embed_dim, self.kdim, self.vdim = (w.shape[1] for w in (
                self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
        self.num_heads = self.split_size // self.head_dim


def _attention_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its weights per head, as ``F.multi_head_attention_forward`` computes them with weights."""
    scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return weights @ v, weights


def why_not_split(module: nn.MultiheadAttention, parent: nn.Module | None = None) -> str:
    """Why ``module`` keeps torch's class ("" if ``split_attention_heads`` converts it)."""
    if (module.bias_k is None) != (module.bias_v is None):
        return "it has only one of bias_k and bias_v"
    if isinstance(parent, nn.TransformerEncoderLayer) and type(parent) is not nn.TransformerEncoderLayer:
        return f"it is the attention of {type(parent).__name__}, a subclass of nn.TransformerEncoderLayer"
    return ""


def split_attention_heads(model: nn.Module) -> list[str]:
    """Make every ``nn.MultiheadAttention`` of ``model`` (the module itself too) that ``why_not_split``
    allows a ``SplitHeadsAttention``, in place; returns their names."""
    parents = {id(child): m for m in model.modules() for child in m.children()}
    found = []
    for name, module in model.named_modules():
        parent = parents.get(id(module))
        if type(module) is nn.MultiheadAttention and not why_not_split(module, parent):
            module.__class__ = SplitHeadsAttention
            module.split_size = module.embed_dim
            found.append(name)
            if type(parent) is nn.TransformerEncoderLayer and parent.self_attn is module:
                parent.__class__ = SplitHeadsEncoderLayer
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(isinstance(m, SplitHeadsEncoderLayer)
                                                              for m in module.layers):
            module.use_nested_tensor = False
    return found
