"""Data loaders on small local files with the real Hub column layouts (nothing is downloaded)."""

import json

import pytest
from datasets import Dataset

from trl_forking import data
from trl_forking.data import (
    DAPO_PROMPT_TEMPLATE,
    load_dapo_math,
    load_math_eval,
    load_train_dataset,
    to_dapo_format,
)


def _dapo_prompt(problem: str) -> str:
    return DAPO_PROMPT_TEMPLATE.format(problem=problem)


def _bytedance_rows():
    """Rows in BytedTsinghua-SIA/DAPO-Math-17k's layout; the release repeats each problem, so do we."""
    rows = []
    for index, (problem, answer) in enumerate([("Find 2+3.", "5"), ("Find 7*6.", "42"), ("Find 2+3.", "5")]):
        rows.append(
            {
                "data_source": "math_dapo",
                "prompt": [{"content": _dapo_prompt(problem), "role": "user"}],
                "ability": "MATH",
                "reward_model": {"ground_truth": answer, "style": "rule-lean"},
                "extra_info": {"index": f"uuid-{index}"},
            }
        )
    return rows


def test_bytedance_layout_becomes_prompt_and_solution_and_is_deduplicated(tmp_path):
    path = tmp_path / "dapo.parquet"
    Dataset.from_list(_bytedance_rows()).to_parquet(str(path))
    dataset = load_dapo_math(str(path))
    assert dataset.column_names == ["prompt", "solution"]
    assert dataset["solution"] == ["5", "42"]  # the repeated "Find 2+3." kept once, in order
    assert dataset[1]["prompt"] == [{"content": _dapo_prompt("Find 7*6."), "role": "user"}]
    assert len(load_dapo_math(str(path), deduplicate=False)) == 3


def test_open_r1_processed_layout_gives_the_same_rows(tmp_path):
    # open-r1/DAPO-Math-17k-Processed: prompt = the first message's content, solution = the ground truth.
    rows = [
        {
            "prompt": row["prompt"][0]["content"],
            "solution": row["reward_model"]["ground_truth"],
            "data_source": row["data_source"],
            "source_prompt": row["prompt"],
            "ability": row["ability"],
            "reward_model": row["reward_model"],
            "extra_info": row["extra_info"],
        }
        for row in _bytedance_rows()[:2]
    ]
    path = tmp_path / "processed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bytedance = tmp_path / "bytedance.parquet"
    Dataset.from_list(_bytedance_rows()).to_parquet(str(bytedance))
    assert load_dapo_math(str(path)).to_list() == load_dapo_math(str(bytedance)).to_list()
    # Without reward_model (a trimmed copy) the solution column is read instead.
    trimmed = Dataset.from_list([{"prompt": r["prompt"], "solution": r["solution"]} for r in rows])
    assert to_dapo_format(trimmed)["solution"] == ["5", "42"]


def test_unknown_layout_error_names_the_columns_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"dataset columns \['query', 'target'\] match no known layout; allowed:"):
        to_dapo_format(Dataset.from_list([{"query": "1+1", "target": "2"}]))


def test_a_saved_dataset_folder_loads(tmp_path):
    Dataset.from_list(_bytedance_rows()).save_to_disk(str(tmp_path / "saved"))
    assert load_dapo_math(str(tmp_path / "saved"))["solution"] == ["5", "42"]


def test_a_file_with_an_unsupported_extension_is_refused(tmp_path):
    path = tmp_path / "dapo.txt"
    path.write_text("x")
    with pytest.raises(
        ValueError, match=r"extension '.txt' not allowed; use \['.jsonl', '.json', '.parquet', '.csv'\]"
    ):
        load_dapo_math(str(path))


def test_aime_layouts_load_from_local_files(tmp_path):
    h4 = tmp_path / "aime_2024.jsonl"  # HuggingFaceH4/aime_2024 and yentinglin/aime_2025: problem / answer
    h4.write_text(
        json.dumps({"id": 60, "problem": "Find $x$.", "solution": "...", "answer": "204", "url": "u", "year": "2024"})
        + "\n"
    )
    opencompass = tmp_path / "aime2025-I.jsonl"  # opencompass/AIME2025: question / answer
    opencompass.write_text(json.dumps({"question": "Find $y$.", "answer": "70"}) + "\n")
    first = load_math_eval(str(h4))[0]
    assert (first["id"], first["problem"], first["answer"], first["solution"]) == ("60", "Find $x$.", "204", "204")
    assert first["prompt"] == [{"role": "user", "content": _dapo_prompt("Find $x$.")}]
    second = load_math_eval(str(opencompass))[0]
    assert (second["id"], second["problem"], second["answer"]) == ("0", "Find $y$.", "70")


@pytest.mark.parametrize(
    ("name", "calls"),
    [
        ("aime24", [("HuggingFaceH4/aime_2024", None, "train")]),
        ("HuggingFaceH4/aime_2024", [("HuggingFaceH4/aime_2024", None, "train")]),
        ("aime25", [("yentinglin/aime_2025", None, "train")]),
        (
            "opencompass/AIME2025",
            [("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test")],
        ),
    ],
)
def test_eval_set_names_resolve_to_their_hub_repos(monkeypatch, name, calls):
    seen = []

    def fake_load(hub_name, config, split):
        seen.append((hub_name, config, split))
        column = "question" if hub_name.startswith("opencompass") else "problem"
        return Dataset.from_list([{column: f"P{len(seen)}", "answer": "1"}])

    monkeypatch.setattr(data, "_load", fake_load)
    dataset = load_math_eval(name)
    assert seen == calls
    assert dataset["problem"] == [f"P{i + 1}" for i in range(len(calls))]  # both AIME 2025 halves, concatenated


def test_unknown_eval_name_lists_the_known_sets():
    with pytest.raises(ValueError, match=r"'aime23' is neither a local path nor a known set; allowed: \['aime24'"):
        load_math_eval("aime23")


def test_eval_file_without_answer_column_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "Find x."}) + "\n")
    with pytest.raises(
        ValueError, match=r"has columns \['problem'\]; it needs 'problem' \(or 'question'\) and 'answer'"
    ):
        load_math_eval(str(path))


def test_no_dataset_means_the_bundled_tasks_train_split():
    from trl_forking.tasks.arithmetic_chains.task import read_split

    shipped = read_split("train")
    dataset = load_train_dataset(None)
    assert dataset.column_names == ["prompt", "solution"] and len(dataset) == len(shipped)
    assert dataset[0] == {"prompt": shipped[0]["prompt"], "solution": shipped[0]["solution"]}
    assert load_train_dataset("arithmetic-chains").to_list() == dataset.to_list()


def test_the_bundled_task_is_an_eval_set_with_its_own_prompt():
    from trl_forking.tasks.arithmetic_chains.task import read_split

    test = load_math_eval("arithmetic-chains")
    shipped = read_split("test")
    assert len(test) == len(shipped)
    assert test[0] == {
        "id": shipped[0]["id"],
        "problem": shipped[0]["problem"],
        "answer": shipped[0]["solution"],
        "prompt": shipped[0]["prompt"],  # the task's prompt, not DAPO's instruction
        "solution": shipped[0]["solution"],
    }
    assert load_math_eval("arithmetic-chains", split="validation")[0]["id"] == "validation-00000"
