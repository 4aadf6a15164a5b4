"""Per-token entropy of a causal LM, computed through TRL's fused (chunked) LM head.

H_t = - sum_j p_{t,j} log p_{t,j},  p_t = softmax(z_t / T)   (Wang et al., 2025, Eq. 1)

TRL's ``add_fused_lm_head`` projects hidden states through the LM head in tiles of ``_CHUNKED_LOGPROB_CHUNK_SIZE``
positions and returns the entropy of each next-token distribution, so the (batch, seq, vocab) logits are never
materialized: peak extra memory is one tile of ``chunk * vocab`` floats.
"""

from __future__ import annotations

import copy

import torch
from trl.trainer.utils import add_fused_lm_head

from .defaults import DEFAULT_ENTROPY_BATCH_SIZE

__all__ = ["DEFAULT_ENTROPY_BATCH_SIZE", "token_entropies"]


def _fused_view(model, temperature: float):
    """Returns a shallow copy of ``model`` with TRL's fused LM head (log-probs and entropy) at ``temperature``.

    ``add_fused_lm_head`` replaces the ``forward`` of the module it is given. Patching a shallow copy (same
    submodules and parameters, no tensor copied) leaves the caller's model as it was: a trainer's model keeps its own
    fused head and temperature.
    """
    view = copy.copy(model)
    add_fused_lm_head(view, temperature=temperature, outputs=("log_probs", "entropy"))
    return view


@torch.no_grad()
def token_entropies(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    batch_size: int = DEFAULT_ENTROPY_BATCH_SIZE,
) -> torch.Tensor:
    """Returns (B, L) float32 entropies: entry ``[b, t]`` is the entropy of the distribution that predicts token t.

    Column 0 (no prediction) and padded positions (``attention_mask == 0``) are 0. Rows are processed
    ``batch_size`` at a time; with TRL's fused head the memory bound is one tile of the LM head, never
    ``(batch_size, L, vocab)`` logits.

    Args:
        model: a causal LM (``PreTrainedModel``); it is not modified (the fused head goes on a shallow copy).
        input_ids: (B, L) token ids, prompt and completion.
        attention_mask: (B, L) 1 for real tokens; all ones when None.
        temperature: T in ``softmax(z / T)``; use the sampling temperature.
        batch_size: rows per forward.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    view = _fused_view(model, temperature)
    device = next(model.parameters()).device
    out = torch.zeros(input_ids.shape, dtype=torch.float32)
    for start in range(0, input_ids.size(0), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        attn = attention_mask[start : start + batch_size].to(device)
        labels = ids.masked_fill(attn == 0, -100)
        outputs = view(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        out[start : start + batch_size, 1:] = outputs.entropy.float().cpu()
    return out * attention_mask.to(out.dtype).cpu()
