"""What a training launch will do, from its parsed configs, before a GPU hour is spent: ``--dry_run``.

``recipes/grpo_forking.py --dry_run`` parses the recipe as a run on the planned launch would (TRL's own
``GRPOConfig`` checks and batch derivations at the launch's world size, ``planned_config_class``), then
``make_plan`` turns the configs into a plan dict and ``format_plan`` prints it: prompts and completions per rollout
and per optimizer step, tokens and selected tokens per step at the maximum length, the parameter count from the
model's config (a meta-device model: no weights), DeepSpeed's own estimate of the model states per GPU, the vLLM
mode and tensor-parallel size, checkpoint size and disk use under ``save_total_limit``, and every setting that differs
from the paper's. A combination that TRL, accelerate, DeepSpeed or vLLM would refuse raises ``UsageError``.

The launch is not part of a recipe: it comes from the command line (``LaunchArguments``), as ``accelerate launch``
takes it: an accelerate config file and optional ``--num_processes`` / ``--num_machines`` overrides.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

from ..selection import num_selected
from .usage import UsageError, input_errors

__all__ = [
    "PAPER",
    "Launch",
    "LaunchArguments",
    "checkpoint_bytes",
    "count_parameters",
    "format_plan",
    "launch_help",
    "make_plan",
    "parse_launch_arguments",
    "planned_config_class",
    "read_launch",
]


@dataclass
class LaunchArguments:
    """The command-line fields of ``--dry_run``: the launch to plan for (given on the command line, not in a recipe)."""

    dry_run: bool = field(
        default=False,
        metadata={"help": "Print what the run will do and exit, without loading weights or starting training."},
    )
    launch_config_file: str | None = field(
        default=None,
        metadata={
            "help": "With --dry_run: the accelerate config of the launch (e.g. recipes/accelerate/zero3.yaml); "
            "unset: one process, no DeepSpeed."
        },
    )
    num_processes: int | None = field(
        default=None, metadata={"help": "With --dry_run: processes over all machines (default: the config file's)."}
    )
    num_machines: int | None = field(
        default=None, metadata={"help": "With --dry_run: machines (default: the config file's, else 1)."}
    )
    vllm_server_tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "With --dry_run and vllm_mode server: the tensor-parallel size `trl vllm-serve` is started with "
            "(the Slurm launcher's VLLM_TP)."
        },
    )


def parse_launch_arguments(argv: list[str]) -> tuple[LaunchArguments, list[str]]:
    """Returns the ``LaunchArguments`` given in ``argv`` and the rest of ``argv`` (the recipe's arguments).

    Raises ``UsageError`` for a bad value, or for a launch field without ``--dry_run`` (a training launch takes the
    processes from ``accelerate launch``, not from the script).
    """
    from .allowed import at_least
    from .recipe_args import RecipeParser

    allowed = (
        at_least("num_processes", 1, unset="the config file's"),
        at_least("num_machines", 1, unset="the config file's, else 1"),
        at_least("vllm_server_tensor_parallel_size", 1),
    )
    # No abbreviations: "--num_p 2" must not be read as --num_processes, nor a recipe flag as one of these; no --help
    # of its own: the script's lists these fields too (launch_help).
    parser = RecipeParser(LaunchArguments, allowed=allowed, allow_abbrev=False, add_help=False)
    with input_errors(None, ValueError, TypeError):
        launch, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if not launch.dry_run:
        for name in ("launch_config_file", "num_processes", "num_machines", "vllm_server_tensor_parallel_size"):
            if getattr(launch, name) != getattr(LaunchArguments, name):
                raise UsageError(
                    f"{name}: only with --dry_run; a training launch takes it from accelerate launch (and the vLLM "
                    "server from `trl vllm-serve`)"
                )
    return launch, rest


def launch_help() -> str:
    """Returns the ``--help`` text of the ``LaunchArguments`` fields, for the script's own ``--help``."""
    lines = ["dry run (command line only, not in a recipe):"]
    for spec in fields(LaunchArguments):
        default = "" if spec.default is None else f" (default: {spec.default})"
        lines.append(f"  --{spec.name}: {spec.metadata['help']}{default}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Launch:
    """A launch as ``accelerate launch`` would start it: how many processes on how many machines, and how."""

    num_processes: int
    num_machines: int
    distributed_type: str  # accelerate's DistributedType value: "NO", "MULTI_GPU", "DEEPSPEED", "FSDP", ...
    deepspeed_config: dict = field(default_factory=dict)  # the config file's deepspeed_config section
    config_file: str | None = None

    @property
    def per_machine(self) -> int:
        return self.num_processes // self.num_machines


def read_launch(arguments: LaunchArguments) -> Launch:
    """Returns the ``Launch`` that ``arguments`` describe, read with accelerate's own config loader; raises
    ``UsageError`` for a file that is not there or not an accelerate config, or a split accelerate would not start."""
    num_processes, num_machines, distributed, deepspeed = arguments.num_processes, arguments.num_machines, None, {}
    path = arguments.launch_config_file
    if path is not None:
        from accelerate.commands.config.config_args import load_config_from_file

        if not os.path.isfile(path):
            raise UsageError(f"launch_config_file: no file {path!r} (from {os.getcwd()})")
        with input_errors(f"launch_config_file: {path!r} is not an accelerate config", ValueError, TypeError, OSError):
            config = load_config_from_file(path)
        distributed = str(getattr(config.distributed_type, "value", config.distributed_type))
        deepspeed = dict(config.deepspeed_config or {}) if distributed == "DEEPSPEED" else {}
        num_processes = num_processes or config.num_processes
        num_machines = num_machines or config.num_machines
    num_processes, num_machines = num_processes or 1, num_machines or 1
    for name, value in (("num_processes", num_processes), ("num_machines", num_machines)):
        if value < 1:
            raise UsageError(f"{name}: {value} must be >= 1")
    if num_processes % num_machines:
        raise UsageError(
            f"num_processes: {num_processes} over {num_machines} machines; accelerate starts num_processes // "
            f"num_machines = {num_processes // num_machines} per machine, so give a multiple of {num_machines}"
        )
    if distributed is None:
        distributed = "MULTI_GPU" if num_processes > 1 else "NO"
    return Launch(num_processes, num_machines, distributed, deepspeed, path)


def planned_config_class(config_class: type, world_size: int) -> type:
    """Returns a subclass of the ``TrainingArguments`` dataclass ``config_class`` whose ``world_size`` is
    ``world_size``, so that parsing a recipe into it runs TRL's own ``__post_init__`` checks and batch derivations
    (``generation_batch_size`` from ``steps_per_generation``) as every rank of that launch will."""
    return type(
        f"Planned{config_class.__name__}",
        (config_class,),
        {"world_size": property(lambda self: world_size), "__doc__": config_class.__doc__},
    )


def count_parameters(config, trust_remote_code: bool = False) -> tuple[int, int]:
    """Returns ``(parameters, largest layer's parameters)`` of the causal LM that ``config`` describes, counted on a
    meta-device model (no memory, no weights): what DeepSpeed's ZeRO-3 estimator takes.

    The largest layer is the module with the most parameters of its own (not its children's), as DeepSpeed's
    ``model_to_params`` defines it; that function itself cannot count a meta model, as it tells parameters apart by
    ``data_ptr()``, which is 0 for every meta tensor.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(), input_errors("model_name_or_path: its config does not build a causal LM", ValueError):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return model.num_parameters(), largest


# The paper's training settings, as docs/recipes.md section 2 maps them to recipe fields (facts from the released
# Qwen3-14B DAPO script, PAPER.md): (field, the paper's value). Batch shape and the model are compared in make_plan.
PAPER = {
    "forking_selection": "top",
    "top_entropy_quantile": 0.2,
    "forking_scope": "step",
    "forking_loss_normalization": "selected",
    "loss_type": "dapo",
    "epsilon": 0.2,
    "epsilon_high": 0.28,
    "beta": 0.0,
    "scale_rewards": "group",
    "learning_rate": 1e-6,
    "warmup_steps": 10,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "num_generations": 16,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_completion_length": 20480,
    "num_iterations": 1,
    "overlong_buffer": 4096,
    "reward_funcs": ["dapo_accuracy"],
    "use_vllm": True,
}
PAPER_PROMPTS_PER_STEP, PAPER_PROMPTS_PER_ROLLOUT = 32, 512
PAPER_DATASETS = ("BytedTsinghua-SIA/DAPO-Math-17k", "open-r1/DAPO-Math-17k-Processed")
# What the paper's recipe has that TRL 1.16 cannot express: always listed.
NOT_IN_TRL = (
    "dual-clip c = 10: no TRL field (`delta` clips the ratio itself, a different rule)",
    "dynamic sampling (drop groups whose rewards are all equal, sample more): not in TRL 1.16",
    "max prompt 2,048 tokens: TRL 1.16 has no prompt-length cap",
)
ARMS = {"all": "the paper's full-token DAPO baseline", "bottom": "the paper's bottom-80% ablation"}
# Bytes per parameter of a checkpoint's optimizer state under DeepSpeed ZeRO: fp32 master weights and AdamW's two
# fp32 moments, whatever the training dtype.
ZERO_OPTIMIZER_BYTES = 12
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _dtype_bytes(model_args, model_config) -> int:
    """Returns the bytes per parameter of the weights as loaded: ``dtype``, or the config's with "auto"/None."""
    dtype = model_args.dtype
    if dtype in (None, "auto"):
        dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "float32"
    return DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)


def checkpoint_bytes(parameters: int, dtype_bytes: int, launch: Launch, zero_stage: int | None, args) -> dict:
    """Returns the bytes of one ``checkpoint-N`` folder by part: ``{"weights", "optimizer", "module states"}``.

    - weights: ``model.safetensors``, ``dtype_bytes`` per parameter (under ZeRO-3 only with
      ``zero3_save_16bit_model``, which gathers them; without it transformers saves DeepSpeed's shards alone);
    - optimizer: under DeepSpeed ZeRO, ``ZERO_OPTIMIZER_BYTES`` (fp32 master weights and two Adam moments) per
      parameter across the ranks' ``*_optim_states.pt``; without DeepSpeed, torch's AdamW keeps its two moments in
      the parameters' dtype (``optimizer.pt``); none with ``save_only_model``;
    - module states: ZeRO-1/2 also save the 16-bit module (``mp_rank_00_model_states.pt``); ZeRO-3's holds only
      placeholders of its partitioned parameters.
    """
    deepspeed = launch.distributed_type == "DEEPSPEED"
    gathered = zero_stage != 3 or bool(launch.deepspeed_config.get("zero3_save_16bit_model", False))
    parts = {"weights": dtype_bytes * parameters if gathered else 0}
    if args.save_only_model:
        parts.update(optimizer=0, **{"module states": 0})
    elif deepspeed:
        module = dtype_bytes * parameters if zero_stage in (0, 1, 2) else 0
        parts.update(optimizer=ZERO_OPTIMIZER_BYTES * parameters, **{"module states": module})
    else:
        parts.update(optimizer=2 * dtype_bytes * parameters, **{"module states": 0})
    return parts


def _deepspeed(launch: Launch, args, model_config, parameters: int, largest: int) -> tuple[dict, dict]:
    """Returns ``(the DeepSpeed config the run will hand to deepspeed.initialize, DeepSpeed's memory estimate)``.

    The config is built as the run builds it: accelerate's ``DeepSpeedPlugin`` from the launch's ``deepspeed_config``
    section, then transformers' ``HfTrainerDeepSpeedConfig`` fills its "auto" values from the (planned) training
    arguments and refuses values that contradict them; DeepSpeed's ``DeepSpeedConfig`` then validates it. The memory
    estimate is DeepSpeed's own ``estimate_zero{2,3}_model_states_mem_needs`` (the numbers its ``*_all_cold``
    printers show) for the launch's stage and offload options.
    """
    import inspect

    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from .console import quiet_deepspeed_accelerator_notice

    quiet_deepspeed_accelerator_notice()  # the planning machine's accelerator is not the launch's
    section = dict(launch.deepspeed_config)
    accepted = set(inspect.signature(DeepSpeedPlugin).parameters)
    kwargs = {key: value for key, value in section.items() if key in accepted}
    if "deepspeed_config_file" in section:
        kwargs["hf_ds_config"] = section["deepspeed_config_file"]
    what = f"launch_config_file: the DeepSpeed config of {launch.config_file!r} is refused with this recipe"
    try:
        with input_errors(what, ValueError, TypeError, AssertionError, OSError):
            plugin = DeepSpeedPlugin(**kwargs)
            plugin.set_mixed_precision("bf16" if args.bf16 else "fp16" if args.fp16 else "no")
            hf_config = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
            hf_config.trainer_config_process(args)
            steps = args.max_steps if args.max_steps > 0 else 1  # only fills scheduler totals, which the plan ignores
            hf_config.trainer_config_finalize(args, SimpleNamespace(config=model_config), steps)
            config = dict(hf_config.config)
            from deepspeed.runtime.config import DeepSpeedConfig

            # DeepSpeed reads the world size from a process group, which a plan has not got (it then counts 1):
            # transformers filled train_batch_size for the planned world size above, so it is left to derive.
            DeepSpeedConfig({key: value for key, value in config.items() if key != "train_batch_size"})
    finally:
        unset_hf_deepspeed_config()  # HfTrainerDeepSpeedConfig registers itself process-wide (is_zero3_enabled)
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device") or "none"
    offload_param = (zero.get("offload_param") or {}).get("device") or "none"
    memory = {"stage": stage, "offload_optimizer": offload_optimizer, "offload_param": offload_param}
    nodes, per_node = launch.num_machines, launch.per_machine
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        zero_init = bool(plugin.zero3_init_flag)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            parameters, largest, per_node, nodes, cpu_offload=offload_optimizer != "none",
            cpu_offload_params=offload_param != "none", zero_init=zero_init,
        )  # fmt: skip
        memory.update(estimator="estimate_zero3_model_states_mem_needs", zero_init=zero_init, gpu=gpu, cpu=cpu)
    elif stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            parameters, per_node, nodes, cpu_offload=offload_optimizer != "none"
        )
        memory.update(estimator="estimate_zero2_model_states_mem_needs", gpu=gpu, cpu=cpu)
    return config, memory


def _selection(args, completions_per_step: int, world: int) -> dict:
    """Returns how many completion tokens a full-length optimizer step holds and how many of them are selected.

    The selection counts through ``trl_forking.selection.num_selected`` (exactly ``ceil(rho * N)`` for top, per
    selection unit): one unit per optimizer step (scope step), per micro-batch over all ranks (micro_batch), per
    micro-batch per rank (local) or per completion (sequence).
    """
    length = args.max_completion_length
    tokens = completions_per_step * length
    units = {
        "step": (1, tokens),
        "micro_batch": (args.gradient_accumulation_steps, args.per_device_train_batch_size * world * length),
        "local": (args.gradient_accumulation_steps * world, args.per_device_train_batch_size * length),
        "sequence": (completions_per_step, length),
    }
    count, unit_tokens = units[args.forking_scope]
    selected = count * num_selected(unit_tokens, args.top_entropy_quantile, args.forking_selection)
    return {"tokens": tokens, "selected": selected, "units": count, "tokens_per_unit": unit_tokens}


def _differences(script_args, args, model_args, batch: dict) -> list[str]:
    """Returns one line per setting that differs from the paper's (``PAPER``), then the ones TRL cannot express."""
    values = {**vars(args), "overlong_buffer": script_args.overlong_buffer, "reward_funcs": script_args.reward_funcs}
    lines = []
    for name, paper in PAPER.items():
        value = values[name]
        if name == "top_entropy_quantile" and args.forking_selection == "all":
            continue  # rho does not enter an all-token run
        same = math.isclose(value, paper) if isinstance(paper, float) else value == paper
        if not same:
            arm = f": {ARMS[value]}" if name == "forking_selection" and value in ARMS else ""
            lines.append(f"{name}: {value!r} (paper: {paper!r}){arm}")
    for what, value, paper in (
        ("prompts per optimizer step", batch["prompts_per_step"], PAPER_PROMPTS_PER_STEP),
        ("prompts per rollout", batch["prompts_per_rollout"], PAPER_PROMPTS_PER_ROLLOUT),
    ):
        if value != paper:
            lines.append(f"{what}: {value:g} (paper: {paper})")
    if script_args.dataset_name not in PAPER_DATASETS:
        lines.append(f"dataset_name: {script_args.dataset_name!r} (paper: DAPO-Math-17k)")
    model = model_args.model_name_or_path
    if not (model or "").startswith("Qwen/Qwen3-") or not model.endswith("-Base"):
        lines.append(f"model_name_or_path: {model!r} (paper: the Qwen3-8B / 14B / 32B base models)")
    if model_args.use_peft or model_args.load_in_4bit or model_args.load_in_8bit:
        lines.append("use_peft / load_in_*bit: adapters only (paper: every weight trained)")
    return lines + list(NOT_IN_TRL)


def make_plan(script_args, args, model_args, launch: Launch, model_config, vllm_server_tp: int = 1) -> dict:
    """Returns the plan of the run: a JSON-ready dict of what it will do (see ``format_plan`` for its keys' meaning).

    ``args`` must be parsed for the launch's world size (``planned_config_class``). Raises ``UsageError`` for a
    combination that accelerate, DeepSpeed, TRL or vLLM would refuse once the GPUs are allocated.
    """
    world = launch.num_processes
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    parameters, largest = count_parameters(model_config, args.trust_remote_code)
    dtype_bytes = _dtype_bytes(model_args, model_config)
    heads = getattr(text_config, "num_attention_heads", None)
    model = {
        "name": model_args.model_name_or_path,
        "parameters": parameters,
        "largest_layer": largest,
        "layers": getattr(text_config, "num_hidden_layers", None),
        "hidden_size": getattr(text_config, "hidden_size", None),
        "heads": heads,
        "kv_heads": getattr(text_config, "num_key_value_heads", None),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "dtype": str(model_args.dtype),
        "dtype_bytes": dtype_bytes,
        "quantization": "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None,
        "use_peft": bool(model_args.use_peft),
    }

    per_step = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
    rollout = args.generation_batch_size  # TRL derived it for this world size
    batch = {
        "per_device": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "steps_per_generation": args.steps_per_generation,
        "num_iterations": args.num_iterations,
        "num_generations": args.num_generations,
        "completions_per_rollout": rollout,
        "prompts_per_rollout": rollout / args.num_generations,
        "completions_per_step": per_step,
        "prompts_per_step": per_step / args.num_generations,
        # A rollout serves steps_per_generation micro-batches per iteration (TRL's _buffered_inputs).
        "steps_per_rollout": args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps,
        "max_steps": args.max_steps if args.max_steps > 0 else None,
    }
    tokens = {
        "max_completion_length": args.max_completion_length,
        "selection": args.forking_selection,
        "rho": args.top_entropy_quantile,
        "scope": args.forking_scope,
        "normalization": args.forking_loss_normalization,
        "ignore_zero_advantage": getattr(args, "forking_ignore_zero_advantage", False),
        **_selection(args, per_step, world),
    }

    memory, zero_stage, ds_config = {"stage": None}, None, None
    if launch.distributed_type == "DEEPSPEED":
        ds_config, memory = _deepspeed(launch, args, model_config, parameters, largest)
        zero_stage = memory["stage"]
    elif launch.distributed_type in ("NO", "MULTI_GPU"):
        # No ZeRO: each GPU holds the weights, their gradients and AdamW's two moments, all in the weights' dtype.
        memory.update(estimator=None, gpu=4 * dtype_bytes * parameters)
    if model["quantization"] or model["use_peft"]:
        memory = {"stage": zero_stage, "estimator": None, "peft": True}  # the estimators assume every weight trains

    vllm = {"use_vllm": args.use_vllm, "mode": args.vllm_mode if args.use_vllm else None}
    if args.use_vllm:
        tp = vllm_server_tp if args.vllm_mode == "server" else args.vllm_tensor_parallel_size
        where = "--vllm_server_tensor_parallel_size" if args.vllm_mode == "server" else "vllm_tensor_parallel_size"
        if tp < 1:
            raise UsageError(f"{where}: {tp} must be >= 1")
        if heads is not None and heads % tp:
            # vLLM's ModelConfig.verify_with_parallel_config refuses this when the engine starts.
            raise UsageError(
                f"{where}: {tp} does not divide the model's {heads} attention heads, which vLLM refuses; use a "
                f"divisor of {heads}"
            )
        if args.vllm_mode == "colocate" and world % tp:
            # TRL's VLLMGeneration refuses this when the trainer is built.
            raise UsageError(f"vllm_tensor_parallel_size: {tp} must divide the {world} training processes (TRL)")
        vllm.update(tensor_parallel_size=tp, host=args.vllm_server_host, port=args.vllm_server_port)
        vllm["base_url"] = args.vllm_server_base_url

    parts = checkpoint_bytes(parameters, dtype_bytes, launch, zero_stage, args)
    size = sum(parts.values())
    limit = args.save_total_limit if args.save_total_limit and args.save_total_limit > 0 else None
    checkpoints = {
        "save_strategy": str(getattr(args.save_strategy, "value", args.save_strategy)),
        "save_steps": args.save_steps,
        "save_total_limit": limit,
        "parts": parts,
        "bytes": size,
        "adapters_only": model["use_peft"],
        # transformers rotates the oldest out after the new checkpoint is written: limit + 1 at the peak.
        "peak_bytes": (limit + 1) * size if limit else None,
        "final_model_bytes": dtype_bytes * parameters,  # save_model at the end: the 16-bit weights
    }
    logging = {
        "log_completions": args.log_completions,
        "logging_steps": args.logging_steps,
        # TRL's completion log is a deque of generation_batch_size rows, written (and printed) whole at every log.
        "rows_per_log": rollout if args.log_completions else 0,
        "logs_per_rollout": batch["steps_per_rollout"] / args.logging_steps,
        "printed": args.num_completions_to_print,
    }
    return {
        "launch": {
            "num_processes": world,
            "num_machines": launch.num_machines,
            "per_machine": launch.per_machine,
            "distributed_type": launch.distributed_type,
            "config_file": launch.config_file,
        },
        "model": model,
        "batch": batch,
        "tokens": tokens,
        "memory": memory,
        "deepspeed_config": ds_config,
        "vllm": vllm,
        "checkpoints": checkpoints,
        "logging": logging,
        "paper": _differences(script_args, args, model_args, batch),
    }


def _n(value) -> str:
    """Returns ``value`` with thousands separators (and up to 2 decimals when it is not whole)."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.2f}"


def _count(number: int, one: str, many: str) -> str:
    return f"{number:,} {one if number == 1 else many}"


def _gb(value: float) -> str:
    return f"{value / 1e9:,.1f} GB"


def _gib(value: float) -> str:
    return f"{value / 2**30:,.1f} GiB"


def format_plan(plan: dict, recipe: str | None = None) -> str:
    """Returns the plan as the lines ``--dry_run`` prints: one topic a line, wrapped at 118 characters."""
    launch, model, batch, tokens = plan["launch"], plan["model"], plan["batch"], plan["tokens"]
    memory, vllm, checkpoints, logging = plan["memory"], plan["vllm"], plan["checkpoints"], plan["logging"]
    how = {"NO": "one process", "MULTI_GPU": "plain data parallel (DDP)", "DEEPSPEED": "DeepSpeed"}
    how = how.get(launch["distributed_type"], launch["distributed_type"])
    if memory.get("stage") is not None:
        how += f" ZeRO-{memory['stage']}"
    source = f" ({launch['config_file']})" if launch["config_file"] else " (no --launch_config_file)"
    heads = f"{model['heads']} heads" + (f" / {model['kv_heads']} KV heads" if model["kv_heads"] else "")
    rows = [
        ("Launch", f"{_count(launch['num_processes'], 'process', 'processes')} on "
                   f"{_count(launch['num_machines'], 'machine', 'machines')}, {launch['per_machine']} per machine, "
                   f"{how}{source}"),
        ("Model", f"{model['name']}: {_n(model['parameters'])} parameters from its config ({model['layers']} layers, "
                  f"hidden {_n(model['hidden_size'])}, {heads}, vocabulary {_n(model['vocab_size'])}; largest layer "
                  f"{_n(model['largest_layer'])}), {model['dtype']} weights ({model['dtype_bytes']} bytes)"
                  + (f", {model['quantization']} quantized" if model["quantization"] else "")
                  + (", adapters trained (use_peft)" if model["use_peft"] else "")),
        ("Rollout", f"{_n(batch['prompts_per_rollout'])} prompts x {batch['num_generations']} = "
                    f"{_n(batch['completions_per_rollout'])} completions, trained in {_n(batch['steps_per_rollout'])} "
                    f"optimizer steps (steps_per_generation {_n(batch['steps_per_generation'])} x num_iterations "
                    f"{batch['num_iterations']} / gradient_accumulation_steps {batch['gradient_accumulation_steps']})"),
        ("Step", f"{_n(batch['prompts_per_step'])} prompts x {batch['num_generations']} = "
                 f"{_n(batch['completions_per_step'])} completions ({batch['per_device']} per device x "
                 f"{_count(launch['num_processes'], 'process', 'processes')} x "
                 f"{batch['gradient_accumulation_steps']} accumulation steps)"),
        ("Tokens", f"up to {_n(tokens['tokens'])} completion tokens per optimizer step "
                   f"({_n(batch['completions_per_step'])} x max_completion_length "
                   f"{_n(tokens['max_completion_length'])}), plus the prompts (TRL 1.16 has no prompt cap)"),
    ]  # fmt: skip
    scope = {
        "step": "over the whole step on all ranks",
        "micro_batch": f"per micro-batch on all ranks ({tokens['units']} per step)",
        "local": f"per micro-batch per rank ({tokens['units']} per step)",
        "sequence": "within each completion",
    }[tokens["scope"]]
    share = {"top": f"the top {tokens['rho']:.0%}", "bottom": f"the bottom {1 - tokens['rho']:.0%} (not the top "
             f"{tokens['rho']:.0%})", "random": f"a random {tokens['rho']:.0%}", "all": "every token"}  # fmt: skip
    denominator = "the selected tokens" if tokens["normalization"] == "selected" else "all completion tokens"
    rows.append(
        (
            "Selection",
            f"{_n(tokens['selected'])} tokens per optimizer step at that length: {share[tokens['selection']]} by "
            f"entropy, {scope} (forking_scope {tokens['scope']}); the policy gradient is divided by {denominator}"
            + (
                "; completions whose advantage is 0 are left out of the ranking and the counts "
                "(forking_ignore_zero_advantage), so fewer tokens train when groups have equal rewards"
                if tokens["ignore_zero_advantage"] and tokens["selection"] != "all"
                else ""
            ),
        )
    )
    if memory.get("estimator"):
        offloaded = ("optimizer", "param") if memory["stage"] == 3 else ("optimizer",)  # ZeRO-2 keeps the weights
        offload = [f"{what} offloaded to {memory[f'offload_{what}']}" for what in offloaded]
        offload = ", ".join(o for o in offload if not o.endswith(" none")) or "no offload"
        zero_init = f", zero_init {int(memory['zero_init'])}" if "zero_init" in memory else ""
        text = (
            f"DeepSpeed's estimate of the ZeRO-{memory['stage']} model states ({memory['estimator']}: {offload}"
            f"{zero_init}): {_gib(memory['gpu'])} per GPU, {_gib(memory['cpu'])} of CPU memory per machine; "
            "activations, logits and generation come on top"
        )
    elif memory.get("peft"):
        text = "not estimated: DeepSpeed's estimators assume every weight is trained, and adapters train few"
    elif memory.get("stage") is not None:
        text = f"not estimated: DeepSpeed has no estimator for ZeRO-{memory['stage']}"
    elif "gpu" in memory:
        text = (
            f"{_gib(memory['gpu'])} of model states per GPU without ZeRO (weights, gradients and AdamW's two moments "
            "in the weights' dtype; no DeepSpeed estimator applies); activations, logits and generation come on top"
        )
    else:
        text = f"not estimated for {launch['distributed_type']}"
    rows.append(("Memory", text))
    if not vllm["use_vllm"]:
        rows.append(("vLLM", "off: the training processes generate with transformers"))
    else:
        where = vllm["base_url"] or f"{vllm['host']}:{vllm['port']}"
        mode = f"server mode at {where}" if vllm["mode"] == "server" else "colocate mode (on the training GPUs)"
        tp_source = "--vllm_server_tensor_parallel_size" if vllm["mode"] == "server" else "vllm_tensor_parallel_size"
        rows.append(
            (
                "vLLM",
                f"{mode}, tensor parallel {vllm['tensor_parallel_size']} ({tp_source}); "
                f"{_n(batch['completions_per_rollout'])} completions of up to {_n(tokens['max_completion_length'])} "
                "tokens per rollout",
            )
        )
    parts = ", ".join(f"{name} {_gb(value)}" for name, value in checkpoints["parts"].items() if value)
    if checkpoints["adapters_only"]:
        text = f"{checkpoints['save_strategy']}: adapters and their optimizer state only (size depends on lora_r)"
    else:
        every = {"steps": f"every {checkpoints['save_steps']:g} steps", "epoch": "every epoch"}
        text = f"{every.get(checkpoints['save_strategy'], checkpoints['save_strategy'])}: "
        text += f"{_gb(checkpoints['bytes'])} each ({parts})"
        if checkpoints["save_total_limit"]:
            text += (
                f"; save_total_limit {checkpoints['save_total_limit']}: at most {_gb(checkpoints['peak_bytes'])} "
                f"while a save rotates the oldest out"
            )
        else:
            text += "; no save_total_limit: every checkpoint stays"
        text += f", plus the final model, {_gb(checkpoints['final_model_bytes'])}"
    if checkpoints["save_strategy"] == "no":
        text = "none (save_strategy no): nothing to resume from"
    rows.append(("Checkpoints", text))
    if logging["log_completions"]:
        printed = "all" if logging["printed"] is None else str(logging["printed"])
        text = (
            f"log_completions on: each of the {_n(logging['logs_per_rollout'])} logging steps of a rollout writes the "
            f"whole rollout, {_n(logging['rows_per_log'])} rows, to completions/completions_<step>.parquet and "
            f"prints {printed} of them with rich on the main process"
        )
    else:
        text = "log_completions off"
    rows.append(("Completions", text))
    lines = [f"Dry run of {recipe or 'the run'}: nothing loaded, nothing trained."]
    for label, text in rows:
        lines += textwrap.wrap(text, 118, initial_indent=f"{label:<12}", subsequent_indent=" " * 12)
    lines.append(f"{'Paper':<12}differs from the paper's settings (docs/recipes.md section 2) in:")
    lines += [textwrap.fill(line, 118, initial_indent=" " * 14, subsequent_indent=" " * 16) for line in plan["paper"]]
    return "\n".join(lines)
