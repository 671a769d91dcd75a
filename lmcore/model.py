"""The lmcycle transformer: a decoder-only, Llama-style language model, readable top to bottom as its math.

Token embedding → N × [RMSNorm → grouped-query attention with rotary positions → RMSNorm → SwiGLU MLP] → RMSNorm →
LM head (optionally tied to the embedding). The math is exactly Hugging Face's `LlamaForCausalLM` (rotate-half
RoPE, grouped-query attention, fp32 RMSNorm), so export is a renaming of tensors. By default there are no biases
and plain RoPE; the Llama-family variants lmcore runs natively are config fields: scaled RoPE frequencies
(`rope_scaling`: llama3, linear, dynamic), projection biases (Qwen2's q/k/v, Llama's `attention_bias` and
`mlp_bias`), a head size other than d_model / n_head, and sliding-window attention on some or all layers
(Mistral, Qwen2).

The layout is ours, for speed on CPU as much as on GPU: one fused QKV matmul and one fused gate/up matmul per
block, RoPE tables built once, key/value heads shared inside SDPA instead of copied, and a loss computed a chunk of
rows at a time (never holding the whole batch's full-vocabulary logits). Each layer's math is a plain function
(`rms_norm`, `split_heads_rotary`, `swiglu`, `chunked_cross_entropy`) called from one small method; training swaps
in hand-written gradients for those methods once (`lmcore.kernels.use_fast_kernels`), so no forward here branches
on how it is differentiated. Decoding (the KV cache, the single-token step, sampling) lives in `lmcore.engine`.

The model knows nothing of training, logging, checkpoints or parallelism: those live in `lmcore.train`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmcore.errors import ConfigError
from lmcore.rope import ROPE_TYPES, RopeScaling, scaled_frequencies

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


VARIANT_FIELDS = ("head_dim", "rope_scaling", "attention_bias", "attention_out_bias", "mlp_bias", "sliding_window")
VARIANT_FIELDS += ("sliding_window_from_layer", "architecture")


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
    # Llama-family variants (the defaults are the plain model above; see README "Bringing your own model").
    head_dim: int | None = None  # None: d_model / n_head
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # biases on the q, k and v projections
    attention_out_bias: bool = False  # a bias on the output projection
    mlp_bias: bool = False  # biases on gate, up and down
    sliding_window: int | None = None  # a query sees itself and the sliding_window − 1 tokens before it …
    sliding_window_from_layer: int = 0  # … in layers from this index on (Qwen2's max_window_layers)
    architecture: str = "llama"  # the Hugging Face model_type the weights come from and are exported as

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ConfigError(f"model head size {self.head_dim} must be even for rotary embeddings")
        if isinstance(self.rope_scaling, dict):  # as to_dict wrote it
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ConfigError(f"model rope_scaling type {self.rope_scaling.rope_type!r} is not one of {ROPE_TYPES}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model sliding_window ({self.sliding_window}) must be at least 1")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: it attends to every earlier token)."""
        return self.sliding_window if layer >= self.sliding_window_from_layer else None

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
        """Every field, less the Llama-family variants left at their defaults (a plain model's record is as
        before they existed); `ModelConfig(**to_dict())` gives the config back."""
        defaults = {f.name: f.default for f in fields(self) if f.name in VARIANT_FIELDS}
        defaults["head_dim"] = self.d_model // self.n_head
        return {k: v for k, v in asdict(self).items() if k not in defaults or v != defaults[k]}

    def num_params(self, embedding: bool = True) -> int:
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_head + 2 * self.n_kv_head) * hd + self.n_head * hd * d
        attn += (self.n_head + 2 * self.n_kv_head) * hd * self.attention_bias + d * self.attention_out_bias
        mlp = 3 * d * self.d_ff + (2 * self.d_ff + d) * self.mlp_bias
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


# --- normalisation ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Llama does) so bf16 training stays stable.
        y = self.normalize(x if x.dtype == torch.float32 else x.float())
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of an fp32 input."""
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * inverse_rms(x, eps) * weight


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Llama's mean of squares (as sum / n: faster on CPU), with no matmul-like op that autocast would run in bf16.
    return torch.rsqrt(x.square().sum(-1, keepdim=True) / x.shape[-1] + eps)


# --- rotary positions ------------------------------------------------------------------------------------------


def rope_tables(
    head_dim: int, length: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, (length, head_dim / 2): Llama's frequencies (each serves two dims)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = scaled_frequencies(inv_freq, scaling, length)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


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


# --- attention -------------------------------------------------------------------------------------------------


class Cache(Protocol):
    """What attention needs of a KV cache (`lmcore.engine.KVCache`): store a layer's new keys and values at
    `start` and return all of them so far."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.d_model, width, bias=config.attention_bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=config.attention_out_bias)
        self.dropout = config.dropout
        self.window = config.layer_window(layer)  # the model hands this layer the matching mask

    def forward(self, x, cos, sin, mask=None, cache: Cache | None = None, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = self.split_heads(qkv, cos, sin)  # each (B, heads, T, head_dim)
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

    def split_heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return split_heads_rotary(qkv, cos, sin, self.n_head, self.n_kv_head)


# --- MLP and block ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up computed by one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.d_ff, bias=config.mlp_bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.gate_up(x)))

    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate_up)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


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


# --- the language model ----------------------------------------------------------------------------------------


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
        cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
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
        cache: Cache | None = None,
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
        window_mask = self._window_mask(mask, T, start, input_ids.device)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask if block.attn.window is None else window_mask, cache, start)
        return self.norm(x)

    def _window_mask(self, mask: torch.Tensor | None, T: int, start: int, device) -> torch.Tensor | None:
        """`mask` (None: plain causal) narrowed to the sliding window: query column i sees key column j only when
        i − j < sliding_window, as transformers' sliding-window mask. Columns, not positions: a packed document
        starts at its own column, so it is the same thing there; left padding counts as in transformers."""
        window = self.config.sliding_window
        if window is None or start + T <= window:
            return mask
        S = start + T
        queries = torch.arange(start, S, device=device)[:, None]
        keys = torch.arange(S, device=device)[None, :]
        visible = (keys <= queries) & (queries - keys < window)
        return visible[None, None] if mask is None else mask & visible

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
        cache: Cache | None = None,
        start: int = 0,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) without targets; with targets (B, T), the mean next-token loss (IGNORE_INDEX skips)."""
        h = self.hidden_states(input_ids, attention_mask, cache, start, position_ids, segment_ids)
        if targets is None:
            return self.lm_head(h)
        return self.loss(h, targets)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the LM head's logits of hidden states `h` against `targets`."""
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

    Full-vocabulary logits of the whole batch are never alive at once (without a gradient to keep them for).
    Training computes the gradient of the mean chunk by chunk in the forward pass instead
    (`lmcore.kernels.fused_linear_cross_entropy`). Chunks of 512 rows measured fastest on CPU (256-1024 alike,
    2048 and more slower).
    """
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
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
