"""Per-token entropy of a causal LM, computed through TRL's fused (chunked) LM head.

H_t = - sum_j p_{t,j} log p_{t,j},  p_t = softmax(z_t / T)   (Wang et al., 2025, Eq. 1)

TRL's ``add_fused_lm_head`` projects hidden states through the LM head in tiles of ``_CHUNKED_LOGPROB_CHUNK_SIZE``
positions and returns the entropy of each next-token distribution, so the (batch, seq, vocab) logits are never
materialized: peak extra memory is one tile of ``chunk * vocab`` floats.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import add_fused_lm_head

__all__ = ["DEFAULT_ENTROPY_BATCH_SIZE", "token_entropies"]

DEFAULT_ENTROPY_BATCH_SIZE = 8
_PATCHED_ATTR = "_trl_forking_fused_temperature"


def _ensure_fused_head(model, temperature: float) -> None:
    """Adds TRL's fused LM head (with entropy output) to ``model`` once per temperature."""
    if getattr(model, _PATCHED_ATTR, None) == temperature:
        return
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    setattr(model, _PATCHED_ATTR, temperature)


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
        model: a causal LM (``PreTrainedModel``); TRL's fused head is added to it on first use (generation and the
            ordinary forward are unchanged).
        input_ids: (B, L) token ids, prompt and completion.
        attention_mask: (B, L) 1 for real tokens; all ones when None.
        temperature: T in ``softmax(z / T)``; use the sampling temperature.
        batch_size: rows per forward.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _ensure_fused_head(model, temperature)
    device = next(model.parameters()).device
    out = torch.zeros(input_ids.shape, dtype=torch.float32)
    for start in range(0, input_ids.size(0), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        attn = attention_mask[start : start + batch_size].to(device)
        labels = ids.masked_fill(attn == 0, -100)
        outputs = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True)
        out[start : start + batch_size, 1:] = outputs.entropy.float().cpu()
    return out * attention_mask.to(out.dtype).cpu()
