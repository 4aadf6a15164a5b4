"""ForkingGRPOTrainer: GRPO whose policy gradient sees only the forking (high-entropy) tokens."""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.utils import logging
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .callbacks import ForkingStatsCallback
from .config import ForkingGRPOConfig, ForkingOptions
from .entropy import fill_nonfinite_entropies
from .metrics import forking_metrics
from .selection import forking_mask, num_selected

__all__ = ["PG_NORMALIZER_RATIOS", "ForkingGRPOTrainer", "TokenCounts"]

logger = logging.get_logger(__name__)

# TRL consults `get_high_entropy_mask` only while `top_entropy_quantile < 1`. Just below 1 keeps our override on for
# every selection (metrics, "bottom", "random", rho = 1) without changing anything else TRL computes.
_HOOK_ALWAYS_ON = math.nextafter(1.0, 0.0)
# Marks a generation pass whose first policy forward (TRL's old log-probs) should hand us its entropies.
_CAPTURE_PENDING = object()
# The (B, T) completion tensors of a micro-batch, TRL's and ours: what trimming cuts to the longest completion.
_COMPLETION_KEYS = (
    "completion_ids",
    "completion_mask",
    "tool_mask",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
    "importance_sampling_ratio",
    "forking_mask",
    "forking_entropies",
)
# Inputs that span prompt and completion (multimodal): a micro-batch holding one is not trimmed.
_SPANNING_KEYS = ("token_type_ids", "mm_token_type_ids")
# Loss types whose importance weight is built from every token of a sequence: the compact forward would change it.
_SEQUENCE_RATIO_LOSSES = ("luspo", "vespo")
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


@dataclass(frozen=True)
class TokenCounts:
    """Token counts of the population a policy-gradient denominator covers, pooled over all ranks.

    ``trl`` is the number of tokens TRL's denominator stands for, ``selected`` the number of selected tokens that
    replace them under ``forking_loss_normalization="selected"``.
    """

    trl: torch.Tensor
    selected: torch.Tensor

    def ratio(self) -> torch.Tensor:
        """Returns ``trl / selected`` (0 when nothing is selected: then every weight is 0 anyway)."""
        selected = self.selected.float()
        return torch.where(selected > 0, self.trl.float() / selected.clamp(min=1), 0.0)


def _per_sequence_ratio(selected, valid, counts):
    """grpo / sapo average each sequence over its n_i valid tokens: row i gets ``n_i / s_i`` (s_i selected)."""
    return TokenCounts(valid.sum(-1, keepdim=True), selected.sum(-1, keepdim=True)).ratio()


def _population_ratio(selected, valid, counts):
    """dapo / cispo / vespo / bnpo divide by a token count of the step (or micro-batch): ``trl / selected``."""
    return counts.ratio()


def _unit_ratio(selected, valid, counts):
    """dr_grpo (B * max_completion_length) and luspo (sum per sequence) count no tokens: nothing to rescale."""
    return 1.0


# How TRL's policy-gradient denominator D_all becomes the selected-token denominator D_sel, per loss type: the hook's
# weights are ``m * r`` with ``r = D_all / D_sel``, so that ``sum(l * m * r) / D_all = sum(l * m) / D_sel``.
PG_NORMALIZER_RATIOS = {
    "grpo": _per_sequence_ratio,
    "sapo": _per_sequence_ratio,
    "bnpo": _population_ratio,
    "dapo": _population_ratio,
    "cispo": _population_ratio,
    "vespo": _population_ratio,
    "dr_grpo": _unit_ratio,
    "luspo": _unit_ratio,
}
# Loss types whose D_all is TRL's estimate of the optimizer step's tokens, ``num_items_in_batch * GA / spg``.
_GENERATION_BATCH_NORMALIZED = ("dapo", "cispo", "vespo")


@contextlib.contextmanager
def _compact_on_cpu():
    """Lets TRL's fused LM head project only the labelled positions on the CPU too, for the calls inside.

    TRL compacts on Triton devices (CUDA, XPU) and projects every position elsewhere, to keep tile shapes fixed for
    compilers such as Neuron's; in eager CPU mode compacting is as exact and saves the same work. TRL decides with
    ``trl.trainer.utils._use_triton`` (its kernels pick their own path by another reference, which is left alone);
    without it the head runs as TRL runs it, still exact.
    """
    from trl.trainer import utils

    original = getattr(utils, "_use_triton", None)
    if original is None:
        yield
        return
    utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        utils._use_triton = original


class ForkingGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose policy-gradient term trains only on forking tokens ("Beyond the 80/20 Rule").

    The only changes w.r.t. GRPOTrainer: which completion tokens enter the policy-gradient term of the loss
    (``forking_mask`` over the configured scope) and, with ``forking_loss_normalization="selected"``, its denominator
    (the number of selected tokens instead of all tokens). TRL's loss code runs unchanged for every ``loss_type``:
    inside ``compute_loss`` the selection enters through TRL's own ``get_high_entropy_mask`` hook as per-token weights
    ``w = m * r``, with ``m`` the forking mask and ``r = D_all / D_sel`` (``PG_NORMALIZER_RATIOS``), so that
    ``sum(l * w) / D_all = sum(l * m) / D_sel``. Called from anywhere else, ``get_high_entropy_mask`` is TRL's.

    Denominators under "selected" (all counts pooled over the ranks):

    - dapo, cispo, vespo: the selected tokens of the optimizer step, ``S_step`` (TRL: the step's tokens);
    - bnpo: TRL's micro-batch mean rescaled by ``N_step / S_step``, so it depends on the split exactly as TRL's bnpo
      does (not at all when the micro-batches hold equal token counts);
    - grpo, sapo: each sequence's selected tokens ``s_i`` (TRL: its tokens ``n_i``);
    - dr_grpo, luspo: unchanged (no token count in them).

    When an optimizer step spans generation batches (``steps_per_generation`` below, or not a multiple of,
    ``gradient_accumulation_steps``), the part of it in one generation batch, ``p`` of its ``GA`` micro-batches,
    is selected on its own and stands for ``p / GA`` of the step: its counts are extrapolated to the step,
    ``S_step ~ S_part * GA / p`` (and ``N_step`` likewise), as TRL extrapolates its own token count
    (``num_items_in_batch * GA / spg``). With a loss of 1 on every selected token a step's weights then sum to 1
    whatever the split; each part draws its own random-selection stream.

    Completions whose advantage is exactly 0 (a group whose rewards are all equal) are left out of the selection
    population and of the selected counts (``forking_ignore_zero_advantage``, on by default): DAPO's dynamic sampling
    drops those groups before the paper takes its top 20%, and they contribute no policy gradient. TRL's own
    denominators (``D_all``) and the KL term still count every completion token.

    The KL term keeps every completion token. An entropy bonus (``entropy_coef``) is the mean entropy of the selected
    tokens of each micro-batch under every loss type (TRL would weight it by ``w``; the difference is added back).

    Entropies for scope ``"step"`` (and ``"sequence"`` when available) come from the policy that generated the
    batch: read from TRL's old-log-prob forward when it runs one (vLLM importance sampling, ``num_iterations > 1``,
    ``steps_per_generation > gradient_accumulation_steps``), otherwise from one extra no-grad forward per generation
    batch (about a third of a training forward + backward). The selection is then fixed before the training forward:
    for the first optimizer step of a rollout those are the weights it trains; the later steps of a rollout
    (``steps_per_generation > gradient_accumulation_steps``) select on a policy one or more updates old, unless
    ``forking_refresh_entropies`` re-selects each of them on the current policy (one no-grad forward per step).
    ``forking/mask_overlap_current`` measures the difference every step. Scopes ``"micro_batch"`` and ``"local"``
    use the training forward's entropies, as TRL and the authors' code do.

    Entropies that TRL's fused LM head returns as NaN where the logits hold -inf (a masked vocabulary,
    huggingface/trl#7221) are recomputed from the model's logits (``trl_forking.entropy.fill_nonfinite_entropies``).
    A top or bottom selection refuses other non-finite entropies on every rank; ``forking_selection="all"`` and
    ``"random"`` train on, as TRL does, and ``forking/entropy_nonfinite`` counts them.

    A micro-batch that did not pass through ``_prepare_inputs`` (no ``forking_mask`` / ``forking_step_selected``
    keys, e.g. ``compute_loss`` called on the output of ``_generate_and_score_completions``) is selected on its own
    over all ranks, as scope ``"micro_batch"`` does, with the micro-batch's counts in place of the step's. Evaluation
    does the same (there is no accumulation in evaluation).

    Random selection draws from a generator seeded by ``(seed, rank, optimizer step, part of the step)``
    (evaluation: its own stream), so resuming from a checkpoint continues it exactly with no extra state, and
    evaluation never shifts it.

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
                f"gradient_accumulation_steps={args.gradient_accumulation_steps}: an optimizer step that spans "
                "generation batches is selected part by part, one threshold per generation batch, each part "
                "weighted by the share of the step it stands for (as TRL weights its token counts)."
            )
        self.top_entropy_quantile = min(self.forking.top_entropy_quantile, _HOOK_ALWAYS_ON)
        # The last micro-batch's completion_ids, entropies, mask and selected tokens, for callbacks and analysis.
        self.forking_last_batch: dict[str, torch.Tensor] | None = None
        self._forking_inputs = None
        self._forking_capture = None
        self._forking_bonus_correction = None
        self._forking_eval_draws = 0
        self._forking_generation_start = 0  # TRL's micro-step counter when the buffered generation batch was made
        self._forking_compacts = self._compact_is_exact()
        self._forking_full_head = False
        self._forking_warned_nonfinite = False
        # transformers never hands callbacks the trainer; give ours this one so `callbacks=[ForkingStatsCallback()]`
        # works as is.
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ForkingStatsCallback) and callback.trainer is None:
                callback.bind(self)

    # --- selection ------------------------------------------------------------------------------------------------

    @property
    def _forking_group(self):
        return dist.group.WORLD if self.accelerator.num_processes > 1 else None

    def _forking_generator(self, stream: str, index: str) -> torch.Generator | None:
        """Returns the generator of the random selection for ``(seed, rank, stream, index)`` (None unless "random").

        Derived, not stored: the same step draws the same tokens after a resume, and one stream never shifts another
        (evaluation draws from "eval", training from "step" / "micro_step").
        """
        if self.forking.forking_selection != "random":
            return None
        key = f"{self.args.seed}/{self.accelerator.process_index}/{stream}/{index}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator().manual_seed(seed)

    def _select(self, entropies, valid, scope, generator=None):
        """Returns the (B, T) forking mask of one population of tokens under ``scope``."""
        return forking_mask(
            entropies,
            valid,
            self.forking.top_entropy_quantile,
            self.forking.forking_selection,
            per_sequence=scope == "sequence",
            group=None if scope == "local" else self._forking_group,
            generator=generator,
        )

    def _forking_metrics(self, entropies, population, selected, completion) -> dict[str, float]:
        return forking_metrics(
            entropies, population, selected, self.forking.top_entropy_quantile, self._forking_group, completion
        )

    def _log_forking_metrics(self, metrics: dict[str, float], mode: str) -> None:
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)

    def _population(self, mask: torch.Tensor, advantages: torch.Tensor | None) -> torch.Tensor:
        """Returns the (B, T) bool selection population: the loss ``mask`` (completion times tool mask) without the
        completions whose ``advantages`` ((B,) or (B, T)) are exactly 0, unless ``forking_ignore_zero_advantage`` is
        off."""
        valid = mask.bool()
        if not self.forking.forking_ignore_zero_advantage or advantages is None:
            return valid
        informative = advantages != 0
        return valid & (informative.unsqueeze(-1) if informative.dim() == 1 else informative)

    def _needs_generation_entropies(self) -> bool:
        """Whether the selection is made per generation batch, before the training forward."""
        return self.forking.forking_scope in ("step", "sequence") and self.forking.forking_selection != "all"

    def _refreshes_entropies(self) -> bool:
        """Whether the optimizer steps after the first of a rollout are re-selected on the current policy."""
        return (
            self.forking.forking_refresh_entropies
            and self._needs_generation_entropies()
            and self.forking.forking_selection in ("top", "bottom")
            and self.args.steps_per_generation > self.args.gradient_accumulation_steps
        )

    def _compact_is_exact(self) -> bool:
        """Whether the training forward may project the LM head at the selected tokens only: nothing else in the loss
        reads another token's log-prob or entropy (``forking_compact_lm_head``'s conditions)."""
        return (
            self.forking.forking_compact_lm_head
            and self.beta == 0.0
            and self._needs_generation_entropies()
            and self.loss_type not in _SEQUENCE_RATIO_LOSSES
            and self.importance_sampling_level == "token"
            and self.off_policy_mask_threshold is None
            and not self.aux_loss_enabled
        )

    def _current_entropies(self, entropies: torch.Tensor, inputs: dict) -> torch.Tensor | None:
        """Returns the current policy's (B, T) entropies of a training micro-batch whose mask an older policy chose,
        for ``forking/mask_overlap_current``: the training forward's when it projected every position, else one
        no-grad forward on the first micro-batch of each logged optimizer step (None on the others; the compact head
        did not compute them)."""
        if self._forking_full_head:
            return entropies
        logging_steps = getattr(self.state, "logging_steps", None) or 1
        if self._step % self.args.gradient_accumulation_steps or (self.state.global_step + 1) % logging_steps:
            return None
        return self._entropy_forward(inputs)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, *args, compute_entropy=False, **kwargs
    ):
        inputs = self._forking_inputs
        if inputs is not None:  # the training (or evaluation) forward inside compute_loss
            compact = (
                self._forking_compacts
                and self.model.training
                and "forking_mask" in inputs
                and not args
                and not kwargs.get("compute_aux_loss")
                and all(v is None for k, v in kwargs.items() if k not in ("batch_size", "compute_aux_loss"))
            )
            if compact:
                return self._compact_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, inputs)
            self._forking_full_head = True
        capture = self._forking_capture is _CAPTURE_PENDING and model is self.model
        # TRL's fused head computes the entropy in the same pass; keep it instead of running another forward.
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            *args,
            compute_entropy=compute_entropy or capture,
            **kwargs,
        )
        if entropies is not None:
            entropies = self._finite_entropies(model, input_ids, attention_mask, logits_to_keep, entropies)
        if capture:
            self._forking_capture = entropies
            return logps, entropies if compute_entropy else None, aux
        return logps, entropies, aux

    def _compact_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, inputs):
        """Returns TRL's ``(logps, entropies, None)`` for a training micro-batch from a forward whose LM head projects
        only the selected completion tokens.

        Those get the policy's log-prob and entropy, with their gradient. The others, which the loss weights by 0,
        get the old log-prob (so the importance ratio is exactly 1: a 0 there would give ``exp(0 - old)``, which
        overflows where ``old < -88``) and the rollout pass's entropy (so TRL's ``entropy`` metric still covers every
        token). The body of the model still runs over every position; only the ``(positions, vocabulary)`` work
        shrinks, to the selected share.
        """
        selected = inputs["forking_mask"]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        labels[:, -logits_to_keep:] = labels[:, -logits_to_keep:].masked_fill(~selected, -100)
        with self.accelerator.autocast(), _compact_on_cpu():
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        logps, entropies = outputs.log_probs[:, -logits_to_keep:], outputs.entropy[:, -logits_to_keep:]
        entropies = torch.where(selected, entropies, 0.0)  # 0 where not projected, then NaN only where TRL made one
        entropies = self._finite_entropies(model, input_ids, attention_mask, logits_to_keep, entropies)
        old = inputs.get("old_per_token_logps")
        old = torch.zeros_like(logps) if old is None else old.to(logps.dtype)  # TRL's old is then logps.detach()
        logps = torch.where(selected, logps, old)
        entropies = torch.where(selected, entropies, inputs["forking_entropies"].to(entropies.dtype))
        return logps, entropies, None

    def _finite_entropies(self, model, input_ids, attention_mask, logits_to_keep, entropies):
        """Returns ``entropies`` with the NaN that TRL's fused head gives next to -inf logits recomputed (the
        module docstring of ``trl_forking.entropy``); values elsewhere, and their gradient, unchanged."""
        first = input_ids.size(1) - logits_to_keep - 1  # the position whose logits predict the first completion token
        filled, count = fill_nonfinite_entropies(model, input_ids, attention_mask, entropies, first, self.temperature)
        if not count:
            return entropies
        if not self._forking_warned_nonfinite:
            self._forking_warned_nonfinite = True
            logger.warning(
                f"{count} completion token(s) got a non-finite entropy from TRL's fused LM head (NaN next to -inf "
                "logits, huggingface/trl#7221); recomputing them from the model's logits, one extra forward per "
                "affected completion. Shown once."
            )
        return torch.where(torch.isfinite(entropies), entropies, filled)

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
        if self.model.training:
            if self._buffered_inputs is not buffered:
                self._select_generation_batch(self._buffered_inputs)
            elif self._refreshes_entropies() and self._step % self.args.gradient_accumulation_steps == 0:
                self._refresh_step(self._buffered_inputs)
            inputs = self._trimmed(inputs)
        return inputs

    def _trimmed(self, inputs: dict) -> dict:
        """Returns ``inputs`` cut to its longest completion (``forking_trim_padding``): a shallow copy whose (B, T)
        completion tensors keep their first ``t`` columns, ``t`` the last position any row's completion mask holds
        (at least 1). The buffered generation batch keeps its width; inputs that span prompt and completion
        (``_SPANNING_KEYS``) are returned as they are."""
        if not self.forking.forking_trim_padding or any(inputs.get(key) is not None for key in _SPANNING_KEYS):
            return inputs
        mask = inputs["completion_mask"]
        width = mask.size(1)
        columns = mask.bool().any(0).nonzero()
        keep = int(columns.max()) + 1 if columns.numel() else 1
        if keep == width:
            return inputs
        trimmed = dict(inputs)
        for key in _COMPLETION_KEYS:
            value = inputs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.size(1) == width:
                trimmed[key] = value[:, :keep]
        return trimmed

    def _step_windows(self, count: int, start: int) -> dict[int, list[int]]:
        """Returns ``{optimizer step window: [micro-batch j, ...]}`` for the ``count`` micro-batches of a generation
        batch made at micro-step ``start``.

        Micro-batch j is first trained at micro-step ``t_j = s + ((j - s) mod spg)`` (TRL indexes the buffer by
        ``step % spg``); micro-batches with the same ``t_j // GA`` belong to one optimizer step. A window with fewer
        than GA members is the part of a step that spans generation batches.
        """
        spg, ga = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        windows: dict[int, list[int]] = {}
        for j in range(count):
            windows.setdefault((start + (j - start) % spg) // ga, []).append(j)
        return windows

    def _window_generator(self, window: int, members: list[int], start: int) -> torch.Generator | None:
        """Returns the random-selection generator of the part ``members`` of optimizer step ``window``: one stream per
        (optimizer step, position of the part's first micro-batch in the step), counted from the start of training
        (resume included)."""
        spg, ga = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        step = self.state.global_step + window - start // ga
        offset = (start + (members[0] - start) % spg) % ga
        return self._forking_generator("step", f"{step}.{offset}")

    def _select_generation_batch(self, slices: list[dict]) -> None:
        """Adds to each micro-batch of a new generation batch its forking mask (when known now), the numbers of
        completion and selected tokens of its optimizer step over all ranks (``forking_step_valid``,
        ``forking_step_selected``: the denominators, extrapolated to the whole step for the part of a step that
        spans generation batches) and, on one micro-batch per step, that step's forking metrics.

        Under scope "step" the tokens of one optimizer step (one window of ``_step_windows``) on every rank share one
        threshold.
        """
        scope, selection, rho = (
            self.forking.forking_scope,
            self.forking.forking_selection,
            self.forking.top_entropy_quantile,
        )
        ga, start = self.args.gradient_accumulation_steps, self._step
        self._forking_generation_start = start
        completion, population = self._masks(slices)
        windows = self._step_windows(len(slices), start)

        if "forking_entropies" in slices[0]:
            for window, members in windows.items():
                generator = self._window_generator(window, members, start)
                self._select_step(slices, completion, population, members, scope, generator)

        device = completion[0].device
        local_counts = torch.stack([c.sum() for c in completion]).to(device)
        local_population = torch.stack([p.sum() for p in population]).to(device)
        if "forking_mask" in slices[0]:
            local_selected = torch.stack([s["forking_mask"].sum() for s in slices])
        elif scope == "sequence":
            local_selected = torch.stack([num_selected(p.sum(-1), rho, selection).sum() for p in population])
        else:  # local, or micro_batch (recomputed below from global counts)
            local_selected = num_selected(local_population, rho, selection)
        totals = torch.stack([local_counts, local_selected.to(device), local_population])
        if self._forking_group is not None:
            dist.all_reduce(totals, group=self._forking_group)
        per_slice_selected = num_selected(totals[2], rho, selection) if scope == "micro_batch" else totals[1]
        for members in windows.values():
            # p of the step's GA micro-batches stand for p / GA of it: their counts, extrapolated to the step.
            scale = ga / len(members)
            step_valid = totals[0][members].sum().double() * scale
            step_selected = per_slice_selected[members].sum().double() * scale
            for j in members:
                slices[j]["forking_step_valid"] = step_valid
                slices[j]["forking_step_selected"] = step_selected

    def _masks(self, slices: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns each micro-batch's (B, T) bool completion mask (times the tool mask) and selection population."""
        completion = [
            (s["completion_mask"] * s["tool_mask"] if "tool_mask" in s else s["completion_mask"]).bool() for s in slices
        ]
        population = [self._population(c, s.get("advantages")) for c, s in zip(completion, slices, strict=True)]
        return completion, population

    def _select_step(self, slices, completion, population, members, scope, generator) -> None:
        """Adds ``forking_mask`` to the micro-batches ``members`` of one optimizer step, selected over all of them
        (and all ranks), and the step's metrics to the first of them."""
        entropies = torch.cat([slices[j]["forking_entropies"] for j in members])
        mask = torch.cat([population[j] for j in members])
        selected = self._select(entropies, mask, scope, generator)
        # Logged when the step trains (see get_high_entropy_mask), so each logging step reports its own steps.
        step_completion = torch.cat([completion[j] for j in members])
        slices[members[0]]["forking_step_metrics"] = self._forking_metrics(entropies, mask, selected, step_completion)
        for j, part in zip(members, selected.split([population[j].size(0) for j in members]), strict=True):
            slices[j]["forking_mask"] = part
            slices[j]["forking_policy_step"] = self.state.global_step  # the optimizer step whose weights chose it

    def _refresh_step(self, slices: list[dict]) -> None:
        """Re-selects the optimizer step that starts at this micro-step on the current policy's entropies (one
        no-grad forward over the step's micro-batches on each rank). Its counts, and so its denominators, stay."""
        start, ga = self._forking_generation_start, self.args.gradient_accumulation_steps
        window = self._step // ga
        members = self._step_windows(len(slices), start).get(window)
        if not members:  # a later pass over the buffer (num_iterations > 1): its windows were laid out for the first
            return
        for j in members:
            slices[j]["forking_entropies"] = self._entropy_forward(slices[j])
        completion, population = self._masks(slices)
        generator = self._window_generator(window, members, start)
        self._select_step(slices, completion, population, members, self.forking.forking_scope, generator)

    def _tracks_staleness(self) -> bool:
        """Whether the selection depends on the entropies (so that an older policy's could select other tokens)."""
        return self.forking.forking_selection in ("top", "bottom")

    def _overlap_with_current(self, entropies, population, selected) -> float:
        """Returns ``|M & C| / |M|`` over all ranks: ``M`` the micro-batch's precomputed selection, ``C`` as many of
        its population's tokens (per completion under scope "sequence") chosen by the same rule from the training
        forward's ``entropies``, the current policy's. 1.0: the precomputed mask is what the current policy would
        select (at micro-batch granularity)."""
        sign = 1.0 if self.forking.forking_selection == "top" else -1.0
        scores = (sign * entropies.detach().float()).masked_fill(~population, float("-inf"))
        if self.forking.forking_scope == "sequence":
            order = scores.argsort(dim=-1, descending=True, stable=True)
            ranks = torch.empty_like(order)
            ranks.scatter_(-1, order, torch.arange(order.size(-1), device=order.device).expand_as(order))
            current = ranks < selected.sum(-1, keepdim=True)
        else:
            flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
            flat[scores.flatten().topk(int(selected.sum())).indices] = True
            current = flat.view_as(selected)
        counts = torch.stack([(current & selected & population).sum(), selected.sum()]).double()
        if self._forking_group is not None:
            dist.all_reduce(counts, group=self._forking_group)
        return float(counts[0] / counts[1]) if counts[1] else math.nan

    # --- loss -----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        coef = self._entropy_bonus_coef()  # read before TRL's adaptive controller updates it
        self._forking_inputs, self._forking_bonus_correction = inputs, None
        self._forking_full_head = False  # set by the forward when it projects every position
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._forking_inputs = None
        if self._forking_bonus_correction is not None and coef:
            loss = loss + coef * self._forking_bonus_correction
        self._forking_bonus_correction = None
        return loss

    def _entropy_bonus_coef(self) -> float:
        """Returns the entropy-bonus coefficient TRL applies to the coming micro-batch (0 when the bonus is off)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return self.entropy_coef

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Returns TRL's high-entropy mask, or, inside ``compute_loss``, the (B, T) weights of the forking selection.

        Outside ``compute_loss`` (any caller but TRL's loss on our path) this is ``GRPOTrainer.get_high_entropy_mask``:
        the bool mask of the valid tokens whose entropy reaches the ``threshold`` quantile. Inside, TRL's loss calls it
        with the training forward's (B, T) ``entropies`` and loss ``mask``; ``threshold`` is then unused and the
        weights ``m * r`` of the class docstring are returned.
        """
        inputs = getattr(self, "_forking_inputs", None)
        if inputs is None:
            return super().get_high_entropy_mask(entropies, mask, threshold)
        return self._policy_gradient_weights(entropies, mask, inputs)

    def _policy_gradient_weights(self, entropies: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Returns the (B, T) float weights ``m * r`` for one micro-batch and publishes it in ``forking_last_batch``."""
        mode = "train" if self.model.training else "eval"
        valid = mask.bool()
        population = self._population(mask, inputs.get("advantages"))
        selected = inputs.get("forking_mask") if mode == "train" else None
        if selected is None:
            scope = "micro_batch" if self.forking.forking_scope == "step" else self.forking.forking_scope
            scores = entropies.detach()
            if scope == "sequence" and mode == "train" and "forking_entropies" in inputs:
                scores = inputs["forking_entropies"]
            if mode == "train":
                # (optimizer step, position in its accumulation window): the same after a resume, which restarts TRL's
                # micro-step counter at a step boundary.
                position = self._step % self.current_gradient_accumulation_steps
                generator = self._forking_generator("micro_step", f"{self.state.global_step}.{position}")
            else:
                self._forking_eval_draws += 1
                generator = self._forking_generator("eval", str(self._forking_eval_draws))
            selected = self._select(scores, population, scope, generator)
            self._log_forking_metrics(self._forking_metrics(scores, population, selected, valid), mode)
        else:
            scores = inputs["forking_entropies"]
            if "forking_step_metrics" in inputs:
                self._log_forking_metrics(inputs["forking_step_metrics"], mode)
            # A mask chosen at an earlier optimizer step (several steps per rollout, no refresh) is stale by as much
            # as this shows; every rank takes the same branch (step counters and options only).
            stale = inputs.get("forking_policy_step", self.state.global_step) < self.state.global_step
            current = self._current_entropies(entropies, inputs) if stale and self._tracks_staleness() else None
            if current is not None:
                overlap = self._overlap_with_current(current, population, selected)
                self._log_forking_metrics({"forking/mask_overlap_current": overlap}, mode)
        self.forking_last_batch = {
            "completion_ids": inputs["completion_ids"],
            "entropies": scores,
            "mask": population,
            "selected": selected,
        }
        weights = selected.to(torch.float32)
        if self.forking.forking_loss_normalization == "selected":
            counts = self._token_counts(inputs, mode, valid, selected)
            weights = weights * PG_NORMALIZER_RATIOS[self.loss_type](selected, valid, counts)
        if self._entropy_bonus_enabled:
            self._correct_entropy_bonus(entropies, mask, selected, weights, mode)
        return weights

    def _token_counts(self, inputs: dict, mode: str, valid: torch.Tensor, selected: torch.Tensor) -> TokenCounts | None:
        """Returns the counts of the population the loss type's denominator covers (None for per-sequence losses).

        In training, with the step's counts known: ``(num_items * GA / spg, S_step)`` for dapo-like losses (TRL's
        estimate of the step's tokens, so that the step's update divides by exactly ``S_step``) and
        ``(N_step, S_step)`` for bnpo. Otherwise (evaluation, or a micro-batch that skipped ``_prepare_inputs``): the
        micro-batch's ``(N, S)`` over all ranks.
        """
        if self.loss_type not in _GENERATION_BATCH_NORMALIZED and self.loss_type != "bnpo":
            return None
        if mode == "train" and "forking_step_selected" in inputs:
            if self.loss_type == "bnpo":
                return TokenCounts(inputs["forking_step_valid"], inputs["forking_step_selected"])
            step_tokens = inputs["num_items_in_batch"].float() * (
                self.current_gradient_accumulation_steps / self.args.steps_per_generation
            )
            return TokenCounts(step_tokens, inputs["forking_step_selected"])
        totals = torch.stack([valid.sum(), selected.sum()]).float()
        if self._forking_group is not None:
            dist.all_reduce(totals, group=self._forking_group)
        return TokenCounts(totals[0], totals[1])

    def _correct_entropy_bonus(self, entropies, mask, selected, weights, mode) -> None:
        """Makes TRL's entropy bonus the mean entropy of the selected tokens whatever the weights.

        TRL's bonus (and its adaptive controller's statistics) average the entropy with ``mask * weights``; with
        per-sequence ratios (grpo, sapo under "selected") that is not the mean over the selected tokens. The
        difference, divided by the accumulation factor as TRL divides its bonus, is kept for ``compute_loss`` to add
        (``loss - c * H_trl + c * (H_trl - H_sel)``); the controller's window is pre-corrected by the same difference.
        """
        trl_weights = mask * weights
        ours = mask * selected
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        trl_mean = (entropies * trl_weights).sum() / trl_weights.sum().clamp(min=1.0)
        our_mean = (entropies * ours).sum() / ours.sum().clamp(min=1.0)
        self._forking_bonus_correction = (trl_mean - our_mean) / accumulation
        if self.use_adaptive_entropy and mode == "train":
            # TRL adds ``[sum(H * mask * w), sum(mask * w)]`` to its window right after this hook returns.
            trl_stats = torch.stack([(entropies * trl_weights).sum(), trl_weights.sum()]).detach()
            our_stats = torch.stack([(entropies * ours).sum(), ours.sum()]).detach().to(trl_stats.dtype)
            window = self._entropy_window_stats
            self._entropy_window_stats = (our_stats - trl_stats) + (0 if window is None else window)
