"""Per-token entropy of a causal LM, computed through TRL's fused (chunked) LM head.

H_t = - sum_j p_{t,j} log p_{t,j},  p_t = softmax(z_t / T)   (Wang et al., 2025, Eq. 1)

TRL's ``add_fused_lm_head`` projects hidden states through the LM head in tiles of ``_CHUNKED_LOGPROB_CHUNK_SIZE``
positions and returns the entropy of each next-token distribution, so the (batch, seq, vocab) logits are never
materialized: peak extra memory is one tile of ``chunk * vocab`` floats.

Where some logits are -inf (a model that masks part of its vocabulary), TRL 1.16's fused head returns NaN: it
evaluates ``p * log p`` as ``0 * -inf`` (huggingface/trl#7221), although the distribution is well defined and the
term is 0. ``fill_nonfinite_entropies`` recomputes those positions from the model's own logits with
``torch.distributions.Categorical``, which takes ``0 * log 0`` as 0; ``token_entropies`` and the trainer call it.
"""

from __future__ import annotations

import copy

import torch
from trl.trainer.utils import add_fused_lm_head

from .defaults import DEFAULT_ENTROPY_BATCH_SIZE

__all__ = ["DEFAULT_ENTROPY_BATCH_SIZE", "FALLBACK_LOGITS_PER_CHUNK", "fill_nonfinite_entropies", "token_entropies"]

# Logits (positions x vocabulary) per forward of ``fill_nonfinite_entropies``: 2**26 floats, 256 MiB in float32.
FALLBACK_LOGITS_PER_CHUNK = 2**26


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
def fill_nonfinite_entropies(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    entropies: torch.Tensor,
    first_position: int,
    temperature: float = 1.0,
    logits_per_chunk: int = FALLBACK_LOGITS_PER_CHUNK,
) -> tuple[torch.Tensor, int]:
    """Returns ``(entropies, n)``: a copy of ``entropies`` whose ``n`` non-finite values at real positions are
    recomputed as ``Categorical(logits=z / T).entropy()`` from the model's own forward, and ``n``.

    ``entropies[b, k]`` is the entropy of the distribution the logits at sequence position ``first_position + k``
    give, which predicts token ``first_position + k + 1``; a value counts as real where that token's
    ``attention_mask`` is 1. Only rows with such a value are run again, through ``model(..., logits_to_keep=positions)``
    so that the model's own logit processing (soft-capping, scaling) applies, at most ``logits_per_chunk`` logits
    (positions x vocabulary) per forward. A value whose logits are NaN or +inf stays non-finite: that distribution is
    not defined.

    Args:
        model: the causal LM (a wrapped model too: its forward is called without ``fused_lm_head``).
        input_ids: (B, L) token ids.
        attention_mask: (B, L) 1 for real tokens.
        entropies: (B, K) entropies at positions ``first_position .. first_position + K - 1``; not modified.
        first_position: sequence position of column 0.
        temperature: T in ``softmax(z / T)``.
        logits_per_chunk: memory bound of one forward, in logits.
    """
    columns = entropies.size(1)
    real = attention_mask[:, first_position + 1 : first_position + 1 + columns].bool().to(entropies.device)
    bad = ~torch.isfinite(entropies) & real
    count = int(bad.sum())
    if not count:
        return entropies, 0
    filled = entropies.detach().clone()
    vocab = getattr(model, "module", model).config.get_text_config().vocab_size  # DDP / DeepSpeed wrap it
    step = max(1, logits_per_chunk // vocab)  # positions per forward
    for row in bad.any(-1).nonzero().flatten().tolist():
        columns_bad = bad[row].nonzero().flatten()
        for start in range(0, columns_bad.numel(), step):
            part = columns_bad[start : start + step]
            positions = (part + first_position).to(input_ids.device)
            logits = model(
                input_ids=input_ids[row : row + 1],
                attention_mask=attention_mask[row : row + 1],
                logits_to_keep=positions,
            ).logits[0]  # (P, V)
            values = torch.distributions.Categorical(logits=logits.float() / temperature, validate_args=False).entropy()
            filled[row, part.to(filled.device)] = values.to(filled.dtype).to(filled.device)
    return filled, count


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
    ``(batch_size, L, vocab)`` logits. Positions whose fused entropy is not finite (-inf logits, module docstring)
    are recomputed by ``fill_nonfinite_entropies``.

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
        entropy, _ = fill_nonfinite_entropies(model, ids, attn, outputs.entropy.float(), 0, temperature)
        out[start : start + batch_size, 1:] = entropy.cpu()
    return out * attention_mask.to(out.dtype).cpu()
