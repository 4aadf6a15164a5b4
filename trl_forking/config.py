"""ForkingGRPOConfig: TRL's GRPOConfig plus the forking-token options of "Beyond the 80/20 Rule"."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from .selection import SELECTIONS, check_quantile

__all__ = ["LOSS_NORMALIZATIONS", "SCOPES", "ForkingGRPOConfig", "ForkingOptions"]

SCOPES = ("step", "micro_batch", "local", "sequence")
LOSS_NORMALIZATIONS = ("selected", "all")
DEFAULTS = {
    "forking_selection": "top",
    "forking_scope": "step",
    "forking_loss_normalization": "selected",
    "forking_ignore_zero_advantage": True,
    "forking_refresh_entropies": False,
    "forking_compact_lm_head": True,
    "forking_trim_padding": True,
}


@dataclass(frozen=True)
class ForkingOptions:
    """The forking-token options, validated; what the trainer reads whatever config class it was given."""

    top_entropy_quantile: float = 0.2
    forking_selection: str = DEFAULTS["forking_selection"]
    forking_scope: str = DEFAULTS["forking_scope"]
    forking_loss_normalization: str = DEFAULTS["forking_loss_normalization"]
    forking_ignore_zero_advantage: bool = DEFAULTS["forking_ignore_zero_advantage"]
    forking_refresh_entropies: bool = DEFAULTS["forking_refresh_entropies"]
    forking_compact_lm_head: bool = DEFAULTS["forking_compact_lm_head"]
    forking_trim_padding: bool = DEFAULTS["forking_trim_padding"]

    def __post_init__(self):
        check_quantile(self.top_entropy_quantile, "top_entropy_quantile")
        for name, allowed in (
            ("forking_selection", SELECTIONS),
            ("forking_scope", SCOPES),
            ("forking_loss_normalization", LOSS_NORMALIZATIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")
        for name in (
            "forking_ignore_zero_advantage",
            "forking_refresh_entropies",
            "forking_compact_lm_head",
            "forking_trim_padding",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.forking_selection == "bottom" and self.top_entropy_quantile == 1.0:
            raise ValueError(
                "forking_selection='bottom' keeps the tokens outside the top rho, so top_entropy_quantile=1.0 would "
                "select nothing; use a value in (0, 1) (the paper's ablation uses 0.2)."
            )

    @classmethod
    def from_args(cls, args) -> ForkingOptions:
        """Returns the options of ``args``; a plain ``GRPOConfig`` gives its rho and our defaults for the rest."""
        return cls(
            top_entropy_quantile=args.top_entropy_quantile,
            **{name: getattr(args, name, default) for name, default in DEFAULTS.items()},
        )


@dataclass
class ForkingGRPOConfig(GRPOConfig):
    """Configuration for `ForkingGRPOTrainer`: every `trl.GRPOConfig` field, plus how forking tokens are selected.

    The policy-gradient term sees only the selected tokens; the KL term (``beta > 0``) keeps every completion token.
    """

    top_entropy_quantile: float = field(
        default=0.2,
        metadata={
            "help": "rho of Beyond the 80/20 Rule: the share of completion tokens, by highest entropy, that the "
            "policy-gradient term trains on. Exactly ceil(rho * N) of the N tokens of the selection scope. Range "
            "(0, 1]; the paper uses 0.2. 1.0 trains on every token."
        },
    )
    forking_selection: str = field(
        default=DEFAULTS["forking_selection"],
        metadata={
            "help": "Which tokens enter the policy gradient: 'top' (the top-rho highest-entropy tokens, the paper), "
            "'bottom' (the complement of 'top', the paper's bottom-80% ablation), 'random' (a uniformly random "
            "rho share, the control) or 'all' (plain GRPO, every token).",
            "choices": list(SELECTIONS),
        },
    )
    forking_scope: str = field(
        default=DEFAULTS["forking_scope"],
        metadata={
            "help": "Over which tokens the top-rho threshold is taken: 'step' (all completion tokens of the optimizer "
            "step, across every rank and accumulation micro-batch: independent of batch size, accumulation and world "
            "size), 'micro_batch' (one micro-batch on all ranks: TRL's behaviour), 'local' (this rank's micro-batch: "
            "the authors' code) or 'sequence' (top-rho within each completion).",
            "choices": list(SCOPES),
        },
    )
    forking_loss_normalization: str = field(
        default=DEFAULTS["forking_loss_normalization"],
        metadata={
            "help": "Denominator of the policy-gradient term: 'selected' (the number of selected tokens, as the "
            "authors' code does) or 'all' (every completion token, as TRL does). Loss types without a token count in "
            "their denominator (dr_grpo, luspo) are the same under both.",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    forking_ignore_zero_advantage: bool = field(
        default=DEFAULTS["forking_ignore_zero_advantage"],
        metadata={
            "help": "Leave completions whose advantage is exactly 0 (a group whose rewards are all equal) out of the "
            "selection and of the 'selected' counts, as DAPO's dynamic sampling drops those groups before the paper "
            "takes its top 20%. False keeps TRL's behaviour: they compete for the top-rho slots and count in the "
            "denominator, though they contribute no gradient. The KL term is not affected."
        },
    )
    forking_refresh_entropies: bool = field(
        default=DEFAULTS["forking_refresh_entropies"],
        metadata={
            "help": "With steps_per_generation > gradient_accumulation_steps under scope 'step' or 'sequence': "
            "re-select each optimizer step after the first of a rollout on the current policy's entropies (one "
            "no-grad forward over that step's micro-batches), instead of the rollout policy's. The metric "
            "forking/mask_overlap_current shows how much the two differ."
        },
    )
    forking_compact_lm_head: bool = field(
        default=DEFAULTS["forking_compact_lm_head"],
        metadata={
            "help": "Project the LM head in the training forward and backward only at the selected tokens, where "
            "that is exact: beta = 0 (no KL), the selection known before the forward (scope 'step' or 'sequence'), "
            "token-level importance ratios (not luspo / vespo / importance_sampling_level='sequence') and no "
            "off-policy mask. Ignored elsewhere. The gradient is the same; TRL's 'entropy' and 'clip_ratio' "
            "metrics then read the other tokens from the rollout pass (docs/performance.md)."
        },
    )
    forking_trim_padding: bool = field(
        default=DEFAULTS["forking_trim_padding"],
        metadata={
            "help": "Cut each training micro-batch to its longest completion before the forward: TRL pads every "
            "micro-batch to the longest completion of its generation batch. Exact (padding never reaches a "
            "causal LM's earlier positions, and no loss type's denominator counts padding); skipped for inputs "
            "that span prompt and completion (multimodal token_type_ids)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        ForkingOptions.from_args(self)  # raises a ValueError naming the field on a bad value
