"""Hand-written gradients for the model's memory-bound layers, switched in once by training code.

Apart from the matmuls, training time goes to memory-bound elementwise passes, so the few layers where autograd
makes many of them (RMSNorm, RoPE with the head split, SwiGLU, the loss) have an autograd Function here that
computes the same forward as the model's plain function and a backward that makes fewer passes over memory.

`use_fast_kernels(model)` is the one place they enter: it swaps each lmcore layer's class for a subclass here that
overrides the layer's one math method (`RMSNorm.normalize`, `Attention.split_heads`, `MLP.activation`,
`Transformer.loss`), in place, so parameters, state-dict names and optimizer state stay as they are (FSDP2 swaps
classes the same way). The training loop applies it before anything else. Each override still decides per call
whether its Function runs, as the model always has: only in eager mode, with a gradient to compute (the loss: a
gradient to compute, also under torch.compile); otherwise the plain math runs, so inference, evaluation and
compiled blocks (inductor derives and fuses the backward itself) compute exactly what the bare model computes.
tests/test_model.py checks the Functions against autograd (gradcheck) and the whole model against transformers.
The Llama-family variants need no plain-path fallback here: projection biases are added by the nn.Linear before
the rotary split and the SwiGLU see their input, and a sliding window is only a different attention mask (SDPA,
untouched here), so every Function computes the same thing for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmcore.model import IGNORE_INDEX, MLP, Attention, RMSNorm, Transformer, chunked_cross_entropy, inverse_rms


def use_fast_kernels(model: nn.Module) -> nn.Module:
    """Swap in the hand-written gradients on every lmcore layer inside `model` (in place; again is a no-op)."""
    for module in model.modules():
        fast = FAST_LAYERS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model


def _custom_grad(*tensors: torch.Tensor) -> bool:
    """Use a hand-written backward: eager mode, with a gradient to compute."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and not torch.compiler.is_compiling()


# --- RMSNorm -------------------------------------------------------------------------------------------------


class FastRMSNorm(RMSNorm):
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if _custom_grad(x, self.weight):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return super().normalize(x)


class RMSNormFunction(torch.autograd.Function):
    """About seven passes over the activations, where autograd's decomposition makes about fifteen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = inverse_rms(x, eps)
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


# --- rotary positions with the head split --------------------------------------------------------------------


class FastAttention(Attention):
    def split_heads(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if _custom_grad(qkv):
            return SplitRotaryFunction.apply(qkv, cos, sin, self.n_head, self.n_kv_head)
        return super().split_heads(qkv, cos, sin)


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


# --- SwiGLU --------------------------------------------------------------------------------------------------


class FastMLP(MLP):
    def activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        if _custom_grad(gate_up):
            return SwiGLUFunction.apply(gate_up)
        return super().activation(gate_up)


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


# --- the loss ------------------------------------------------------------------------------------------------


class FastTransformer(Transformer):
    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return fused_linear_cross_entropy(h, self.lm_head.weight, targets)


def fused_linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 512
) -> torch.Tensor:
    """`chunked_cross_entropy`'s mean; when a gradient is wanted, it is computed in the forward pass chunk by chunk,
    so each chunk's logits are made once and never recomputed (LinearCrossEntropyFunction)."""
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(flat_h, weight, flat_t, chunk)
    return chunked_cross_entropy(h, weight, targets, chunk)


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


FAST_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    RMSNorm: FastRMSNorm,
    Attention: FastAttention,
    MLP: FastMLP,
    Transformer: FastTransformer,
}
