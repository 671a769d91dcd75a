"""The lmcycle transformer: a decoder-only, Llama-style language model, readable top to bottom.

Token embedding → N × [RMSNorm → grouped-query attention with rotary positions → RMSNorm → SwiGLU MLP] → RMSNorm →
LM head (optionally tied to the embedding). No biases. The math is exactly Hugging Face's `LlamaForCausalLM`
(rotate-half RoPE, grouped-query attention, fp32 RMSNorm), so export is a renaming of tensors.

The layout is ours, for speed on CPU as much as on GPU: one fused QKV matmul and one fused gate/up matmul per
block, RoPE tables built once, key/value heads shared inside SDPA instead of copied, and a loss that computes its
gradient chunk by chunk in the forward pass (never holding the whole batch's full-vocabulary logits). Apart from
the matmuls, training time goes to memory-bound elementwise passes, so the few layers where autograd makes many
of them (RMSNorm, RoPE with the head split, SwiGLU, the loss) have hand-written gradients; they sit at the end of
this file, each next to the plain function it differentiates, and inference calls the plain functions directly.
Decoding one token at a time has its own path at the very end (`Decoder`): the same math over the same KV cache,
laid out for a single query, where per-operation overhead rather than arithmetic sets the speed.

The model knows nothing of training, logging, checkpoints or parallelism: those live in `lmcore.train`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lmcore.errors import ConfigError

# Torch's exp, log, sin, cos, tanh … run on MKL's vector math on x86 CPUs, which sets itself up on its first call.
# When that first call is a parallel op, one thread can start before the setup is done and compute with less
# accuracy: on 2 threads, about 1 process in 6 built RoPE cosines off by ~1e-4 in the half one thread computed, so
# two runs with one seed trained differently. One call on a single element does the setup on this thread first.
torch.ones(1).exp()

IGNORE_INDEX = -100

PRESETS: dict[str, dict] = {
    # A few million parameters (3.95M at a 4096-token vocabulary): trains the whole lifecycle on 2 CPU cores.
    "cpu-demo": dict(n_layer=4, n_head=4, n_kv_head=2, d_model=256, d_ff=688, context_length=256),
    # GPT-2 small scale for one GPU: 124.7M parameters at GPT-2's 50,257-token vocabulary (d_ff sets the total).
    "gpt2-124m": dict(n_layer=12, n_head=12, n_kv_head=4, d_model=768, d_ff=2432, context_length=1024),
}


@dataclass
class ModelConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2
    d_model: int = 256
    d_ff: int = 688
    context_length: int = 256
    dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ConfigError(f"model head size d_model/n_head = {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_params(cls, params, vocab_size: int) -> ModelConfig:
        """Build from the `model` section of params.yaml: a preset, then any field given explicitly."""
        values = dict(PRESETS.get(params.preset, {}))
        for f in fields(cls):
            value = getattr(params, f.name, None)
            if value is not None and f.name != "vocab_size":
                values[f.name] = value
        required = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "context_length")
        missing = [k for k in required if k not in values]
        if missing:
            raise ConfigError(f"model.{missing[0]}: must be set when model.preset is custom")
        return cls(vocab_size=vocab_size, **values)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, embedding: bool = True) -> int:
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_head + 2 * self.n_kv_head) * hd + self.n_head * hd * d
        mlp = 3 * d * self.d_ff
        block = attn + mlp + 2 * d
        body = self.n_layer * block + d
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return body + head + (emb if embedding else 0)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 × matmul parameters + attention scores and values.

        The embedding lookup does no matmul work; the LM head does, tied or not.
        """
        t = seq_len or self.context_length
        tied_head = self.vocab_size * self.d_model if self.tie_embeddings else 0  # an untied head is in num_params
        matmul_params = self.num_params(embedding=False) + tied_head
        attention = 12 * self.n_layer * self.d_model * t / 2  # causal: half of the T×T scores are computed usefully
        return 6 * matmul_params + attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Llama does) so bf16 training stays stable.
        y = x if x.dtype == torch.float32 else x.float()
        if _custom_grad(y, self.weight):
            y = RMSNormFunction.apply(y, self.weight, self.eps)
        else:
            y = rms_norm(y, self.weight, self.eps)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, (length, head_dim / 2): Llama's frequencies (each serves two dims)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


class KVCache:
    """Keys and values of past positions, preallocated: decoding writes one position per step, in place.

    One tensor holds every layer, with a position's key and value side by side, (layers, B, kv heads, max_len,
    2, head_dim), so a Decoder step stores both with one copy; `keys[layer]` and `values[layer]` are views.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype) -> None:
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, 2, config.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.keys, self.values = list(self.kv.select(4, 0)), list(self.kv.select(4, 1))
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def reorder(self, index: torch.Tensor) -> None:
        """Rows in a new order (index has one entry per row), in place: views of the cache stay valid."""
        self.kv.copy_(self.kv.index_select(1, index))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.d_model, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=False)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        split = SplitRotaryFunction.apply if _custom_grad(qkv) else split_heads_rotary
        q, k, v = split(qkv, cos, sin, self.n_head, self.n_kv_head)  # each (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,  # each key/value head serves its group without copies
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up computed by one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        return self.down(SwiGLUFunction.apply(gate_up) if _custom_grad(gate_up) else swiglu(gate_up))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask=None, cache=None, start=0) -> torch.Tensor:
        x = x + self._drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, start))
        return x + self._drop(self.mlp(self.mlp_norm(x)))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Not even called at p = 0: a no-op dropout still costs time on every decoded token.
        return F.dropout(x, self.dropout) if self.dropout and self.training else x


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("proj.weight", "down.weight")):
                # Residual-branch outputs scaled down with depth (GPT-2), so the residual stream starts calm.
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normalised hidden states, (B, T, d_model).

        `segment_ids` (B, T) marks the documents packed into a row (1, 2, …; 0 for padding): each token attends
        only to earlier tokens of its own document, and positions restart at every document, so a packed document
        is computed exactly as it would be alone.
        """
        B, T = input_ids.shape
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.config.context_length}")
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("segment_ids stand for the attention mask and do not go with a KV cache")
            position_ids = position_ids if position_ids is not None else segment_positions(segment_ids)
            mask = self._segment_mask(segment_ids)
        else:
            mask = self._mask(attention_mask, T, start, input_ids.device)
        if position_ids is None:  # (T, 1, head_dim / 2): broadcast over batch and heads
            cos, sin = self.rope_cos[start : start + T, None], self.rope_sin[start : start + T, None]
        else:  # per-row positions, e.g. left-padded batches: (B, T, 1, head_dim / 2)
            cos, sin = self.rope_cos[position_ids].unsqueeze(2), self.rope_sin[position_ids].unsqueeze(2)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache, start)
        return self.norm(x)

    def _mask(self, attention_mask, T: int, start: int, device) -> torch.Tensor | None:
        """None for the plain causal case (SDPA's fast path); else a boolean (B|1, 1, T, start+T) mask."""
        if attention_mask is None and (start == 0 or T == 1):
            return None
        S = start + T
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)
        if attention_mask is None:
            return causal[None, None]
        keys = attention_mask[:, :S].bool()[:, None, None, :]
        mask = causal[None, None] & keys
        # A fully padded query row would give NaN; let it attend to itself so outputs stay finite.
        eye = torch.zeros(T, S, dtype=torch.bool, device=device)
        eye[torch.arange(T), torch.arange(start, S)] = True
        return mask | (~mask.any(-1, keepdim=True) & eye)

    @staticmethod
    def _segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, T) boolean: causal within each document. A padding token (segment 0) sees the pads before it
        and itself, so no row of the mask is empty."""
        T = segment_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        return (same & causal)[:, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) without targets; with targets (B, T), the mean next-token loss (IGNORE_INDEX skips)."""
        h = self.hidden_states(input_ids, attention_mask, cache, start, position_ids, segment_ids)
        if targets is None:
            return self.lm_head(h)
        return chunked_cross_entropy(h, self.lm_head.weight, targets)

    def token_losses(self, input_ids: torch.Tensor, targets: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """Per-token NLL in nats (B, T), 0 where the target is IGNORE_INDEX: for perplexity and bits-per-byte."""
        h = self.hidden_states(input_ids, attention_mask)
        return chunked_cross_entropy(h, self.lm_head.weight, targets, reduction="none")


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own document: (B, T), restarting at 0 wherever the segment id changes."""
    T = segment_ids.shape[1]
    index = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # latest document start
    return index - first


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 512, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the logits `h @ weight.T` against targets (IGNORE_INDEX skipped), a chunk of rows at a time.

    Full-vocabulary logits of the whole batch are never alive at once. When a gradient is wanted (mean
    reduction), it is computed in the forward pass chunk by chunk, so each chunk's logits are made once and
    never recomputed (LinearCrossEntropyFunction). Chunks of 512 rows measured fastest on CPU (256-1024 alike,
    2048 and more slower).
    """
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if reduction == "mean" and torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(flat_h, weight, flat_t, chunk)
    acc = torch.promote_types(h.dtype, torch.float32)
    pieces = [
        F.cross_entropy(
            (flat_h[i : i + chunk] @ weight.t()).to(acc),
            flat_t[i : i + chunk],
            ignore_index=IGNORE_INDEX,
            reduction="none" if reduction == "none" else "sum",
        )
        for i in range(0, flat_h.shape[0], chunk)
    ]
    if reduction == "none":
        return torch.cat(pieces).view(targets.shape)
    return torch.stack(pieces).sum() / (flat_t != IGNORE_INDEX).sum().clamp(min=1)


# --- hand-written gradients ----------------------------------------------------------------------------------
# Each plain function below is the math: what inference runs, and what torch.compile sees (it derives and fuses
# the backward itself). The autograd Function next to it computes the same forward in eager training, with a
# backward that makes fewer passes over memory than autograd's. tests/test_model.py checks them against autograd
# (gradcheck) and the whole model against transformers.


def _custom_grad(*tensors: torch.Tensor) -> bool:
    """Use a hand-written backward: eager mode, with a gradient to compute."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * _rstd(x, eps) * weight


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Llama's mean of squares (as sum / n: faster on CPU), with no matmul-like op that autocast would run in bf16.
    return torch.rsqrt(x.square().sum(-1, keepdim=True) / x.shape[-1] + eps)


class RMSNormFunction(torch.autograd.Function):
    """About seven passes over the activations, where autograd's decomposition makes about fifteen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = _rstd(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_times_x = grad * x
        # d/dx of weight·x·rstd(x) = weight·g·rstd − x·rstd³·mean(weight·g·x)
        coef = (grad_times_x * weight).sum(-1, keepdim=True).mul_(rstd.pow(3)).div_(x.shape[-1])
        grad_x = (grad * weight).mul_(rstd).addcmul_(x, coef, value=-1)
        grad_weight = grad_times_x.mul_(rstd).flatten(0, -2).sum(0)
        return grad_x, grad_weight, None


def split_heads_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv_head: int):
    """Queries and keys rotated by their positions' angles, and values, each as (B, heads, T, head_dim).

    qkv is the fused projection viewed as (B, T, n_head + 2·n_kv_head, head_dim); cos and sin broadcast to
    (B, T, 1, head_dim / 2). Llama's rotate-half convention: each head's halves (x1, x2) become
    (x1·cos − x2·sin, x2·cos + x1·sin). Queries and keys rotate together, in one pass.
    """
    qk, v = qkv.split([n_head + n_kv_head, n_kv_head], dim=2)
    x1, x2 = qk.chunk(2, dim=-1)
    qk = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    q, k = qk.transpose(1, 2).split([n_head, n_kv_head], dim=1)
    return q, k, v.transpose(1, 2)


class SplitRotaryFunction(torch.autograd.Function):
    """The forward writes q, k and v into one buffer (two fused passes for the rotation); the backward rotates by
    the opposite angle straight into one gradient buffer, where autograd would split, concatenate and zero-fill
    the full-size gradient several times."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head: int, n_kv_head: int):
        ctx.save_for_backward(cos, sin)
        ctx.sizes = [n_head, n_kv_head, n_kv_head]
        n_rot = n_head + n_kv_head
        out = torch.empty_like(qkv)
        _rotate_into(out[:, :, :n_rot], qkv[:, :, :n_rot], cos, sin)
        out[:, :, n_rot:] = qkv[:, :, n_rot:]
        return out.transpose(1, 2).split(ctx.sizes, dim=1)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        grads = [g.transpose(1, 2) if g is not None else None for g in (grad_q, grad_k, grad_v)]
        like = next(g for g in grads if g is not None)
        make = torch.empty if all(g is not None for g in grads) else torch.zeros
        grad = make((*like.shape[:2], sum(ctx.sizes), like.shape[-1]), dtype=like.dtype, device=like.device)
        dest_q, dest_k, dest_v = grad.split(ctx.sizes, dim=2)
        if grads[0] is not None:
            _rotate_into(dest_q, grads[0], cos, -sin)
        if grads[1] is not None:
            _rotate_into(dest_k, grads[1], cos, -sin)
        if grads[2] is not None:
            dest_v.copy_(grads[2])
        return grad, None, None, None, None


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    x1, x2 = x.chunk(2, dim=-1)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)  # x1·cos − x2·sin
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)  # x2·cos + x1·sin


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLUFunction(torch.autograd.Function):
    """The backward writes both halves' gradients into one buffer instead of concatenating them."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_gate_up


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` whose gradients are computed in the forward pass, chunk by chunk.

    For each chunk: logits → log-softmax → loss; then softmax − one-hot (in place) is the gradient of the
    logits, pushed straight through the two matmuls into dL/dh and dL/dweight; backward only scales them. The
    same matmuls as autograd, without a second forward through the LM head (checkpointing) or the several
    vocabulary-sized buffers of autograd's log-softmax/NLL backward. Under torch.compile (which would not chunk
    the logits by itself) and autocast, the chunks are plain ops; in eager fp32 they are written in place.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax and sums in fp32 at least
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        safe_targets = targets.clamp(min=0).unsqueeze(1)
        in_place = h.dtype == acc and not torch.compiler.is_compiling()
        if in_place and h.device.type == "cpu" and bool(count == targets.numel()):
            valid = None  # every target counts (pretraining): nothing to mask; asking costs no device sync on CPU
        # Rows with an ignored target get no gradient: masking the small (rows, d_model) operands of the
        # matmuls is cheaper than masking the (rows, vocab) logits.
        h_valid = h if valid is None else h * valid.unsqueeze(1).to(h.dtype)
        if in_place:
            grad_h, grad_weight, total = _linear_cross_entropy_in_place(h, h_valid, weight, safe_targets, valid, chunk)
        else:
            grad_h, grad_weight, total = _linear_cross_entropy_chunks(h, h_valid, weight, safe_targets, valid, chunk)
        ctx.save_for_backward(grad_h, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_h * scale.to(grad_h.dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None


def _linear_cross_entropy_chunks(
    h: torch.Tensor,
    h_valid: torch.Tensor,
    weight: torch.Tensor,
    safe_targets: torch.Tensor,
    valid: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed loss and unscaled gradients, chunk by chunk, in plain ops (what torch.compile and autocast see)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    grad_h = []
    grad_weight = torch.zeros_like(weight, dtype=acc)
    total = torch.zeros((), dtype=acc, device=h.device)
    for i in range(0, h.shape[0], chunk):
        hc, tc, vc = h[i : i + chunk], safe_targets[i : i + chunk], valid[i : i + chunk]
        logits = (hc @ weight.t()).to(acc)
        logprobs = torch.log_softmax(logits, dim=-1)
        total = total - logprobs.gather(1, tc).squeeze(1).masked_fill(~vc, 0.0).sum()
        grad_logits = logprobs.exp().scatter_add(1, tc, torch.full_like(tc, -1, dtype=acc)).to(h.dtype)
        grad_h.append((grad_logits @ weight.to(h.dtype)).masked_fill(~vc.unsqueeze(1), 0.0))
        grad_weight = grad_weight.addmm(grad_logits.t(), h_valid[i : i + chunk].to(acc))
    return torch.cat(grad_h), grad_weight, total


def _linear_cross_entropy_in_place(
    h: torch.Tensor,
    h_valid: torch.Tensor,
    weight: torch.Tensor,
    safe_targets: torch.Tensor,
    valid: torch.Tensor | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same sums in eager fp32, every chunk's logits in one reused buffer and each result written in place
    (valid None: every target counts).

    Fresh vocabulary-sized buffers per chunk cost page faults (the allocator hands large blocks back to the
    system), which made the logits matmul a third slower than the same matmul into warm memory.
    """
    grad_h = torch.empty_like(h)
    grad_weight = torch.empty_like(weight)
    total = torch.zeros((), dtype=h.dtype, device=h.device)
    buffer = h.new_empty(min(chunk, h.shape[0]), weight.shape[0])
    minus_one = h.new_full((buffer.shape[0], 1), -1.0)
    for i in range(0, h.shape[0], chunk):
        hc, tc = h[i : i + chunk], safe_targets[i : i + chunk]
        logits = buffer[: hc.shape[0]]
        torch.log_softmax(torch.mm(hc, weight.t(), out=logits), dim=-1, out=logits)  # log-probabilities
        picked = logits.gather(1, tc).squeeze(1)
        grad_logits = logits.exp_().scatter_add_(1, tc, minus_one[: hc.shape[0]])  # softmax − one-hot
        grad_hc = torch.mm(grad_logits, weight, out=grad_h[i : i + chunk])
        if valid is not None:
            ignored = ~valid[i : i + chunk]
            picked.masked_fill_(ignored, 0.0)
            grad_hc.masked_fill_(ignored.unsqueeze(1), 0.0)
        total -= picked.sum()
        if i == 0:
            torch.mm(grad_logits.t(), h_valid[:chunk], out=grad_weight)
        else:
            grad_weight.addmm_(grad_logits.t(), h_valid[i : i + chunk])
    return grad_h, grad_weight, total


# --- decoding one token at a time -----------------------------------------------------------------------------


class Decoder:
    """Next-token logits for one new token per row, over a KVCache the model's forward pass has filled.

    The same math as `Transformer.forward` on a single position, in far fewer operations: at a few million
    parameters a decoded token costs more in per-operation overhead than in arithmetic. Rows are (B, d_model)
    matrices throughout; the fused QKV weight is regrouped so that each key/value head sits after the query heads
    it serves, which lets the queries of a group attend with two batched matmuls over that group's cached keys
    (no copies of key/value heads, no causal mask: the one query sees every cached position); RoPE, the attention
    scale, and the pass-through of values are one multiply-add against tables built once; residual
    additions ride on the output matmuls (addmm). `tests/test_model.py` checks it against the full forward.
    """

    def __init__(self, model: Transformer, cache: KVCache, positions: torch.Tensor, key_mask=None) -> None:
        """positions: the RoPE position of each cache column, (B or 1, cache.max_len); key_mask: (B, max_len), 0 for
        padding columns no query may see (None: every column is a real token)."""
        c = model.config
        if positions.shape[-1] != cache.max_len or cache.max_len > c.context_length:
            raise ValueError(f"positions must cover the KV cache, which must fit the context ({c.context_length})")
        self.n_kv_head, self.group, self.head_dim, self.d_ff = c.n_kv_head, c.n_head // c.n_kv_head, c.head_dim, c.d_ff
        self.norm_dtype = None if model.lm_head.weight.dtype == torch.float32 else torch.float32
        self.eps = torch.tensor(c.norm_eps, device=positions.device)
        self.embed, self.final_norm, self.lm_head = model.embed.weight, model.norm.weight, model.lm_head.weight
        self.layers = [self._layer_weights(block, i, cache) for i, block in enumerate(model.blocks)]
        self.cos, self.sin = self._rotation_tables(model, positions)
        self.bias = None
        if key_mask is not None:  # -inf on padding columns, one row per (row, key/value head) like the scores
            bias = torch.zeros(key_mask.shape, dtype=self.cos.dtype, device=key_mask.device)
            bias = bias.masked_fill(key_mask == 0, float("-inf"))
            self.bias = bias[:, None, None].expand(-1, c.n_kv_head, 1, -1).reshape(-1, 1, cache.max_len)

    def _layer_weights(self, block: Block, layer: int, cache: KVCache) -> tuple:
        """Weights as right-hand matmul operands (transposed views) and the layer's cache as (B·kv heads, len, dim)."""
        n_q, n_kv, hd = block.attn.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.head_dim
        q, k, v = block.attn.qkv.weight.split([n_q, n_kv, n_kv])
        # Rows regrouped per key/value head: [its queries, its key, its value].
        q, k, v = (t.view(self.n_kv_head, -1, hd, t.shape[-1]) for t in (q, k, v))
        qkv = torch.cat([q, k, v], dim=1)
        kv = cache.kv[layer]
        return (
            block.attn_norm.weight,
            qkv.flatten(0, 2).t(),
            block.attn.proj.weight.t(),
            block.mlp_norm.weight,
            block.mlp.gate_up.weight.t(),
            block.mlp.down.weight.t(),
            kv,
            kv.flatten(0, 1).select(2, 0).transpose(1, 2),  # keys, (B·kv heads, head_dim, len)
            kv.flatten(0, 1).select(2, 1),  # values, (B·kv heads, len, head_dim)
        )

    def _rotation_tables(self, model: Transformer, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per cache column, (columns, B or 1, 1, group + 2, 2, head_dim / 2) factors such that
        `x·cos + swap_halves(x)·sin` is rotate-half RoPE on the queries (scaled by 1/√head_dim for attention) and
        on the key, and leaves the value as it is."""
        dtype = model.lm_head.weight.dtype
        cos = model.rope_cos[positions.t()][:, :, None, None, None, :]  # (columns, B, 1, 1, 1, head_dim / 2)
        sin = model.rope_sin[positions.t()][:, :, None, None, None, :]
        row_scale = torch.tensor([self.head_dim**-0.5] * self.group + [1.0, 0.0], device=positions.device)
        row_scale = row_scale[:, None, None]  # queries, key, value
        half_sign = torch.tensor([-1.0, 1.0], device=positions.device)[:, None]  # (x1, x2) → (x1·c − x2·s, x2·c + x1·s)
        is_value = row_scale == 0
        return (cos * row_scale + is_value).to(dtype), (sin * row_scale * half_sign).to(dtype)

    def __call__(self, tokens: torch.Tensor, column: int) -> torch.Tensor:
        """Logits (B, vocab) after `tokens` (B,) placed at cache column `column` (columns before it are filled)."""
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[column], self.sin[column]
        bias = None if self.bias is None else self.bias[:, :, : column + 1]
        for weights in self.layers:
            x = self._block(x, weights, column, cos, sin, bias)
        return torch.mm(self._norm(x, self.final_norm), self.lm_head.t())

    def _block(self, x, weights: tuple, column: int, cos, sin, bias) -> torch.Tensor:
        attn_norm, qkv_w, proj_w, mlp_norm, gate_up_w, down_w, kv, keys_t, values = weights
        B, n_kv, group, hd = x.shape[0], self.n_kv_head, self.group, self.head_dim
        qkv = torch.mm(self._norm(x, attn_norm), qkv_w).view(B, n_kv, group + 2, 2, hd // 2)
        qkv = torch.addcmul(qkv * cos, qkv.flip(-2), sin).view(B, n_kv, group + 2, hd)
        kv.select(2, column).copy_(qkv[:, :, group:])
        q = qkv[:, :, :group].view(B * n_kv, group, hd)  # a view: each key/value head's queries
        seen_keys = keys_t[:, :, : column + 1]
        scores = torch.bmm(q, seen_keys) if bias is None else torch.baddbmm(bias, q, seen_keys)
        y = torch.bmm(scores.softmax(-1), values[:, : column + 1]).view(B, -1)
        x = torch.addmm(x, y, proj_w)
        gate_up = torch.mm(self._norm(x, mlp_norm), gate_up_w)
        return torch.addmm(x, F.silu(gate_up[:, : self.d_ff]) * gate_up[:, self.d_ff :], down_w)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in fp32 with the mean of squares taken from the vector norm (one reduction instead of three)."""
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=self.norm_dtype)
        rstd = torch.rsqrt(torch.addcmul(self.eps, norm, norm, value=1 / x.shape[-1]))
        y = x * rstd * weight
        return y if self.norm_dtype is None else y.to(x.dtype)
