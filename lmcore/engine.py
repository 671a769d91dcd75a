"""Decoding: a KV cache, the single-token step over it, and the sampling loop, apart from the model.

The prompt runs once through the model's own forward pass (prefill), filling the cache; each step then feeds one
token per sequence through `Decoder`, the model's math on a single position laid out so that per-operation
overhead, which rather than arithmetic sets the speed there, stays low. Greedy decoding takes the argmax without
the sampling machinery. Several prompts, and several samples per prompt, decode together as one left-padded batch
(per-row positions and an attention mask keep padding invisible). The logits processing follows transformers'
order (repetition penalty, temperature, top-k, top-p), so settings mean the same in both. Everything random draws
from one `torch.Generator`, so a seed reproduces a sample exactly. Text around it lives in `lmcore.generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lmcore.model import Block, ModelConfig, Transformer, swiglu

# --- the KV cache and the single-token step -------------------------------------------------------------------


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


class LayerWeights(NamedTuple):
    """One block as the Decoder uses it: weights as right-hand matmul operands (transposed views), biases (None:
    absent), the layer's sliding window (None: none) and its cache views."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    proj: torch.Tensor
    proj_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    window: int | None
    kv: torch.Tensor
    keys_t: torch.Tensor
    values: torch.Tensor


class Decoder:
    """Next-token logits for one new token per row, over a KVCache the model's forward pass has filled.

    The same math as `Transformer.forward` on a single position, in far fewer operations: at a few million
    parameters a decoded token costs more in per-operation overhead than in arithmetic. Rows are (B, d_model)
    matrices throughout; the fused QKV weight is regrouped so that each key/value head sits after the query heads
    it serves, which lets the queries of a group attend with two batched matmuls over that group's cached keys
    (no copies of key/value heads, no causal mask: the one query sees every cached position); RoPE, the attention
    scale, and the pass-through of values are one multiply-add against tables built once; residual
    additions ride on the output matmuls (addmm). The model's own embedding, LM head and SwiGLU run as they are;
    its RMSNorm (one vector-norm reduction here) and attention (SDPA there) are not reused, because the model's
    versions round differently and decoded tokens would change. Projection biases, where a model has them, ride on
    the same matmuls; a sliding-window layer attends over the last `window` cache columns only (the cache keeps
    every column, so nothing is evicted). `tests/test_model.py` and `tests/test_hf_architectures.py` check it
    against the full forward.
    """

    def __init__(self, model: Transformer, cache: KVCache, positions: torch.Tensor, key_mask=None) -> None:
        """positions: the RoPE position of each cache column, (B or 1, cache.max_len); key_mask: (B, max_len), 0 for
        padding columns no query may see (None: every column is a real token)."""
        c = model.config
        if positions.shape[-1] != cache.max_len or cache.max_len > c.context_length:
            raise ValueError(f"positions must cover the KV cache, which must fit the context ({c.context_length})")
        self.n_kv_head, self.group, self.head_dim = c.n_kv_head, c.n_head // c.n_kv_head, c.head_dim
        self.norm_dtype = None if model.lm_head.weight.dtype == torch.float32 else torch.float32
        self.eps = torch.tensor(c.norm_eps, device=positions.device)
        self.embed, self.final_norm, self.lm_head = model.embed, model.norm.weight, model.lm_head
        self.layers = [self._layer_weights(block, i, cache) for i, block in enumerate(model.blocks)]
        self.cos, self.sin = self._rotation_tables(model, positions)
        self.bias = None
        if key_mask is not None:  # -inf on padding columns, one row per (row, key/value head) like the scores
            bias = torch.zeros(key_mask.shape, dtype=self.cos.dtype, device=key_mask.device)
            bias = bias.masked_fill(key_mask == 0, float("-inf"))
            self.bias = bias[:, None, None].expand(-1, c.n_kv_head, 1, -1).reshape(-1, 1, cache.max_len)

    def _layer_weights(self, block: Block, layer: int, cache: KVCache) -> LayerWeights:
        n_q, n_kv, hd = block.attn.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.head_dim

        def regroup(qkv: torch.Tensor) -> torch.Tensor:
            """Rows regrouped per key/value head: [its queries, its key, its value]."""
            q, k, v = (t.reshape(self.n_kv_head, -1, hd, *t.shape[1:]) for t in qkv.split([n_q, n_kv, n_kv]))
            return torch.cat([q, k, v], dim=1).flatten(0, 2)

        attn, mlp = block.attn, block.mlp
        kv = cache.kv[layer]
        return LayerWeights(
            attn_norm=block.attn_norm.weight,
            qkv=regroup(attn.qkv.weight).t(),
            qkv_bias=None if attn.qkv.bias is None else regroup(attn.qkv.bias),
            proj=attn.proj.weight.t(),
            proj_bias=attn.proj.bias,
            mlp_norm=block.mlp_norm.weight,
            gate_up=mlp.gate_up.weight.t(),
            gate_up_bias=mlp.gate_up.bias,
            down=mlp.down.weight.t(),
            down_bias=mlp.down.bias,
            window=attn.window,
            kv=kv,
            keys_t=kv.flatten(0, 1).select(2, 0).transpose(1, 2),  # (B·kv heads, head_dim, len)
            values=kv.flatten(0, 1).select(2, 1),  # (B·kv heads, len, head_dim)
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
        x = self.embed(tokens)
        cos, sin = self.cos[column], self.sin[column]
        bias = None if self.bias is None else self.bias[:, :, : column + 1]
        for layer in self.layers:
            x = self._block(x, layer, column, cos, sin, bias)
        return self.lm_head(self._norm(x, self.final_norm))

    def _block(self, x, w: LayerWeights, column: int, cos, sin, bias) -> torch.Tensor:
        B, n_kv, group, hd = x.shape[0], self.n_kv_head, self.group, self.head_dim
        qkv = _linear(self._norm(x, w.attn_norm), w.qkv, w.qkv_bias).view(B, n_kv, group + 2, 2, hd // 2)
        qkv = torch.addcmul(qkv * cos, qkv.flip(-2), sin).view(B, n_kv, group + 2, hd)
        w.kv.select(2, column).copy_(qkv[:, :, group:])
        q = qkv[:, :, :group].view(B * n_kv, group, hd)  # a view: each key/value head's queries
        first = 0 if w.window is None else max(0, column + 1 - w.window)  # a sliding window: the last `window` only
        seen_keys = w.keys_t[:, :, first : column + 1]
        if bias is not None and first:
            bias = bias[:, :, first:]
        scores = torch.bmm(q, seen_keys) if bias is None else torch.baddbmm(bias, q, seen_keys)
        y = torch.bmm(scores.softmax(-1), w.values[:, first : column + 1]).view(B, -1)
        x = torch.addmm(x if w.proj_bias is None else x + w.proj_bias, y, w.proj)
        gate_up = _linear(self._norm(x, w.mlp_norm), w.gate_up, w.gate_up_bias)
        return torch.addmm(x if w.down_bias is None else x + w.down_bias, swiglu(gate_up), w.down)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in fp32 with the mean of squares taken from the vector norm (one reduction instead of three)."""
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=self.norm_dtype)
        rstd = torch.rsqrt(torch.addcmul(self.eps, norm, norm, value=1 / x.shape[-1]))
        y = x * rstd * weight
        return y if self.norm_dtype is None else y.to(x.dtype)


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


# --- the decoding loop ---------------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    repetition_penalty: float = 1.0  # 1 = none; > 1 discourages tokens already in the sequence
    num_samples: int = 1  # per prompt
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides EOS, e.g. <|end|> in chat
    use_cache: bool = True  # False recomputes every position each step (for tests and benchmarks)

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "num_samples": self.num_samples >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")


def stream_tokens(
    model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, pad_token_id: int = 0
) -> Iterator[torch.Tensor]:
    """Yield, each step, the next token of every sequence ((rows,) long tensor; -1 once a row has stopped).

    Rows are the prompts each repeated `num_samples` times, in order. A row stops at any of
    `cfg.stop_token_ids` (which is yielded) and the loop ends when all rows have stopped or the budget is spent.
    Prompts are cut to their last tokens when they and the new tokens would not fit in the context: the prompt
    keeps at least `context − min(max_new_tokens, context / 2)` tokens, and generation never runs past the context.
    """
    if hasattr(model, "stream_tokens"):  # a model lmcore runs through transformers decodes itself (lmcore.hfcausal)
        yield from model.stream_tokens(prompts, cfg, pad_token_id)
        return
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    context = model.config.context_length
    keep = context - min(cfg.max_new_tokens, context // 2)
    rows = [list(p)[-keep:] for p in prompts for _ in range(cfg.num_samples)]
    width = max(len(r) for r in rows)
    steps = min(cfg.max_new_tokens, context - width)
    device = model.lm_head.weight.device

    total = width + steps
    ids = torch.full((len(rows), total), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), total), dtype=torch.long, device=device)
    for i, row in enumerate(rows):  # left padding: every prompt ends at the same column
        ids[i, width - len(row) : width] = torch.tensor(row, device=device)
        mask[i, width - len(row) :] = 1
    padded = bool((mask[:, :width] == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    stop_ids = torch.tensor(sorted(set(cfg.stop_token_ids)), dtype=torch.long, device=device)
    stopped = torch.zeros(len(rows), dtype=torch.bool, device=device)
    cache = KVCache(model.config, len(rows), total, device, model.lm_head.weight.dtype) if cfg.use_cache else None
    greedy = cfg.temperature == 0 and cfg.repetition_penalty == 1.0
    can_stop = len(stop_ids) > 0

    def last_logits(start: int, end: int) -> torch.Tensor:
        h = model.hidden_states(
            ids[:, start:end],
            attention_mask=mask[:, :end] if padded else None,
            cache=cache,
            start=start,
            position_ids=positions[:, start:end] if padded else None,
        )
        return model.lm_head(h[:, -1]).float()

    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        with torch.inference_mode():
            logits = last_logits(0, width)  # the prompt in one pass, filling the cache
            if cache is not None:
                decode = Decoder(model, cache, positions if padded else positions[:1], mask if padded else None)
            for step in range(steps):
                end = width + step  # tokens so far
                token = logits.argmax(dim=-1) if greedy else next_token(logits, ids[:, :end], cfg, generator)
                if can_stop:  # rows that stopped yield -1 from then on
                    token = torch.where(stopped, -1, token)
                    stopped |= torch.isin(token, stop_ids)
                yield token
                if step == steps - 1 or (can_stop and bool(stopped.all())):
                    return
                if can_stop:
                    token = token.clamp(min=0)  # a stopped row keeps feeding a harmless token
                ids[:, end] = token
                logits = decode(token, end).float() if cache is not None else last_logits(0, end + 1)
    finally:
        model.train(was_training)


def next_token(
    logits: torch.Tensor, ids: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from (rows, vocab) logits: penalty → temperature → top-k → top-p → draw (or argmax)."""
    if cfg.repetition_penalty != 1.0:
        seen = logits.gather(1, ids)
        logits = logits.scatter(
            1, ids, torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        )
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth_best = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the most likely always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= cfg.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    pad_token_id: int = 0,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """The new tokens of every row (prompt × sample, in order), each without its stop token."""
    outputs: list[list[int]] = [[] for _ in range(len(prompts) * cfg.num_samples)]
    done = [False] * len(outputs)
    stop = set(cfg.stop_token_ids)
    for token in stream_tokens(model, prompts, cfg, pad_token_id):
        if on_token is not None:
            on_token(token)
        for row, value in enumerate(token.tolist()):
            if done[row] or value < 0:
                continue
            if value in stop:
                done[row] = True
            else:
                outputs[row].append(value)
    return outputs
