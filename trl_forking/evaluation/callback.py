"""``HeldOutEvaluationCallback``: held-out accuracy during training, in the run format of the study."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .accuracy import evaluate, summarize
from .records import append_evaluation

__all__ = ["HeldOutEvaluationCallback"]


def _rank_and_world() -> tuple[int, int]:
    """Returns (this process's rank, the number of ranks) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class HeldOutEvaluationCallback(TrainerCallback):
    """Evaluates the policy on held-out problems during training and appends each result to
    ``output_dir/forking_eval.jsonl`` (the run format ``trl-forking compare`` reads, ``trl_forking.analysis.study``).

    Evaluations happen when training begins (step 0, the starting model; the step of the checkpoint when resuming),
    every ``every_n_steps`` optimizer steps, and when training ends. Each record is ``{"step", "accuracy" (avg@n),
    "stderr", "pass@k", "num_problems", "num_samples"}`` from ``trl_forking.evaluation.evaluate``, sampled with a
    fixed ``seed`` so that every run and every step draws from the same random stream (differences between arms are
    then not sampling luck). Under several processes (DDP, ZeRO-1/2) every rank samples its share of the problems with
    its own copy of the model and the verdicts are gathered, so no rank waits in a collective while another generates
    alone (NCCL's watchdog ends a collective after 30 minutes by default); only the main process writes. The samples
    then depend on the number of processes too: compare arms run on the same number. Sharded models (DeepSpeed
    ZeRO-3, FSDP) are refused when training begins, as a rank cannot generate from its shard alone; evaluate their
    saved checkpoints with ``recipes/eval_aime.py``.

    Args:
        problems: rows with a conversational ``prompt`` and a gold ``solution``.
        every_n_steps: evaluate every this many optimizer steps (0: only at the start and the end).
        num_samples: n of avg@n; ``ks`` the k of pass@k (default ``[1, n]``).
        max_new_tokens, temperature, top_p, seed, batch_size: sampling, as in ``evaluate``.
        initial: a result to record for the first evaluation instead of computing it (the shared step-0 result of a
            study whose runs all start from one model).
        on_result: called with each record (e.g. to print progress).
    """

    def __init__(
        self,
        problems,
        every_n_steps: int = 0,
        num_samples: int = 4,
        ks=None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int | None = None,
        initial: dict | None = None,
        on_result=None,
    ):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.problems = problems
        self.every_n_steps = every_n_steps
        self.sampling = dict(
            num_samples=num_samples, ks=ks, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed,
        )  # fmt: skip
        if batch_size is not None:
            self.sampling["batch_size"] = batch_size
        self.initial = initial
        self.on_result = on_result
        self.last_step = None

    def evaluate(self, model, tokenizer) -> dict:
        """Returns the study record of ``model`` on the held-out problems (no step).

        In a process group of several ranks, rank r samples problems r, r + W, r + 2W, ... (W ranks) and the
        per-problem verdicts of all ranks are gathered (``all_gather_object``): every rank must call this at the same
        point, and every rank returns the same record.
        """
        rank, world = _rank_and_world()
        shard = [self.problems[i] for i in range(rank, len(self.problems), world)]
        result = evaluate(model, tokenizer, shard, **self.sampling)  # restores training mode and RNG
        n, ks = result["num_samples"], [int(k) for k in result["pass@k"]]
        verdicts = [{"accuracy": p["accuracy"], "pass@k": p["pass@k"]} for p in result["problems"]]
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, verdicts)
            verdicts = [row for part in gathered for row in part]
        summary = summarize(verdicts, ks, n)
        return {
            "accuracy": summary[f"avg@{n}"],
            "stderr": summary["stderr"],
            "pass@k": summary["pass@k"],
            "num_problems": summary["num_problems"] - summary["num_unscored"],
            "num_samples": n,
        }

    def _record(self, args, state, model, tokenizer) -> None:
        if self.last_step == state.global_step:
            return
        self.last_step = state.global_step
        if self.initial is not None:  # the same on every rank: none evaluates
            result, self.initial = self.initial, None
        else:
            result = self.evaluate(model, tokenizer)  # on every rank, each its share
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, **result}
        append_evaluation(args.output_dir, record)
        if self.on_result is not None:
            self.on_result(record)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled() or args.fsdp:
            raise ValueError(
                "HeldOutEvaluationCallback: the model is sharded (DeepSpeed ZeRO-3 or FSDP), and the main process "
                "cannot generate from its shard alone; allowed: one process, DDP or ZeRO-1/2. Evaluate the saved "
                "checkpoints with recipes/eval_aime.py instead."
            )
        self._record(args, state, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._record(args, state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._record(args, state, model, processing_class)
