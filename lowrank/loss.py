"""The chunked cross-entropy loss (`--loss chunked`): the loss of a causal LM without its logits.

transformers computes `logits = lm_head(h)` for every token, upcasts them to fp32 and runs
cross-entropy: the forward holds the logits and their fp32 copy, the log-softmax keeps b·s·V
fp32 values for backward, and the backward makes two more b·s·V fp32 tensors. At a 128k
vocabulary that is the largest activation of a step. Here the step calls the model's decoder,
then computes the loss `chunk` tokens at a time inside one autograd Function:

    forward   for each chunk: its logits (chunk × V), their fp32 copy, the logit scale and
              soft-cap of the family, the log-sum-exp in place; keeps the final hidden states
              (b·s·h, which lm_head keeps anyway when it trains), the shifted targets and one
              fp32 log-sum-exp per token
    backward  for each chunk again: its logits recomputed, softmax − one-hot in place, cast to the
              model dtype, then `grad_h[chunk] = g · W` and `grad_W += gᵀ · h[chunk]` in place

So between forward and backward nothing of size V per token stays alive, and the backward's
peak is one weight gradient (the one lm_head makes anyway), the hidden states' gradient and
one chunk's temporaries — no second copy of the weight gradient, as a per-chunk
`torch.utils.checkpoint` or an autograd sum of per-chunk losses (LitGPT's
`chunked_cross_entropy`, torchtune's `CEWithChunkedOutputLoss`) would make, and no weight
gradient in forward (Liger's fused linear cross-entropy computes the gradients in forward, so the
weight gradient lives through the whole backward). The price: lm_head's matmul runs twice (once
more in backward), and the weight gradient is summed chunk by chunk in the model dtype.

The loss equals transformers' ForCausalLMLoss: the mean over tokens whose label is not -100, the
labels shifted left by one. The family's logit scale (Cohere's `logit_scale`, Granite's
`logits_scaling`) and final soft-cap (Gemma 2/3's `final_logit_softcapping`) are applied per
chunk, in fp32 (transformers applies them in the model dtype before its fp32 upcast); a head the
chunked loss cannot redo is refused (estimator/loss.py `logit_head`).

The model keeps its class; its `forward` is replaced on the instance (`install`), so DDP's and
FSDP2's hooks, which run around `forward`, see the same module: under FSDP2 the root module's
parameters (embeddings, final norm, lm_head) are gathered by the root's pre-forward hook before
this forward reads `lm_head.weight`, and stay gathered into backward, where the weight gradient
is reduce-scattered like lm_head's own. Under autocast the hidden states and the weight are cast to
bf16 once (the copies autocast's weight cache would keep) and the chunks run without autocast.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from estimator.loss import LogitHead, logit_head

IGNORE_INDEX = -100


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float,
                  softcap: float | None) -> Tensor:
    """One chunk's logits in fp32, scaled and soft-capped (the model-dtype logits freed at once)."""
    z = F.linear(hidden, weight, bias).float()  # fp32 weights: the same tensor, no copy
    if scale != 1.0:
        z.mul_(scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _forward_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, scale: float,
                   softcap: float | None) -> tuple[Tensor, Tensor]:
    """One chunk's loss sum and log-sum-exp per token (every temporary freed on return)."""
    z = _chunk_logits(hidden, weight, bias, scale, softcap)
    picked = z.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    top = z.amax(1, keepdim=True)
    lse = z.sub_(top).exp_().sum(1).log_().add_(top.squeeze(1))  # z is spent in place
    del z
    return torch.where(targets != IGNORE_INDEX, lse - picked, 0.0).sum(), lse


def _backward_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
                    grad_total: Tensor, scale: float, softcap: float | None, grad_hidden: Tensor | None,
                    grad_weight: Tensor | None, grad_bias: Tensor | None) -> None:
    """One chunk's gradients: its logits recomputed, softmax − one-hot in place, into the given grads."""
    z = _chunk_logits(hidden, weight, bias, scale, softcap)
    # d softcap(x)/dx = 1 - tanh² = 1 - (z / softcap)²
    capped = z.div(softcap).square_().neg_().add_(1) if softcap is not None else None
    keep = (targets != IGNORE_INDEX).to(torch.float32)
    z.sub_(lse.unsqueeze(1)).exp_()  # the softmax
    z.scatter_add_(1, targets.clamp(min=0).unsqueeze(1), keep.neg().unsqueeze(1))  # minus the one-hot target
    z.mul_((keep * grad_total).unsqueeze(1))  # ignored tokens: no gradient
    if capped is not None:
        z.mul_(capped)
        del capped
    if scale != 1.0:
        z.mul_(scale)
    g = z.to(hidden.dtype)  # fp32: the same tensor
    del z
    if grad_hidden is not None:
        torch.mm(g, weight, out=grad_hidden)
    if grad_weight is not None:
        grad_weight.addmm_(g.t(), hidden)
    if grad_bias is not None:
        grad_bias.add_(g.sum(0))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of the token losses of `hidden @ weight.T (+ bias)` against `targets`, `chunk` rows at a
    time, each chunk's logits recomputed in backward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                scale: float, softcap: float | None) -> Tensor:
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            part = slice(start, min(start + chunk, n))
            loss, lse[part] = _forward_chunk(hidden[part], weight, bias, targets[part], scale, softcap)
            total += loss
            del loss
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.scale, ctx.softcap = chunk, scale, softcap
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        n = hidden.shape[0]
        for start in range(0, n, ctx.chunk):
            part = slice(start, min(start + ctx.chunk, n))
            _backward_chunk(hidden[part], weight, bias, targets[part], lse[part], grad_total, ctx.scale, ctx.softcap,
                            grad_hidden[part] if need_hidden else None, grad_weight, grad_bias)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def shifted_targets(labels: Tensor) -> Tensor:
    """transformers' shift: the label of the next token at each position, -100 at the last."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous().view(-1)


def chunked_cross_entropy(hidden: Tensor, head: nn.Module, labels: Tensor, chunk: int,
                          logits: LogitHead | None = None) -> Tensor:
    """The mean cross-entropy of `head(hidden)` against `labels` shifted left (ForCausalLMLoss),
    without the logits of all tokens at once. `hidden` (b, s, h): the decoder's output."""
    logits = logits or LogitHead()
    targets = shifted_targets(labels.to(hidden.device))
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the casts autocast would make (and keep), made once
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device, enabled=False):
        total = ChunkedCrossEntropy.apply(hidden, weight, bias, targets, chunk, logits.scale, logits.softcap)
    return total / (targets != IGNORE_INDEX).sum()


def install(model: nn.Module, chunk: int) -> LogitHead:
    """Make `model(..., labels=...)` compute its loss chunked (its logits stay None); without labels
    it runs its own forward. ValueError (one line) for a head the chunked loss cannot redo."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    head = logit_head(model)
    if head.problem:
        raise ValueError(head.problem)
    output = model.get_output_embeddings()
    output = getattr(output, "trained", output)  # modules_to_save: the trainable copy (lowrank/lora.py)
    if not isinstance(output, nn.Linear):
        raise ValueError(f"--loss chunked needs an nn.Linear head, and {type(model).__name__}'s is a "
                         f"{type(output).__name__}; use --loss full")
    original = type(model).forward

    def forward(self, *args, labels: Tensor | None = None, logits_to_keep=0, **kwargs):
        if labels is None or args:
            return original(self, *args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        hidden = self.base_model(**kwargs)[0]
        loss = chunked_cross_entropy(hidden, self.get_output_embeddings(), labels, chunk, head)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return head
