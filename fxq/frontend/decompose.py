"""Opaque attention blocks rewritten into traceable ones, so their projections become int8 linear layers.

Two common blocks hide their linear layers from torch.fx: `nn.MultiheadAttention` is a leaf (its forward
is full of shape checks), and torchvision's Swin `ShiftedWindowAttention` calls a function registered
with `torch.fx.wrap`, so the graph holds one opaque call with the weights as arguments. In ViT-B/16 that
keeps 12 of 38 linear layers float, in Swin-T 24 of 53. Each eligible block is replaced, in fxq's own
copy of the model, by an equivalent whose projections are ordinary `nn.Linear` modules and whose
shape-dependent parts stay in small wrapped functions that run in float. The replacement must reproduce
the model's outputs on the example inputs (else it is undone and the block stays as it was).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fxq.frontend.graph import replace_module


@dataclass(frozen=True)
class Decomposition:
    """One block considered: its module name, the rewrite, and whether it was kept."""

    module: str
    kind: str
    applied: bool = True


class SelfAttention(nn.Module):
    """`nn.MultiheadAttention` used as self-attention without masks: in_proj and out_proj as nn.Linear,
    the attention itself as `scaled_dot_product_attention` (float). Returns (output, None) like the
    original with need_weights=False."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        embed = attention.embed_dim
        self.num_heads = attention.num_heads
        self.batch_first = attention.batch_first
        self.in_proj = nn.Linear(embed, 3 * embed, bias=attention.in_proj_bias is not None)
        self.in_proj.weight = attention.in_proj_weight
        if attention.in_proj_bias is not None:
            self.in_proj.bias = attention.in_proj_bias
        self.out_proj = nn.Linear(embed, embed, bias=attention.out_proj.bias is not None)
        self.out_proj.weight = attention.out_proj.weight
        if attention.out_proj.bias is not None:
            self.out_proj.bias = attention.out_proj.bias

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)
        qkv = self.in_proj(x)
        attended = _multi_head_attention(qkv, self.num_heads)
        output = self.out_proj(attended)
        return (output if self.batch_first else output.transpose(0, 1)), None


def _multi_head_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """(batch, tokens, 3 * embed) projections -> (batch, tokens, embed) attention output."""
    batch, tokens, triple = qkv.shape
    head_dim = triple // (3 * num_heads)
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    attended = F.scaled_dot_product_attention(q, k, v)
    return attended.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)


torch.fx.wrap("_multi_head_attention")


def _self_attention_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call of a MultiheadAttention module that `SelfAttention` computes exactly."""
    query, key, value = (list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value")])[:3]
    if not (isinstance(query, fx.Node) and query is key and key is value):
        return False
    options = dict(zip(("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"),
                       node.args[3:]))
    options.update(node.kwargs)
    if options.get("key_padding_mask") is not None or options.get("attn_mask") is not None \
            or options.get("is_causal", False):
        return False
    # the weights output must be unused when they are requested
    if options.get("need_weights", True):
        return all(user.target is operator.getitem and user.args[1] == 0 for user in node.users)
    return True


def _mha_eligible(attention: nn.Module) -> bool:
    return isinstance(attention, nn.MultiheadAttention) and attention._qkv_same_embed_dim \
        and attention.bias_k is None and not attention.add_zero_attn and not attention.training


# --- torchvision Swin (v1) window attention --------------------------------------------------------

def _swin_partition(x: Tensor, window_size: List[int], shift_size: List[int]) -> Tensor:
    """Pad, shift and cut (B, H, W, C) into windows (B * windows, window tokens, C), as torchvision does."""
    _, height, width, channels = x.shape
    pad_r = (window_size[1] - width % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - height % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    batch, pad_h, pad_w, _ = x.shape
    shift = _effective_shift(window_size, shift_size, pad_h, pad_w)
    if shift[0] + shift[1] > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(batch, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, window_size[0] * window_size[1], channels)


def _effective_shift(window_size: List[int], shift_size: List[int], pad_h: int, pad_w: int) -> List[int]:
    shift = [shift_size[0], shift_size[1]]
    if window_size[0] >= pad_h:
        shift[0] = 0
    if window_size[1] >= pad_w:
        shift[1] = 0
    return shift


def _padded(x: Tensor, window_size: List[int]) -> List[int]:
    height, width = x.shape[1], x.shape[2]
    return [height + (window_size[0] - height % window_size[0]) % window_size[0],
            width + (window_size[1] - width % window_size[1]) % window_size[1]]


def _swin_window_attention(qkv: Tensor, relative_position_bias: Tensor, x: Tensor, window_size: List[int],
                           shift_size: List[int], num_heads: int) -> Tensor:
    """Attention inside each window (relative position bias, shifted-window mask) on the qkv projections."""
    channels = x.shape[3]
    pad_h, pad_w = _padded(x, window_size)
    shift = _effective_shift(window_size, shift_size, pad_h, pad_w)
    windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    tokens = qkv.size(1)
    qkv = qkv.reshape(qkv.size(0), tokens, 3, num_heads, channels // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (channels // num_heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if shift[0] + shift[1] > 0:
        attn_mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], pad_h))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], pad_w))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0]: h[1], w[0]: w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(qkv.size(1) // windows, windows, num_heads, tokens, tokens)
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.softmax(attn, dim=-1)
    return attn.matmul(v).transpose(1, 2).reshape(qkv.size(1), tokens, channels)


def _swin_merge(windows: Tensor, x: Tensor, window_size: List[int], shift_size: List[int]) -> Tensor:
    """Windows back to (B, H, W, C): the inverse of `_swin_partition`."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = _padded(x, window_size)
    shift = _effective_shift(window_size, shift_size, pad_h, pad_w)
    out = windows.view(batch, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1],
                       channels)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    if shift[0] + shift[1] > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()


for _name in ("_swin_partition", "_swin_window_attention", "_swin_merge"):
    torch.fx.wrap(_name)


def _swin_class() -> type | None:
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
    except ImportError:
        return None
    return ShiftedWindowAttention


@functools.lru_cache(maxsize=None)
def _window_attention_class(base: type) -> type:
    class WindowAttention(base):  # type: ignore[misc, valid-type]
        """torchvision's ShiftedWindowAttention with qkv and proj called as modules."""

        def forward(self, x: Tensor) -> Tensor:
            relative_position_bias = self.get_relative_position_bias()
            windows = _swin_partition(x, self.window_size, self.shift_size)
            attended = _swin_window_attention(self.qkv(windows), relative_position_bias, x, self.window_size,
                                              self.shift_size, self.num_heads)
            return _swin_merge(self.proj(attended), x, self.window_size, self.shift_size)

    return WindowAttention


def _decomposed_swin(original: nn.Module) -> nn.Module:
    """The same module (parameters shared) with a forward whose qkv and proj are module calls."""
    cls = _window_attention_class(type(original))
    replacement = cls.__new__(cls)
    replacement.__dict__ = dict(original.__dict__)
    return replacement


def may_decompose(model: nn.Module) -> bool:
    """Whether `model` holds a block `decompose_attention` knows (cheap: no tracing, no forward)."""
    swin = _swin_class()
    return any(isinstance(m, nn.MultiheadAttention) or (swin is not None and type(m) is swin)
               for m in model.modules())


def decompose_attention(model: nn.Module, gm: fx.GraphModule,
                        same_outputs: Callable[[], bool]) -> list[Decomposition]:
    """Replace eligible attention blocks of `model` (fxq's working copy) in place; returns what changed.

    `gm` is `model` traced, for the call sites; `same_outputs()` reruns the model on the example inputs
    and says whether it still computes what it did before. The caller re-traces when anything changed.
    """
    candidates: dict[str, tuple[nn.Module, nn.Module, str]] = {}
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    for name, nodes in calls.items():
        module = gm.get_submodule(name)
        if _mha_eligible(module) and all(_self_attention_call(gm, node) for node in nodes):
            candidates[name] = (module, SelfAttention(module), "MultiheadAttention -> in_proj/out_proj Linear")
    swin = _swin_class()
    if swin is not None:
        for name, module in model.named_modules():
            if type(module) is swin and not module.training:
                candidates[name] = (module, _decomposed_swin(module),
                                    "ShiftedWindowAttention -> qkv/proj Linear calls")
    if not candidates:
        return []
    for name, (_, replacement, _) in candidates.items():
        replace_module(model, name, replacement)
    applied = same_outputs()
    if not applied:  # undone, and reported: the blocks stay opaque (their linear layers float)
        for name, (original, _, _) in candidates.items():
            replace_module(model, name, original)
    return [Decomposition(name, kind, applied) for name, (_, _, kind) in candidates.items()]
