"""ForkingGRPOTrainer: GRPO whose policy gradient sees only the forking (high-entropy) tokens."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .callbacks import ForkingStatsCallback
from .config import ForkingGRPOConfig, ForkingOptions
from .metrics import forking_metrics
from .selection import forking_mask, num_selected

__all__ = ["ForkingGRPOTrainer"]

logger = logging.get_logger(__name__)

# TRL consults `get_high_entropy_mask` only while `top_entropy_quantile < 1`. Just below 1 keeps our override on for
# every selection (metrics, "bottom", "random", rho = 1) without changing anything else TRL computes.
_HOOK_ALWAYS_ON = math.nextafter(1.0, 0.0)
# Marks a generation pass whose first policy forward (TRL's old log-probs) should hand us its entropies.
_CAPTURE_PENDING = object()
# The model inputs besides ids and masks that TRL's loss forwards pass on (multimodal models).
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _per_sequence_ratio(trainer, selected, valid, inputs, mode):
    """grpo / sapo average each sequence over its valid tokens: rescale row i by n_i / |selected_i|."""
    num_selected_rows = selected.sum(-1, keepdim=True)
    return torch.where(num_selected_rows > 0, valid.sum(-1, keepdim=True) / num_selected_rows.clamp(min=1), 0.0)


def _micro_batch_ratio(trainer, selected, valid, inputs, mode):
    """bnpo averages over this micro-batch's valid tokens: rescale by n / |selected|."""
    count = selected.sum()
    return valid.sum() / count if count > 0 else torch.zeros((), device=valid.device)


def _generation_batch_ratio(trainer, selected, valid, inputs, mode):
    """dapo / cispo / vespo divide by TRL's global token count scaled to one optimizer step; swap in |selected|.

    TRL's denominator is ``num_items_in_batch / P * GA / spg`` (train) or ``num_items_in_batch / P`` (eval); the
    selected counterpart is ``S / P``, with S the selected tokens of the optimizer step over all P ranks.
    """
    num_items = inputs["num_items_in_batch"].float()
    if mode == "train":
        num_items = num_items * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        step_selected = inputs["forking_step_selected"].float()
    else:
        step_selected = selected.sum().float()
        if trainer.accelerator.num_processes > 1:
            dist.all_reduce(step_selected)
    return num_items / step_selected if step_selected > 0 else torch.zeros((), device=valid.device)


def _unit_ratio(trainer, selected, valid, inputs, mode):
    """dr_grpo (B * max_completion_length) and luspo (sum per sequence) count no tokens: nothing to rescale."""
    return 1.0


# How to turn TRL's policy-gradient denominator into "number of selected tokens", per loss type.
PG_NORMALIZER_RATIOS = {
    "grpo": _per_sequence_ratio,
    "sapo": _per_sequence_ratio,
    "bnpo": _micro_batch_ratio,
    "dapo": _generation_batch_ratio,
    "cispo": _generation_batch_ratio,
    "vespo": _generation_batch_ratio,
    "dr_grpo": _unit_ratio,
    "luspo": _unit_ratio,
}


class ForkingGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose policy-gradient term trains only on forking tokens ("Beyond the 80/20 Rule").

    The only changes w.r.t. GRPOTrainer: which completion tokens enter the policy-gradient term of the loss
    (``forking_mask`` over the configured scope) and, with ``forking_loss_normalization="selected"``, its denominator
    (the number of selected tokens instead of all tokens). TRL's loss code runs unchanged for every ``loss_type``: the
    selection enters through TRL's own ``get_high_entropy_mask`` hook as per-token weights ``w = m * r``, with ``m``
    the forking mask and ``r`` = (TRL's denominator) / (selected denominator), so that
    ``sum(l * w) / D_all = sum(l * m) / D_selected``. The KL term keeps every completion token. An entropy bonus
    (``entropy_coef``) acts on the selected tokens, as in TRL's ``top_entropy_quantile``.

    Entropies for scope ``"step"`` (and ``"sequence"`` when available) come from the policy that generated the
    batch: read from TRL's old-log-prob forward when it runs one (vLLM importance sampling, ``num_iterations > 1``,
    ``steps_per_generation > gradient_accumulation_steps``), otherwise from one extra no-grad forward per generation
    batch (about a third of a training forward + backward). The selection is then fixed before the training forward.
    Scopes ``"micro_batch"`` and ``"local"`` use the training forward's entropies, as TRL and the authors' code do.

    The constructor is GRPOTrainer's: swap the class name in an existing TRL script. A plain ``GRPOConfig`` works:
    its ``top_entropy_quantile`` is rho (TRL's default 1.0 trains on every token) and the other options take the
    defaults of `ForkingGRPOConfig`.
    """

    _tag_names = ["trl", "grpo", "forking-tokens"]
    _name = "ForkingGRPO"

    def __init__(self, model, reward_funcs=None, args=None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = ForkingGRPOConfig(f"{name.rstrip('/').split('/')[-1]}-ForkingGRPO")
        self.forking = ForkingOptions.from_args(args)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        if not isinstance(args, ForkingGRPOConfig):
            logger.warning(
                f"ForkingGRPOTrainer got a plain {type(args).__name__}: top_entropy_quantile="
                f"{self.forking.top_entropy_quantile} is read from it and the other forking options take their "
                f"defaults (forking_selection={self.forking.forking_selection!r}, forking_scope="
                f"{self.forking.forking_scope!r}, forking_loss_normalization="
                f"{self.forking.forking_loss_normalization!r}). Pass a ForkingGRPOConfig to set them."
            )
        if self.loss_type not in PG_NORMALIZER_RATIOS:
            raise ValueError(
                f"loss_type {self.loss_type!r} is not supported by ForkingGRPOTrainer; supported: "
                f"{sorted(PG_NORMALIZER_RATIOS)}."
            )
        if self.forking.forking_scope == "step" and args.steps_per_generation % args.gradient_accumulation_steps:
            logger.warning(
                f"forking_scope='step' with steps_per_generation={args.steps_per_generation} not a multiple of "
                f"gradient_accumulation_steps={args.gradient_accumulation_steps}: an optimizer step that spans two "
                "generation batches gets one threshold per generation batch."
            )
        self.top_entropy_quantile = min(self.forking.top_entropy_quantile, _HOOK_ALWAYS_ON)
        # One stream per rank, saved with each checkpoint, so "random" resumes where it stopped.
        self.forking_generator = torch.Generator().manual_seed(args.seed + self.accelerator.process_index)
        # The last micro-batch's completion_ids, entropies, mask and selected tokens, for callbacks and analysis.
        self.forking_last_batch: dict[str, torch.Tensor] | None = None
        self._forking_inputs = None
        self._forking_capture = None
        # transformers never hands callbacks the trainer; give ours this one so `callbacks=[ForkingStatsCallback()]`
        # works as is.
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ForkingStatsCallback) and callback.trainer is None:
                callback.bind(self)

    # --- selection ------------------------------------------------------------------------------------------------

    @property
    def _forking_group(self):
        return dist.group.WORLD if self.accelerator.num_processes > 1 else None

    def _select(self, entropies, valid, scope):
        """Returns the (B, T) forking mask of one population of tokens under ``scope``."""
        return forking_mask(
            entropies,
            valid,
            self.forking.top_entropy_quantile,
            self.forking.forking_selection,
            per_sequence=scope == "sequence",
            group=None if scope == "local" else self._forking_group,
            generator=self.forking_generator,
        )

    def _forking_metrics(self, entropies, valid, selected) -> dict[str, float]:
        return forking_metrics(entropies, valid, selected, self.forking.top_entropy_quantile, self._forking_group)

    def _log_forking_metrics(self, metrics: dict[str, float], mode: str) -> None:
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)

    def _needs_generation_entropies(self) -> bool:
        """Whether the selection is made per generation batch, before the training forward."""
        return self.forking.forking_scope in ("step", "sequence") and self.forking.forking_selection != "all"

    def _get_per_token_logps_and_entropies(self, model, *args, compute_entropy=False, **kwargs):
        if self._forking_capture is _CAPTURE_PENDING and model is self.model:
            # TRL's fused head computes the entropy in the same pass; keep it instead of running another forward.
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, *args, compute_entropy=True, **kwargs
            )
            self._forking_capture = entropies
            return logps, entropies if compute_entropy else None, aux
        return super()._get_per_token_logps_and_entropies(model, *args, compute_entropy=compute_entropy, **kwargs)

    def _generate_and_score_completions(self, inputs):
        if not (self.model.training and self._needs_generation_entropies()):
            return super()._generate_and_score_completions(inputs)
        self._forking_capture = _CAPTURE_PENDING
        try:
            output = super()._generate_and_score_completions(inputs)
            captured = self._forking_capture
        finally:
            self._forking_capture = None
        # Without old log-probs the first policy forward was a PEFT reference pass, not the policy's.
        if "old_per_token_logps" in output and isinstance(captured, torch.Tensor):
            output["forking_entropies"] = captured.detach()
        elif self.forking.forking_scope == "step":
            output["forking_entropies"] = self._entropy_forward(output)
        return output

    @torch.no_grad()
    def _entropy_forward(self, batch):
        """Returns (B, T) completion entropies of the policy from one no-grad forward over a generation batch."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        extra = {key: batch[key] for key in _FORWARD_KEYS if batch.get(key) is not None}
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            _, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                batch["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
                compute_entropy=True,
                **extra,
            )
        return entropies.detach()

    def _prepare_inputs(self, generation_batch):
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self.model.training and self._buffered_inputs is not buffered:
            self._select_generation_batch(self._buffered_inputs)
        return inputs

    def _select_generation_batch(self, slices: list[dict]) -> None:
        """Adds to each micro-batch of a new generation batch its forking mask (when known now), the number of
        selected tokens of its optimizer step over all ranks (the "selected" denominator of dapo-like losses) and, on
        one micro-batch per step, that step's forking metrics.

        Micro-batch j is first trained at micro-step ``t_j = s + ((j - s) mod spg)`` (TRL indexes the buffer by
        ``step % spg``); micro-batches with the same ``t_j // GA`` form one optimizer step, whose tokens on every rank
        share one threshold under scope "step".
        """
        scope, selection, rho = (
            self.forking.forking_scope,
            self.forking.forking_selection,
            self.forking.top_entropy_quantile,
        )
        spg, ga, start = self.args.steps_per_generation, self.args.gradient_accumulation_steps, self._step
        valid = [
            (s["completion_mask"] * s["tool_mask"] if "tool_mask" in s else s["completion_mask"]).bool() for s in slices
        ]
        windows: dict[int, list[int]] = {}
        for j in range(len(slices)):
            windows.setdefault((start + (j - start) % spg) // ga, []).append(j)

        if "forking_entropies" in slices[0]:
            for members in windows.values():
                self._select_step(slices, valid, members, scope)

        device = valid[0].device
        local_counts = torch.stack([v.sum() for v in valid]).to(device)
        if "forking_mask" in slices[0]:
            local_selected = torch.stack([s["forking_mask"].sum() for s in slices])
        elif scope == "sequence":
            local_selected = torch.stack([num_selected(v.sum(-1), rho, selection).sum() for v in valid])
        else:  # local, or micro_batch (recomputed below from global counts)
            local_selected = num_selected(local_counts, rho, selection)
        totals = torch.stack([local_counts, local_selected.to(device)])
        if self._forking_group is not None:
            dist.all_reduce(totals, group=self._forking_group)
        per_slice_selected = num_selected(totals[0], rho, selection) if scope == "micro_batch" else totals[1]
        for members in windows.values():
            step_selected = per_slice_selected[members].sum()
            for j in members:
                slices[j]["forking_step_selected"] = step_selected

    def _select_step(self, slices: list[dict], valid: list[torch.Tensor], members: list[int], scope: str) -> None:
        """Adds ``forking_mask`` to the micro-batches ``members`` of one optimizer step, selected over all of them
        (and all ranks), and the step's metrics to the first of them."""
        entropies = torch.cat([slices[j]["forking_entropies"] for j in members])
        mask = torch.cat([valid[j] for j in members])
        selected = self._select(entropies, mask, scope)
        # Logged when the step trains (see get_high_entropy_mask), so each logging step reports its own steps.
        slices[members[0]]["forking_step_metrics"] = self._forking_metrics(entropies, mask, selected)
        for j, part in zip(members, selected.split([valid[j].size(0) for j in members]), strict=True):
            slices[j]["forking_mask"] = part

    # --- loss -----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._forking_inputs = inputs
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._forking_inputs = None

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Returns the (B, T) weights of the policy-gradient term: the forking mask times the normalizer ratio.

        Called by TRL's loss with the training forward's (B, T) ``entropies`` and the (B, T) loss ``mask``;
        ``threshold`` (TRL's quantile) is unused: the selection follows the forking options.
        """
        inputs = self._forking_inputs
        mode = "train" if self.model.training else "eval"
        valid = mask.bool()
        selected = inputs.get("forking_mask") if mode == "train" else None
        if selected is None:
            entropies = entropies.detach()
            if self.forking.forking_scope == "sequence" and mode == "train" and "forking_entropies" in inputs:
                entropies = inputs["forking_entropies"]
            # In eval there is no accumulation: the micro-batch on all ranks is the step.
            scope = "micro_batch" if self.forking.forking_scope == "step" else self.forking.forking_scope
            selected = self._select(entropies, valid, scope)
            self._log_forking_metrics(self._forking_metrics(entropies, valid, selected), mode)
        else:
            entropies = inputs["forking_entropies"]
            if "forking_step_metrics" in inputs:
                self._log_forking_metrics(inputs["forking_step_metrics"], mode)
        self.forking_last_batch = {
            "completion_ids": inputs["completion_ids"],
            "entropies": entropies,
            "mask": valid,
            "selected": selected,
        }
        if self.forking.forking_loss_normalization == "all":
            return selected.to(torch.float32)
        ratio = PG_NORMALIZER_RATIOS[self.loss_type](self, selected, valid, inputs, mode)
        return selected.to(torch.float32) * ratio

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def _forking_state_path(self, checkpoint_dir: str) -> str:
        return os.path.join(checkpoint_dir, f"forking_state_{self.args.process_index}.pt")

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        checkpoint_dir = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        os.makedirs(checkpoint_dir, exist_ok=True)
        torch.save({"generator": self.forking_generator.get_state()}, self._forking_state_path(checkpoint_dir))

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = self._forking_state_path(checkpoint)
        if os.path.isfile(path):
            self.forking_generator.set_state(torch.load(path)["generator"])
        else:
            logger.warning(f"No forking state at {path}: the random selection restarts from its seed.")
