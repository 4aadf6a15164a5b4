"""Forking-token GRPO ("Beyond the 80/20 Rule") from a recipe YAML, on one CPU or many GPU nodes.

    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/grpo_forking.py \\
        --config recipes/qwen3-8b/forking_dapo.yaml [--any_field value ...]

``trl-forking train`` and ``python -m trl_forking.scripts.train`` are the same script. Flags after ``--config``
override the YAML. Without ``--config`` the recipe is ``recipes/demo.yaml`` (``configs/demo.yaml`` here), the CPU
demo: a tiny Qwen3 built locally and warm-started on the bundled arithmetic-chains task
(``trl_forking.tasks.arithmetic_chains.base_model``, cached after the first run), GRPO on the exact-answer reward with
forking-token selection, and the test split's accuracy before and after training; flags then modify the demo
(``--max_steps 10``), and the first line says so. No model or dataset given means that base model and the bundled task;
nothing is downloaded for them.

``--resume_from_checkpoint true`` (or ``last``, or a ``checkpoint-N`` folder) resumes; a fresh run refuses an
``output_dir`` that holds checkpoints (``--overwrite_output_dir true`` deletes them) and says when it overwrites a
finished run. Bad input ends with one line on stderr and exit status 2 (``trl_forking.scripts.usage``).

``--dry_run`` prints what the run will do on a launch given on the command line and exits, on any machine, without
loading weights or starting training (``trl_forking.scripts.plan``; docs/recipes.md section 8):

    python recipes/grpo_forking.py --config recipes/qwen3-8b/forking_dapo.yaml --dry_run \\
        --launch_config_file recipes/accelerate/zero3.yaml [--num_processes 8 --num_machines 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from trl import ModelConfig, ScriptArguments, get_peft_config, get_quantization_config

from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer
from trl_forking.data import load_train_dataset
from trl_forking.rewards import REWARD_FUNCS, get_reward_funcs
from trl_forking.scripts.allowed import GRPO_OPTIONS, MODEL_OPTIONS, at_least, one_of, report_to_names
from trl_forking.scripts.console import quiet_known_noise, use_compact_log
from trl_forking.scripts.launch import check_launch, check_world_size, cpu_defaults
from trl_forking.scripts.plan import (
    Launch,
    LaunchArguments,
    launch_help,
    parse_launch_arguments,
    planned_config_class,
    read_launch,
)
from trl_forking.scripts.recipe_args import RecipeParser
from trl_forking.scripts.run_dir import check_output_dir, make_output_dir, resolve_resume
from trl_forking.scripts.run_length import check_max_steps, check_run_length
from trl_forking.scripts.usage import (
    UsageError,
    check_data_source,
    check_lora,
    check_model,
    check_quantization,
    exit_on_usage_error,
    input_errors,
)
from trl_forking.tasks.arithmetic_chains.base_model import BaseModelRecipe, build_base_model
from trl_forking.tasks.arithmetic_chains.task import SPLITS, TASK_NAME, load_task

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")
PROG = "trl-forking train"
# Phrases of library messages met while the trainer is built that name a value but not the option it came from.
LIBRARY_MESSAGE_FIELDS = {"Target modules": "lora_target_modules"}


@dataclass
class ForkingScriptArguments(ScriptArguments):
    """TRL's script arguments (``dataset_name``, ``dataset_config``, splits) plus rewards and data options.

    ``dataset_name`` None trains on the bundled task's train split; otherwise a DAPO-Math-17k layout (Hub name or
    file).
    """

    reward_funcs: list[str] = field(
        default_factory=lambda: ["dapo_accuracy"],
        metadata={"help": f"Reward functions by name, summed by TRL; allowed: {sorted(REWARD_FUNCS)}."},
    )
    overlong_buffer: int = field(
        default=0,
        metadata={
            "help": "DAPO's soft overlong punishment: the last `overlong_buffer` tokens before max_completion_length "
            "cost up to -1 (trl.rewards.get_soft_overlong_punishment). 0 disables it; the paper uses 4096."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N prompts only (smoke tests). None: all."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a fresh run in an output_dir that holds checkpoints of an earlier one, deleting them. "
            "Without it such a run stops and asks (resume with --resume_from_checkpoint true)."
        },
    )
    base_model_recipe: str | None = field(
        default=None,
        metadata={
            "help": "Without model_name_or_path: fields of BaseModelRecipe "
            "(trl_forking.tasks.arithmetic_chains.base_model) for the locally built base model, as a JSON object "
            "(e.g. '{\"seed\": 1}'); unset: the default recipe."
        },
    )
    eval_num_samples: int = field(
        default=0,
        metadata={
            "help": f"Print the accuracy on the {TASK_NAME} test split before and after training: avg@n over this "
            "many completions per problem, sampled like the rollouts (temperature, top_p, max_completion_length). "
            "0 skips it; so does a run on more than one process."
        },
    )


def allowed_options() -> tuple:
    """Returns the ``trl_forking.scripts.allowed`` table of the script's options (the forking options check
    themselves in ``ForkingOptions``; the reward options in ``get_reward_funcs``)."""
    return (
        *GRPO_OPTIONS,
        *MODEL_OPTIONS,
        one_of("report_to", report_to_names()),
        at_least("max_train_samples", 1, unset="every prompt"),
        at_least("eval_num_samples", 0, "0 skips the evaluation"),
    )


def make_parser(world_size: int | None = None) -> RecipeParser:
    """Returns the parser of (ForkingScriptArguments, ForkingGRPOConfig, ModelConfig), with CPU-safe defaults.

    ``world_size`` (a dry run's planned launch) parses the config for that many processes: TRL derives and checks its
    batch sizes as every rank of that launch will, and no device is set up for it.
    """
    config_class = ForkingGRPOConfig if world_size is None else planned_config_class(ForkingGRPOConfig, world_size)
    parser = RecipeParser(
        (ForkingScriptArguments, config_class, ModelConfig),
        allowed=allowed_options(),
        epilog=launch_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if not torch.cuda.is_available():
        # bf16 off; under a multi-process launch one gloo group instead of processes that each train alone.
        parser.set_defaults(**cpu_defaults())
    if world_size is not None:
        # A plan runs on a machine without the launch's GPUs: transformers would refuse the recipe's bf16 here.
        parser.set_defaults(use_cpu=True)
    return parser


def base_model_recipe(value: str | dict | None) -> BaseModelRecipe:
    """Returns the ``BaseModelRecipe`` that ``--base_model_recipe`` (a JSON object, or a mapping from the YAML) names;
    raises ``UsageError`` naming the field for anything else."""
    if value is None:
        return BaseModelRecipe()
    try:
        fields = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as error:
        raise UsageError(f"base_model_recipe: {value!r} is not a JSON object ({error.msg})") from None
    if not isinstance(fields, dict):
        raise UsageError(f"base_model_recipe: {value!r} is not a JSON object of BaseModelRecipe fields")
    allowed = [f.name for f in dataclasses.fields(BaseModelRecipe)]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f"did you mean {close[0]!r}" if close else f"allowed: {', '.join(allowed)}"
        raise UsageError(f"base_model_recipe: unknown field {unknown[0]!r}; {hint}")
    with input_errors("base_model_recipe", ValueError, TypeError):
        return BaseModelRecipe(**fields)


def check_inputs(
    script_args: ForkingScriptArguments,
    training_args: ForkingGRPOConfig,
    model_args: ModelConfig,
    planning: bool = False,
) -> None:
    """Raises ``UsageError`` for input that would otherwise fail later, deep in a library or after training; creates
    ``output_dir`` and sets ``training_args.resume_from_checkpoint`` to the checkpoint folder it names (None for a
    fresh run). The values of single options were checked when they were parsed (``allowed_options``).

    ``planning`` (a dry run) skips what only the launch's machines can tell: whether bitsandbytes runs there, whether
    ``output_dir`` can be written.
    """
    if model_args.model_name_or_path is not None:
        check_model(model_args.model_name_or_path, revision=model_args.model_revision)
        if script_args.base_model_recipe is not None:
            raise UsageError(
                "base_model_recipe: applies to the locally built base model only, but model_name_or_path is "
                f"{model_args.model_name_or_path!r}; give one of the two"
            )
    else:
        base_model_recipe(script_args.base_model_recipe)
    check_quantization(model_args, hardware=not planning)
    check_lora(model_args)
    check_training_data(script_args)
    if script_args.eval_num_samples > 0 and script_args.dataset_name not in (None, TASK_NAME):
        raise UsageError(
            f"eval_num_samples: {script_args.eval_num_samples} evaluates on the {TASK_NAME} test split, but "
            f"dataset_name is {script_args.dataset_name!r}; allowed: 0 (no evaluation) or training on the bundled "
            "task (dataset_name unset). Evaluate other models with recipes/eval_aime.py."
        )
    check_max_steps(training_args.max_steps)
    with input_errors(None, ValueError):  # its messages name reward_funcs / overlong_buffer
        get_reward_funcs(script_args.reward_funcs, training_args.max_completion_length, script_args.overlong_buffer)
    weights, functions = training_args.reward_weights, script_args.reward_funcs
    if weights is not None and len(weights) != len(functions):
        raise UsageError(
            f"reward_weights: {len(weights)} weight(s) {weights} for the {len(functions)} reward function(s) "
            f"{functions} of reward_funcs; give one weight per function, or none (each weighs 1)"
        )
    check_world_size(training_args.distributed_state)
    output_dir, main_process = training_args.output_dir, training_args.process_index == 0
    if not planning:  # a plan's output_dir is on the launch's machines
        make_output_dir(output_dir)
    checkpoint = resolve_resume(training_args.resume_from_checkpoint, output_dir)
    training_args.resume_from_checkpoint = checkpoint
    if checkpoint is not None:
        notice = f"Resuming from {checkpoint}"
    else:
        notice = check_output_dir(output_dir, False, script_args.overwrite_output_dir, main_process)
    if notice and main_process:
        print(notice)


def _training_data(script_args: ForkingScriptArguments, num_prompts: int) -> tuple[str, str]:
    """Returns the option that set the training data's size and the data's name, for ``check_run_length``."""
    name = f"{script_args.dataset_name!r}" if script_args.dataset_name else f"the {TASK_NAME} train split"
    if script_args.max_train_samples is not None and script_args.max_train_samples == num_prompts:
        return "max_train_samples", f"{name} cut to max_train_samples"
    return "dataset_name", name


def check_training_data(script_args: ForkingScriptArguments) -> None:
    """Raises ``UsageError`` for a local dataset file that is missing or empty, for streaming (not supported), and
    for a configuration or split the bundled task does not have; a Hub dataset is checked when it loads."""
    if script_args.dataset_streaming:
        raise UsageError(
            "dataset_streaming: true is not supported by this script, which loads the training set whole (TRL's "
            "sampler draws prompts by index); drop it"
        )
    if script_args.dataset_name is not None:
        check_data_source(script_args.dataset_name, "dataset_name")
    elif script_args.dataset_config is not None:
        raise UsageError(
            f"dataset_config: {script_args.dataset_config!r} names a configuration of dataset_name, but dataset_name "
            f"is unset (the bundled {TASK_NAME} task, which has none); drop it or give dataset_name"
        )
    elif script_args.dataset_train_split not in SPLITS:
        raise UsageError(
            f"dataset_train_split: {script_args.dataset_train_split!r} is not a split of the bundled {TASK_NAME} "
            f"task; use one of {list(SPLITS)}"
        )


def task_accuracy(model_name_or_path: str, training_args: ForkingGRPOConfig, num_samples: int) -> dict:
    """Returns ``trl_forking.evaluation.evaluate`` of a saved model on the bundled task's test split, sampled with
    the rollouts' temperature, top_p and max_completion_length and the run's seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_forking.evaluation import evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate(
        model,
        tokenizer,
        load_task("test"),
        num_samples=num_samples,
        max_new_tokens=training_args.max_completion_length,
        temperature=training_args.temperature,
        top_p=training_args.top_p,
        seed=training_args.seed,
    )


def main(script_args: ForkingScriptArguments, training_args: ForkingGRPOConfig, model_args: ModelConfig) -> str:
    """Returns the output directory after training, saving the model, tokenizer and logged metrics there."""
    evaluate_task = script_args.eval_num_samples > 0
    if evaluate_task and training_args.world_size > 1:
        # Each rank would load its own copy for generation, and under ZeRO-3 from_pretrained only loads a shard.
        if training_args.process_index == 0:
            print(
                f"eval_num_samples: the before/after evaluation runs in single-process runs only, skipped on "
                f"{training_args.world_size} processes; evaluate the saved model with recipes/eval_aime.py "
                f"--datasets {TASK_NAME}."
            )
        evaluate_task = False
    with training_args.main_process_first(desc="preparing the dataset"), input_errors("dataset_name"):
        dataset = load_train_dataset(
            script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split
        )
    if len(dataset) == 0:
        split = script_args.dataset_train_split
        raise UsageError(f"dataset_name: {script_args.dataset_name!r} has no rows in split {split!r}")
    if script_args.max_train_samples is not None:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    # Before the base model builds (1.5 minutes the first time): a dataset too small for one step fails in seconds.
    notice = check_run_length(len(dataset), training_args, *_training_data(script_args, len(dataset)))
    if notice and training_args.process_index == 0:
        print(notice)
    model = model_args.model_name_or_path
    if model is None:
        # One build per node (a child process each); the node's other ranks wait, then find it cached.
        with training_args.main_process_first(desc="building the demo's base model"):
            model = build_base_model(base_model_recipe(script_args.base_model_recipe))
        if not torch.cuda.is_available():
            # 64-wide matrices gain nothing from intra-op threads, and on a shared CPU those threads contend: one
            # thread ran the demo in 1 minute where the default took 6 with other jobs on the machine.
            torch.set_num_threads(1)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        **(training_args.model_init_kwargs or {}),
    }
    reward_funcs = get_reward_funcs(
        script_args.reward_funcs, training_args.max_completion_length, script_args.overlong_buffer
    )

    # TRL refusing a combination of options, or vLLM missing; deep enough that the message says how to see where.
    with input_errors(None, ValueError, ImportError, traceback_hint=True, fields=LIBRARY_MESSAGE_FIELDS):
        trainer = ForkingGRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=dataset,
            # --load_in_4bit / --load_in_8bit, as TRL's own trl/scripts/grpo.py passes them (QLoRA with --use_peft).
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
        )
    use_compact_log(trainer)
    if trainer.accelerator.is_main_process:  # the run's arm and seed, for `trl-forking compare`
        from trl_forking.evaluation.records import write_run_info

        selection = training_args.forking_selection
        write_run_info(
            training_args.output_dir,
            selection,
            1.0 if selection == "all" else training_args.top_entropy_quantile,
            training_args.seed,
            model=model,
            loss_type=training_args.loss_type,
            forking_scope=training_args.forking_scope,
            max_steps=training_args.max_steps,
        )
    # After the trainer is built, so that options TRL refuses fail in seconds, not after an evaluation.
    before = task_accuracy(model, training_args, script_args.eval_num_samples) if evaluate_task else None
    state = trainer.accelerator.state
    zero = f" ZeRO-{state.deepspeed_plugin.zero_stage}" if state.deepspeed_plugin else ""
    trainer.accelerator.print(f"Training on {state.num_processes} process(es): {state.distributed_type}{zero}")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: every logged metric, forking/* included

    output_dir = os.path.abspath(training_args.output_dir)
    last = {
        k: v for entry in trainer.state.log_history for k, v in entry.items() if k.startswith(("forking/", "reward"))
    }
    for name in sorted(last):  # a metric with nothing to average (NaN) is logged as None
        value = "n/a" if last[name] is None else f"{last[name]:.4g}"
        trainer.accelerator.print(f"  {name:40s} {value}")
    if before is not None:
        from trl_forking.evaluation import format_evaluation

        after = task_accuracy(output_dir, training_args, script_args.eval_num_samples)
        trainer.accelerator.print(f"Accuracy on the {TASK_NAME} test split (temperature {training_args.temperature}):")
        trainer.accelerator.print(f"  before training: {format_evaluation(before)}")
        trainer.accelerator.print(f"  after training:  {format_evaluation(after)}")
        key = f"avg@{script_args.eval_num_samples}"
        trainer.accelerator.print(f"  change: {100 * (after[key] - before[key]):+.1f} points")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # Every rank reaches this point before any destroys the process group: on CPU, gloo aborted a rank that tore
    # down its group while the main process was still writing the model (1 in ~6 ZeRO-3 runs without the barrier).
    trainer.accelerator.wait_for_everyone()
    # Finishes the trackers and destroys the process group (transformers >= 5.18 calls it Trainer.end), so that the
    # group's gloo threads end with the run and not inside interpreter shutdown, where they can abort a rank.
    trainer.accelerator.end_training()
    trainer.accelerator.print(f"Trained model, tokenizer and metrics (trainer_state.json) saved in {output_dir}")
    return output_dir


def model_config(model_args: ModelConfig, script_args: ForkingScriptArguments, trust_remote_code: bool = False):
    """Returns the config of the model the run trains, read as ``from_pretrained`` reads it (the Hub's config.json of
    a Hub id, nothing else); for the demo's locally built base model, its cached config. Raises ``UsageError`` when
    that model has not been built yet."""
    from transformers import AutoConfig

    from trl_forking.tasks.arithmetic_chains.base_model import base_model_dir

    name = model_args.model_name_or_path
    if name is None:
        name = base_model_dir(base_model_recipe(script_args.base_model_recipe))
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UsageError(
                "model_name_or_path: unset, so the run trains the demo's base model, which is not built yet (one "
                "run of the demo builds it); give --model_name_or_path to plan another model"
            )
    with input_errors("model_name_or_path", OSError, ValueError):
        return AutoConfig.from_pretrained(name, revision=model_args.model_revision, trust_remote_code=trust_remote_code)


def dry_run(
    script_args: ForkingScriptArguments,
    training_args: ForkingGRPOConfig,
    model_args: ModelConfig,
    launch: Launch,
    launch_args: LaunchArguments,
    recipe: str | None = None,
) -> dict:
    """Returns the plan of the run (``trl_forking.scripts.plan.make_plan``) after printing it; loads no weights,
    trains nothing.

    ``training_args`` must come from ``make_parser(launch.num_processes)``. Raises ``UsageError`` for what the run
    itself would refuse (``check_inputs``) and for combinations TRL, accelerate, DeepSpeed or vLLM would refuse.
    """
    from trl_forking.scripts.plan import format_plan, make_plan

    check_inputs(script_args, training_args, model_args, planning=True)
    config = model_config(model_args, script_args, training_args.trust_remote_code)
    plan = make_plan(
        script_args, training_args, model_args, launch, config, launch_args.vllm_server_tensor_parallel_size
    )
    print(format_plan(plan, recipe))
    return plan


def cli(argv: list[str]) -> dict | str:
    """Returns the plan of a ``--dry_run`` (``dry_run``), else the output directory of the run (``main``), for the
    script's command line ``argv``; raises ``UsageError`` for bad input."""
    check_launch()
    launch_args, argv = parse_launch_arguments(argv)
    launch = read_launch(launch_args) if launch_args.dry_run else None
    parser = make_parser(launch.num_processes if launch is not None else None)
    try:
        parsed = parser.parse_recipe(argv, default_config=DEMO_CONFIG)
    except UsageError as error:
        if launch is None:
            raise
        raise UsageError(f"{error} (with the {launch.num_processes} process(es) of the planned launch)") from error
    if parser.default_config_used and parsed[1].process_index == 0:
        changes = f", with {' '.join(argv)} on top" if argv else ""
        print(f"No --config: recipes/{os.path.basename(DEMO_CONFIG)} (the CPU demo){changes}")
    if launch is not None:
        return dry_run(*parsed, launch, launch_args, parser.config_path)
    check_inputs(*parsed)
    return main(*parsed)


def run(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command line ``trl-forking train`` (``prog`` names it in errors): ``cli(argv)`` (``sys.argv[1:]`` when
    None); bad input ends the process with one line on stderr and exit status 2. Returns 0."""
    quiet_known_noise()
    with exit_on_usage_error(prog):
        cli(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(run())
