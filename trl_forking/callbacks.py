"""``ForkingStatsCallback``: entropy histograms and forking-token tables during training.

The trainer exposes its last micro-batch as ``trainer.forking_last_batch``, a dict of (B, T) tensors:
``completion_ids`` (long), ``entropies`` (float), ``mask`` (valid completion tokens) and ``selected`` (bool, the
tokens in the policy gradient). ``ForkingGRPOTrainer`` fills it on every training micro-batch. The callback pools the
micro-batches of every N-th optimizer step and logs them.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback

from .entropy_stats import DEFAULT_LOW_ENTROPY, DEFAULT_PERCENTILES, forking_token_table, log_histogram, token_strings
from .metrics import PERCENTILES as TRAINER_PERCENTILES
from .selection import entropy_quantiles

__all__ = ["STATS_FILE", "ForkingStatsCallback", "step_statistics"]

STATS_FILE = "forking_stats.jsonl"
BATCH_KEYS = ("completion_ids", "entropies", "mask", "selected")
# The callback's own TensorBoard / W&B names. The trainer already logs forking/threshold, forking/entropy_p50 /
# p80 / p95 and forking/frac_entropy_below_0.01 over all ranks; the callback adds only what those lack, under a prefix
# of its own (its statistics cover the main process's micro-batches), so no quantity appears under two names.
PREFIX = "forking_stats"


def step_statistics(token_ids, entropies, selected, top_tokens: int = 20, bins: int = 50, decode=None) -> dict:
    """Returns the JSON-ready statistics of one logged step from the flat (N,) tensors of its valid tokens.

    Keys: ``num_tokens`` N, ``num_selected`` (tokens in the policy gradient), ``mean``, ``percentiles``
    (nearest-rank, p10 to p99), ``share_below`` (H < 0.01), ``selected_min_entropy`` (the effective threshold of a
    top selection), ``histogram`` (``log_histogram``) and ``top_tokens`` (``forking_token_table`` of the selected
    tokens).

    Args:
        token_ids: (N,) token ids.
        entropies: (N,) entropies.
        selected: (N,) bool.
        top_tokens: rows of the token table.
        bins: histogram bins.
        decode: optional ``id -> str`` for the table.
    """
    n = entropies.numel()
    everything = torch.ones(n, dtype=torch.bool)
    quantiles = entropy_quantiles(entropies, everything, [p / 100 for p in DEFAULT_PERCENTILES])
    return {
        "num_tokens": n,
        "num_selected": int(selected.sum()),
        "mean": float(entropies.mean()) if n else None,
        "percentiles": {f"p{p}": float(quantiles[i]) for i, p in enumerate(DEFAULT_PERCENTILES)} if n else {},
        "share_below": {
            f"{DEFAULT_LOW_ENTROPY:g}": float((entropies < DEFAULT_LOW_ENTROPY).float().mean()) if n else None
        },
        "selected_min_entropy": float(entropies[selected].min()) if selected.any() else None,
        "histogram": log_histogram(entropies, bins),
        "top_tokens": forking_token_table(token_ids, entropies, selected, None, top_tokens, decode),
    }


def _markdown_table(rows: list[dict]) -> str:
    """Returns the token table as Markdown (TensorBoard renders text summaries as Markdown)."""
    lines = ["| token | count | share | fork rate | mean H |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        token = repr(row.get("token", row["token_id"])).replace("|", "\\|")
        lines.append(
            f"| `{token}` | {row['count']} | {100 * row['share']:.1f}% | {100 * row['fork_rate']:.1f}% "
            f"| {row['mean_entropy']:.3f} |"
        )
    return "\n".join(lines)


class ForkingStatsCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, logs the entropy histogram and a table of the most frequent forking
    tokens of that step's micro-batches (on this process) to:

    - a JSONL file ``output_dir/forking_stats.jsonl``, always (one ``step_statistics`` object per logged step);
    - TensorBoard when ``"tensorboard"`` is in ``args.report_to`` (the writer of transformers' TensorBoardCallback
      when it is there): histograms ``forking_stats/entropy`` and ``forking_stats/log10_entropy``, scalars of the
      percentiles the trainer does not log (``forking_stats/entropy_p10``, p25, p75, p90, p99), text
      ``forking_stats/top_tokens``. The trainer's own metrics (threshold, p50 / p80 / p95, share below 0.01) are not
      repeated under a second name;
    - Weights & Biases when ``"wandb"`` is in ``args.report_to`` and a run is active: ``forking_stats/entropy``
      histogram and ``forking_stats/top_tokens`` table.

    Only the world process zero writes. The trainer (anything with ``forking_last_batch``) is given here, with
    ``bind``, or with ``ForkingStatsCallback.attach(trainer)``, since transformers does not pass the trainer to
    callbacks.

    Args:
        trainer: the trainer to read ``forking_last_batch`` from.
        every_n_steps: log every this many optimizer steps (``args.logging_steps`` when None).
        top_tokens: rows of the token table.
        bins: histogram bins (log-spaced) in the JSONL file.
        filename: the JSONL file's name in ``args.output_dir``.
    """

    def __init__(
        self,
        trainer=None,
        every_n_steps: int | None = None,
        top_tokens: int = 20,
        bins: int = 50,
        filename: str = STATS_FILE,
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.top_tokens = top_tokens
        self.bins = bins
        self.filename = filename
        self.tokenizer = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # The last batch dict seen, held (not its id) so that a new dict cannot reuse its address and look seen.
        self._seen = None
        self._writer = None

    @classmethod
    def attach(cls, trainer, **kwargs) -> ForkingStatsCallback:
        """Returns a new callback bound to ``trainer`` and added to its callbacks."""
        callback = cls(trainer, **kwargs)
        trainer.add_callback(callback)
        return callback

    def bind(self, trainer) -> ForkingStatsCallback:
        """Returns this callback after setting the trainer it reads ``forking_last_batch`` from."""
        self.trainer = trainer
        return self

    def _interval(self, args) -> int:
        return self.every_n_steps or max(int(args.logging_steps), 1)

    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        if self.trainer is None:
            raise ValueError(
                "ForkingStatsCallback has no trainer to read forking_last_batch from: pass it as "
                "ForkingStatsCallback(trainer), call callback.bind(trainer), or use "
                "ForkingStatsCallback.attach(trainer)."
            )
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)

    def _collect(self) -> None:
        """Keeps this micro-batch's valid tokens as flat CPU tensors (once per batch dict the trainer publishes)."""
        batch = getattr(self.trainer, "forking_last_batch", None)
        if batch is None or batch is self._seen:
            return
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise KeyError(f"trainer.forking_last_batch lacks {missing}; expected keys {list(BATCH_KEYS)}")
        self._seen = batch
        valid = batch["mask"].detach().bool().cpu()  # (B, T)
        self._pending.append(
            (
                batch["completion_ids"].detach().cpu()[valid],
                batch["entropies"].detach().float().cpu()[valid],
                batch["selected"].detach().bool().cpu()[valid],
            )
        )

    def on_substep_end(self, args, state, control, **kwargs):
        # Called after each micro-batch of gradient accumulation but the last; global_step is the step in progress.
        if (state.global_step + 1) % self._interval(args) == 0:
            self._collect()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self._interval(args) != 0:
            # Mark this step's batch as seen: if the trainer publishes nothing new before the next logged step, that
            # step must not count it.
            self._seen = getattr(self.trainer, "forking_last_batch", None)
            self._pending.clear()
            return
        self._collect()
        pending, self._pending = self._pending, []
        if not pending or not state.is_world_process_zero:
            return
        token_ids, entropies, selected = (torch.cat(parts) for parts in zip(*pending, strict=True))
        decode = None if self.tokenizer is None else (lambda i: token_strings(self.tokenizer, [i])[0])
        record = {"step": state.global_step}
        record.update(step_statistics(token_ids, entropies, selected, self.top_tokens, self.bins, decode))
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, self.filename), "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        report_to = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
        if "tensorboard" in report_to:
            self._log_tensorboard(args, record, entropies)
        if "wandb" in report_to:
            self._log_wandb(record)

    def _tensorboard_writer(self, args):
        """Returns transformers' TensorBoardCallback writer when the trainer has one, else a writer of our own."""
        handler = getattr(self.trainer, "callback_handler", None)
        for callback in getattr(handler, "callbacks", []):
            if getattr(callback, "tb_writer", None) is not None:
                return callback.tb_writer
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
            self._writer = SummaryWriter(log_dir=os.path.join(log_dir, "forking_stats"))
        return self._writer

    def _log_tensorboard(self, args, record: dict, entropies: torch.Tensor) -> None:
        writer, step = self._tensorboard_writer(args), record["step"]
        writer.add_histogram(f"{PREFIX}/entropy", entropies, step)
        # The log view separates the near-deterministic mass from the forking tail, as the paper's histogram does.
        writer.add_histogram(
            f"{PREFIX}/log10_entropy", torch.log10(entropies.clamp(min=record["histogram"]["floor"])), step
        )
        logged_by_trainer = {f"p{p}" for p in TRAINER_PERCENTILES}
        for name, value in record["percentiles"].items():
            if name not in logged_by_trainer:
                writer.add_scalar(f"{PREFIX}/entropy_{name}", value, step)
        writer.add_text(f"{PREFIX}/top_tokens", _markdown_table(record["top_tokens"]), step)
        writer.flush()

    def _log_wandb(self, record: dict) -> None:
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        rows = record["top_tokens"]
        table = wandb.Table(
            columns=["token", "count", "share", "fork_rate", "mean_entropy"],
            data=[
                [repr(r.get("token", r["token_id"])), r["count"], r["share"], r["fork_rate"], r["mean_entropy"]]
                for r in rows
            ],
        )
        histogram = record["histogram"]
        # "train/global_step" is the step metric transformers' WandbCallback defines, so the charts line up.
        wandb.log(
            {
                f"{PREFIX}/entropy": wandb.Histogram(np_histogram=(histogram["counts"], histogram["edges"])),
                f"{PREFIX}/top_tokens": table,
                "train/global_step": record["step"],
            }
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def __getattr__(name: str):
    from . import _moved

    return _moved.moved_attribute(__name__, name)  # HeldOutEvaluationCallback: trl_forking.evaluation.callback
