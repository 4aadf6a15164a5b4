"""Benchmark d: peak memory of the entropies of one long completion at Qwen3's vocabulary (151,936).

- ours: ``trl_forking.token_entropies`` (TRL's fused, tiled LM head: no (T, vocab) logits);
- naive: ``model(ids).logits`` then ``H = -(softmax(z) * log_softmax(z)).sum(-1)``.

Model: a random Qwen3 architecture with the real vocabulary and a tiny body (hidden 64, 2 layers, SDPA attention),
so the LM head dominates as it does for entropy computation at scale. Each measurement runs in a child process (low
``MALLOC_MMAP_THRESHOLD_``) and reports the peak RSS added over the loaded model and input ids.

The naive path needs about 4 * T * vocab * 4 bytes (logits, log-probabilities, probabilities, their product): 37 GB
at T = 16,384, more than this 24 GiB machine. It is measured at shorter T, where its peak is linear in T, and
extrapolated with a least-squares line; the logits alone (T * vocab * 4 bytes, 9.3 GiB) are reported as a floor.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from common import peak_rss_delta

__all__ = ["FULL", "QUICK", "VOCAB_SIZE", "run"]

VOCAB_SIZE = 151_936
TARGET_TOKENS = 16_384
# (lengths for our path, lengths for the naive path); the full run measures ours at the target length itself.
FULL = {"ours": (2048, TARGET_TOKENS), "naive": (512, 1024, 2048)}
QUICK = {"ours": (128,), "naive": (128,)}
MALLOC_MMAP_THRESHOLD = 65536
CHILD_TIMEOUT_S = 900


def build_model(seq_len: int):
    """Returns a random Qwen3ForCausalLM with vocabulary 151,936 and a tiny body, in eval mode."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=seq_len + 1,
    )
    config._attn_implementation = "sdpa"  # the flash-style CPU kernel: attention does not blur the LM head's peak
    return Qwen3ForCausalLM(config).eval()


@torch.no_grad()
def naive_entropies(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Returns (B, T) entropies from the full (B, T, vocab) logits: H = -sum_v p_v log p_v."""
    logits = model(input_ids=input_ids).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _measure(path: str, seq_len: int) -> int:
    """Returns the peak bytes that computing the entropies of one ``seq_len``-token sequence adds (in a child)."""
    from trl_forking import token_entropies

    model = build_model(seq_len)
    ids = torch.randint(0, VOCAB_SIZE, (1, seq_len), generator=torch.Generator().manual_seed(0))
    if path == "ours":
        token_entropies(model, ids[:, :8])  # adds TRL's fused head and pages in its code before the measurement
        fn = lambda: token_entropies(model, ids)  # noqa: E731
    else:
        naive_entropies(model, ids[:, :8])
        fn = lambda: naive_entropies(model, ids)  # noqa: E731
    peak, _ = peak_rss_delta(fn)
    return peak


def _in_child(path: str, seq_len: int) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MALLOC_MMAP_THRESHOLD))
    out = subprocess.run(
        [sys.executable, __file__, path, str(seq_len)],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _fit(points: dict) -> tuple[float, float]:
    """Returns (intercept, slope) of the least-squares line through {T: bytes}."""
    t = torch.tensor(list(points), dtype=torch.float64)
    y = torch.tensor(list(points.values()), dtype=torch.float64)
    slope = float(((t - t.mean()) * (y - y.mean())).sum() / ((t - t.mean()) ** 2).sum()) if len(points) > 1 else 0.0
    return float(y.mean() - slope * t.mean()), slope


def run(lengths=FULL, in_process: bool = False, log=print) -> dict:
    """Returns measured peaks {path: {T: bytes}}, the naive peak extrapolated to the largest length measured for
    ours, and the logits-only floor at that length. ``in_process`` skips the child processes (quick mode: the
    figures then include allocator reuse and are only a smoke test)."""
    measured = {path: {} for path in lengths}
    for path, seq_lens in lengths.items():
        for seq_len in seq_lens:
            measured[path][seq_len] = _measure(path, seq_len) if in_process else _in_child(path, seq_len)
            log(f"  d. {path:5s} T={seq_len:>6,}: peak +{measured[path][seq_len] / 2**20:,.0f} MiB")
    target = max(lengths["ours"])
    if target in measured["naive"]:
        naive_at_target, extrapolated = measured["naive"][target], False
    else:
        intercept, slope = _fit(measured["naive"])
        naive_at_target, extrapolated = intercept + slope * target, True
    return {
        "vocab_size": VOCAB_SIZE,
        "tokens": target,
        "measured_bytes": measured,
        "ours_bytes": measured["ours"][target],
        "naive_bytes": naive_at_target,
        "naive_extrapolated": extrapolated,
        "logits_floor_bytes": target * VOCAB_SIZE * 4,
    }


if __name__ == "__main__" and len(sys.argv) == 3:
    print(_measure(sys.argv[1], int(sys.argv[2])))
