"""ForkingStatsCallback: which micro-batches it pools, what it writes (JSONL, TensorBoard, W&B), and a real run."""

import json
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from trl_forking.callbacks import STATS_FILE, ForkingStatsCallback


def make_batch(seed, rows=3, width=9):
    """A forking_last_batch dict as the trainer publishes it: (B, T) tensors with right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (rows, width), generator=g)
    entropies = torch.rand(rows, width, generator=g) * 2
    entropies[:, 0] = 0.0
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    mask = torch.arange(width).expand(rows, width) < lengths.unsqueeze(1)
    selected = (torch.rand(rows, width, generator=g) < 0.3) & mask
    return {"completion_ids": ids, "entropies": entropies, "mask": mask, "selected": selected}


def run_steps(callback, args, steps, accumulation):
    """Drives the callback as transformers' Trainer does; returns the batches of each optimizer step."""
    trainer, state, control = callback.trainer, TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, processing_class=None)
    published = {}
    for step in range(1, steps + 1):
        published[step] = []
        for micro in range(accumulation):
            trainer.forking_last_batch = make_batch(seed=100 * step + micro)
            published[step].append(trainer.forking_last_batch)
            if micro + 1 < accumulation:
                callback.on_substep_end(args, state, control)
        state.global_step = step
        callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)
    return published


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_nth_step_pools_exactly_that_steps_micro_batches(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", logging_steps=1)
    callback = ForkingStatsCallback(SimpleNamespace(forking_last_batch=None), every_n_steps=2, top_tokens=50)
    published = run_steps(callback, args, steps=5, accumulation=3)
    records = read_jsonl(tmp_path / STATS_FILE)
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        batches = published[record["step"]]
        values = sorted(v for b in batches for v in b["entropies"][b["mask"]].tolist())
        n = len(values)
        assert record["num_tokens"] == n
        assert record["num_selected"] == sum(int(b["selected"].sum()) for b in batches)
        assert record["percentiles"]["p80"] == pytest.approx(values[math.ceil(round(0.8 * n, 6)) - 1])
        assert record["share_below"]["0.01"] == pytest.approx(sum(v < 0.01 for v in values) / n)
        assert sum(record["histogram"]["counts"]) == n
        counts = {}
        for b in batches:
            for token in b["completion_ids"][b["selected"]].tolist():
                counts[token] = counts.get(token, 0) + 1
        assert {row["token_id"]: row["count"] for row in record["top_tokens"]} == counts
        selected_min = min(v for b in batches for v in b["entropies"][b["selected"]].tolist())
        assert record["selected_min_entropy"] == pytest.approx(selected_min)


def test_logging_steps_is_the_default_interval_and_a_batch_is_counted_once(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", logging_steps=3)
    trainer = SimpleNamespace(forking_last_batch=make_batch(0))
    callback = ForkingStatsCallback(trainer)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    state.global_step = 2
    callback.on_substep_end(args, state, control)  # the micro-batch of step 3
    state.global_step = 3
    callback.on_step_end(args, state, control)  # same dict object still published: not counted twice
    (record,) = read_jsonl(tmp_path / STATS_FILE)
    assert record["step"] == 3 and record["num_tokens"] == int(trainer.forking_last_batch["mask"].sum())


def test_a_batch_published_in_an_unlogged_step_is_not_counted_later(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", logging_steps=1)
    trainer = SimpleNamespace(forking_last_batch=None)
    callback = ForkingStatsCallback(trainer, every_n_steps=2)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    trainer.forking_last_batch = make_batch(1)
    state.global_step = 1
    callback.on_step_end(args, state, control)  # not logged
    state.global_step = 2
    callback.on_step_end(args, state, control)  # logged, but the trainer published nothing new since step 1
    assert not (tmp_path / STATS_FILE).exists()


def test_tensorboard_gets_histograms_scalars_and_the_token_table(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = TrainingArguments(output_dir=str(tmp_path), report_to=["tensorboard"], logging_steps=1)
    callback = ForkingStatsCallback(SimpleNamespace(forking_last_batch=None), every_n_steps=1)
    run_steps(callback, args, steps=2, accumulation=1)
    events = EventAccumulator(str(tmp_path / "runs" / "forking_stats"), size_guidance={"histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"forking_stats/entropy", "forking_stats/log10_entropy"} <= set(tags["histograms"])
    assert [e.step for e in events.Histograms("forking_stats/entropy")] == [1, 2]
    # Only the percentiles the trainer does not log itself (it logs p50 / p80 / p95 as forking/entropy_pXX).
    assert set(tags["scalars"]) == {f"forking_stats/entropy_p{p}" for p in (10, 25, 75, 90, 99)}
    text = events.Tensors("forking_stats/top_tokens/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| token | count |")


def test_wandb_gets_a_histogram_and_a_table_when_a_run_is_active(tmp_path, monkeypatch):
    logged = []
    fake = types.ModuleType("wandb")
    fake.run = object()
    fake.log = logged.append
    fake.Histogram = lambda np_histogram: ("histogram", np_histogram)
    fake.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", logging_steps=1)
    args.report_to = ["wandb"]  # set after construction: the real WandbCallback would need the package
    callback = ForkingStatsCallback(SimpleNamespace(forking_last_batch=None), every_n_steps=1)
    run_steps(callback, args, steps=2, accumulation=2)
    assert [entry["train/global_step"] for entry in logged] == [1, 2]
    kind, (counts, edges) = logged[0]["forking_stats/entropy"]
    assert kind == "histogram" and len(edges) == len(counts) + 1
    assert logged[0]["forking_stats/top_tokens"][1][:2] == ["token", "count"]


def test_without_a_trainer_the_callback_says_how_to_bind_one(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match=r"bind\(trainer\)"):
        ForkingStatsCallback().on_train_begin(args, TrainerState(), TrainerControl())
    with pytest.raises(ValueError, match="every_n_steps"):
        ForkingStatsCallback(every_n_steps=0)


def test_a_real_training_run_logs_the_selected_top_rho_of_each_step(tiny_model_dir, prompt_dataset, tmp_path):
    from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer

    args = ForkingGRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=10,
        max_steps=2,
        logging_steps=1,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
        args=args,
        train_dataset=prompt_dataset,
    )
    ForkingStatsCallback.attach(trainer, top_tokens=5)
    trainer.train()
    records = read_jsonl(tmp_path / STATS_FILE)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        # Scope "step" selects ceil(rho * N) of the step's N tokens; pooling both micro-batches recovers exactly that.
        assert record["num_selected"] == math.ceil(round(0.2 * record["num_tokens"], 6))
        assert 0 < len(record["top_tokens"]) <= 5 and isinstance(record["top_tokens"][0]["token"], str)
    # The histograms go to the run's own TensorBoard writer (transformers' TensorBoardCallback), not a second one.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = tmp_path.glob("runs/*/events.out.tfevents*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"histograms": 0})
    events.Reload()
    assert [e.step for e in events.Histograms("forking_stats/entropy")] == [1, 2]
    assert not (tmp_path / "runs" / "forking_stats").exists()


def test_callback_passed_to_the_trainer_constructor_is_bound_to_it(tiny_model_dir, prompt_dataset, tmp_path):
    from trl_forking import ForkingGRPOConfig, ForkingGRPOTrainer

    args = ForkingGRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    callback = ForkingStatsCallback(every_n_steps=1)
    trainer = ForkingGRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=lambda completions, **kwargs: [float(len(set(c))) for c in completions],
        args=args,
        train_dataset=prompt_dataset,
        callbacks=[callback],
    )
    assert callback.trainer is trainer
    trainer.train()
    (record,) = read_jsonl(tmp_path / STATS_FILE)
    assert record["num_selected"] == math.ceil(0.2 * record["num_tokens"] - 1e-9)
