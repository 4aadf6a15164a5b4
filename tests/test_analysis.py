"""Forking-token analysis: statistics against naive computations, scoring against full logits, reports, renders
and overlap on the tiny model."""

import html
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from trl_forking.analysis import (
    analyze,
    compare_entropies,
    entropy_change_by_bucket,
    entropy_summary,
    forking_token_table,
    load_completions,
    load_model,
    load_prompts,
    log_histogram,
    overlap,
    position_profile,
    render,
    score_completions,
    spearman,
    top_rho_overlap,
    top_rho_threshold,
)
from trl_forking.analysis.inputs import read_inputs
from trl_forking.selection import forking_mask, num_selected

# Printable text the tiny tokenizer was trained on, so that every token decodes on its own.
COMPLETIONS = [
    "Wait, so we compute 12 + 3 = 15. The answer is $\\boxed{15}$.\nAnswer: 15",
    "Simplify \\frac{4}{2}. Thus, the result is $\\frac{4}{2}$.",
    "What is 7 * 8? Assume we compute 7 * 8 = 56.",
    "Hence 1",
    "Check: 999 - 98 = 901, therefore the answer is $\\boxed{901}$.\nAnswer: 901",
]


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def other_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's architecture and tokenizer with weights from another seed: a different model, same vocab."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    path = str(tmp_path_factory.mktemp("tiny-gpt2-seed1"))
    torch.manual_seed(1)
    GPT2LMHeadModel(AutoConfig.from_pretrained(tiny_model_dir)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def completions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("completions") / "completions.jsonl"
    rows = [{"prompt": f"Question {i}:", "completion": c} for i, c in enumerate(COMPLETIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", dtype="float32")


def random_batch(shape, seed, ties=False):
    """(B, T) entropies with zeros and small values mixed in, and a ragged mask (right padding)."""
    g = torch.Generator().manual_seed(seed)
    entropies = torch.rand(shape, generator=g) * 3
    if ties:
        entropies = (entropies * 4).round() / 4  # few distinct values: many ties
    entropies[torch.rand(shape, generator=g) < 0.3] = 0.0
    entropies[torch.rand(shape, generator=g) < 0.2] = 0.005
    lengths = torch.randint(0, shape[1] + 1, (shape[0],), generator=g)
    lengths[0] = shape[1]
    mask = torch.arange(shape[1]).expand(shape) < lengths.unsqueeze(1)
    return entropies, mask


SHAPES = [(1, 1), (3, 7), (4, 33), (9, 50)]


# --- statistics against naive computations --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_percentiles_share_and_threshold_match_a_sorted_list(shape, ties):
    entropies, mask = random_batch(shape, seed=shape[1], ties=ties)
    values = sorted(entropies[mask].tolist())  # naive reference: the valid values, ascending
    n = len(values)
    for rho in (0.1, 0.2, 0.5, 1.0):
        summary = entropy_summary(entropies, mask, rho, percentiles=(10, 50, 80, 99))
        assert summary["num_tokens"] == n
        for p in (10, 50, 80, 99):
            # nearest rank: the ceil(p/100 * N)-th smallest
            assert summary["percentiles"][f"p{p}"] == pytest.approx(values[max(1, math.ceil(p / 100 * n)) - 1])
        assert summary["share_below"]["0.01"] == pytest.approx(sum(v < 0.01 for v in values) / n)
        k = num_selected(n, rho)
        assert summary["num_selected"] == k
        # the k-th largest value is the smallest entropy that is still selected
        assert summary["threshold"] == pytest.approx(sorted(values, reverse=True)[k - 1])
        assert summary["mean"] == pytest.approx(sum(values) / n, rel=1e-5)


def test_threshold_of_ten_tokens_at_rho_point_two_is_the_second_largest():
    # k = ceil(0.2 * 10) = 2, so the threshold is the 2nd largest of 0 .. 9: 8.
    entropies = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    assert top_rho_threshold(entropies, torch.ones_like(entropies), 0.2) == 8.0


@pytest.mark.parametrize(
    ("rho", "n", "k"),
    [
        (0.2, 10, 2),  # 0.2 * 10 rounds to exactly 2.0 in float64: no error to absorb
        (0.7, 10, 7),  # likewise 7.0
        (0.28, 25, 7),  # 0.28 * 25 = 7.000000000000001 in float64: a plain ceil gives 8
        (0.56, 25, 14),  # 14.000000000000002: a plain ceil gives 15
        (0.07, 100, 7),  # 7.000000000000001: a plain ceil gives 8
        (0.20000001, 10, 3),  # 2.0000001 is above 2, so 3 tokens; rounding rho * N to 6 decimals first gave 2
        (0.1, 3, 1),  # ceil(0.3)
        (1.0, 7, 7),
    ],
)
def test_summary_counts_the_tokens_forking_mask_selects_whatever_the_float_error_of_rho_times_n(rho, n, k):
    entropies = torch.arange(n, dtype=torch.float32).reshape(1, n)  # distinct: the top k are n - k .. n - 1
    mask = torch.ones_like(entropies, dtype=torch.bool)
    summary = entropy_summary(entropies, mask, rho)
    assert summary["num_selected"] == k == num_selected(n, rho) == int(forking_mask(entropies, mask, rho).sum())
    assert summary["threshold"] == n - k


def test_summary_of_no_tokens_is_empty_not_an_error():
    summary = entropy_summary(torch.zeros(2, 3), torch.zeros(2, 3), 0.2)
    assert summary["num_tokens"] == 0 and summary["threshold"] is None and summary["percentiles"]["p50"] is None


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_forking_token_table_matches_python_counting(shape):
    entropies, mask = random_batch(shape, seed=7)
    g = torch.Generator().manual_seed(3)
    token_ids = torch.randint(0, 6, shape, generator=g)
    selected = torch.rand(shape, generator=g) < 0.4
    table = forking_token_table(token_ids, entropies, selected, mask, top=100, decode=lambda i: f"<{i}>")
    counts, sums, occurrences = {}, {}, {}
    for t, h, s, m in zip(
        token_ids.flatten().tolist(),
        entropies.flatten().tolist(),
        selected.flatten().tolist(),
        mask.flatten().tolist(),
        strict=True,
    ):
        if not m:
            continue
        occurrences[t] = occurrences.get(t, 0) + 1
        if s:
            counts[t] = counts.get(t, 0) + 1
            sums[t] = sums.get(t, 0.0) + h
    k = sum(counts.values())
    assert {row["token_id"] for row in table} == set(counts)
    for row in table:
        t = row["token_id"]
        assert row["token"] == f"<{t}>"
        assert row["count"] == counts[t]
        assert row["share"] == pytest.approx(counts[t] / k)
        assert row["fork_rate"] == pytest.approx(counts[t] / occurrences[t])
        assert row["mean_entropy"] == pytest.approx(sums[t] / counts[t], rel=1e-6)
    assert [row["count"] for row in table] == sorted((row["count"] for row in table), reverse=True)


def test_forking_token_table_breaks_count_ties_by_mean_entropy_and_truncates():
    # ids 5 and 9 are both selected twice; 9 has the higher mean entropy (2.5 vs 1.5), so it comes first.
    ids = torch.tensor([[5, 5, 9, 9, 4]])
    entropies = torch.tensor([[1.0, 2.0, 2.0, 3.0, 9.0]])
    selected = torch.tensor([[True, True, True, True, True]])
    table = forking_token_table(ids, entropies, selected, top=2)
    assert [row["token_id"] for row in table] == [9, 5]
    assert table[0]["mean_entropy"] == pytest.approx(2.5)


def naive_average_ranks(values):
    """Rank of x = (number of values below x) + (number of values equal to x + 1) / 2, 1-based."""
    return [sum(v < x for v in values) + (sum(v == x for v in values) + 1) / 2 for x in values]


def naive_pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


@pytest.mark.parametrize(("n", "distinct"), [(2, 100), (7, 3), (31, 100), (64, 5)])
def test_spearman_matches_pearson_of_naive_average_ranks(n, distinct):
    g = torch.Generator().manual_seed(n)
    a = torch.randint(0, distinct, (n,), generator=g).float()
    b = a + torch.randint(0, distinct, (n,), generator=g).float()
    a[0], b[1] = -1.0, -1.0  # neither side constant
    expected = naive_pearson(naive_average_ranks(a.tolist()), naive_average_ranks(b.tolist()))
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)


def test_spearman_of_monotone_maps_is_plus_or_minus_one_and_undefined_for_constants():
    a = torch.tensor([0.1, 3.0, 0.5, 2.0])
    assert spearman(a, a.exp()) == pytest.approx(1.0)  # ranks are unchanged by an increasing map
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.ones(4)) is None
    assert spearman(a[:1], a[:1]) is None


def test_top_rho_overlap_counts_common_positions():
    a = torch.tensor([[True, True, False, False, True]])
    b = torch.tensor([[True, False, True, False, True]])
    assert top_rho_overlap(a, b) == pytest.approx(2 / 3)  # positions 0 and 4 of 3
    assert top_rho_overlap(a, a) == 1.0
    assert top_rho_overlap(torch.zeros(3, dtype=torch.bool), a[0, :3]) is None


def test_compare_entropies_pools_and_splits_per_completion():
    a = [torch.tensor([5.0, 1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 3.0])]
    b = [torch.tensor([5.0, 0.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 3.0])]
    result = compare_entropies(a, b, rho=0.25)
    # Pooled: N = 8, k = 2: both models pick 5.0 and 4.0, the same two positions.
    assert (result["num_tokens"], result["num_selected"], result["overlap"]) == (8, 2, 1.0)
    # Per completion: k = 2 of 5, A picks {0, 1} and B picks {0, 2}: half in common; k = 1 of 3: the same token.
    assert [row["overlap"] for row in result["per_completion"]] == [0.5, 1.0]
    assert result["per_completion_mean"]["overlap"] == 0.75


def naive_entropy_change(a: list[float], b: list[float], buckets: int) -> list[tuple]:
    """(count, min A, max A, mean A, mean B, mean B - A, mean |B - A|) per bucket, from plain Python lists.

    The boundaries are the ceil(j * N / buckets)-th smallest of A (integer ceiling, no floats); a token goes to the
    bucket numbered by how many boundaries lie strictly below its A entropy.
    """
    n, ordered = len(a), sorted(a)
    boundaries = [ordered[-(-j * n // buckets) - 1] for j in range(1, buckets)]
    members = [[] for _ in range(buckets)]
    for x, y in zip(a, b, strict=True):
        members[sum(v < x for v in boundaries)].append((x, y))
    rows = []
    for pairs in members:
        if not pairs:
            rows.append((0, None, None, None, None, None, None))
            continue
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        changes = [y - x for x, y in pairs]
        rows.append(
            (
                len(pairs),
                min(xs),
                max(xs),
                sum(xs) / len(xs),
                sum(ys) / len(ys),
                sum(changes) / len(changes),
                sum(abs(c) for c in changes) / len(changes),
            )
        )
    return rows


CHANGE_KEYS = (
    "num_tokens",
    "entropy_a_min",
    "entropy_a_max",
    "mean_entropy_a",
    "mean_entropy_b",
    "mean_change",
    "mean_abs_change",
)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 11, 33, 101, 1000])
@pytest.mark.parametrize("kind", ["distinct", "zeros", "few_values"])
@pytest.mark.parametrize("buckets", [10, 3])
def test_entropy_change_by_bucket_matches_sorted_lists(n, kind, buckets):
    g = torch.Generator().manual_seed(n + buckets)
    if kind == "distinct":
        a = torch.randperm(n, generator=g).float() / 7  # (n,) no ties
    else:  # exact zeros and 0.005 mixed in, many ties; "few_values": a handful of distinct values
        a = random_batch((1, n), seed=n + buckets, ties=kind == "few_values")[0][0]
    b = (a + torch.randn(n, generator=g) * 0.5).clamp(min=0)
    rows = entropy_change_by_bucket(a, b, buckets)
    expected = naive_entropy_change(a.tolist(), b.tolist(), buckets)
    assert [row["bucket"] for row in rows][:: buckets - 1] == (
        ["0-10%", "90-100%"] if buckets == 10 else ["0-33.3333%", "66.6667-100%"]
    )
    for row, naive in zip(rows, expected, strict=True):
        assert row["num_tokens"] == naive[0]
        assert (row["entropy_a_min"], row["entropy_a_max"]) == (naive[1], naive[2])  # exact: values of A
        for key, value in zip(CHANGE_KEYS[3:], naive[3:], strict=True):
            assert row[key] == (None if value is None else pytest.approx(value, rel=1e-9, abs=1e-12)), key
    if kind == "distinct":
        # Without ties bucket j holds exactly the ranks ceil(j N / buckets) + 1 .. ceil((j + 1) N / buckets).
        edges = [-(-j * n // buckets) for j in range(buckets + 1)]
        assert [row["num_tokens"] for row in rows] == [hi - lo for lo, hi in zip(edges, edges[1:], strict=False)]


def test_entropy_change_by_bucket_keeps_ties_together_in_the_lowest_bucket_they_reach():
    # Ten tokens, six at H = 0 under A. The decile boundaries are the 1st, 2nd, ..., 9th smallest: 0, 0, 0, 0, 0, 0,
    # 1, 2, 3. No boundary lies below 0, so all six zeros are in "0-10%" and "10-20%" to "50-60%" are empty; 1 lies
    # above six boundaries ("60-70%"), 2, 3 and 4 above seven, eight and nine.
    a = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.1, 1.0, 1.0, 5.0, 4.0])
    rows = entropy_change_by_bucket(a, b)
    assert [row["num_tokens"] for row in rows] == [6, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert rows[0]["mean_change"] == pytest.approx(0.1) and rows[0]["mean_entropy_b"] == pytest.approx(0.1)  # 0.6 / 6
    assert rows[1]["mean_change"] is None and rows[1]["entropy_a_min"] is None
    assert [rows[j]["mean_change"] for j in (6, 7, 8, 9)] == [0.0, -1.0, 2.0, 0.0]
    # Two buckets of [1, 2, 3, 4]: the boundary is the 2nd smallest, 2. Changes +1 and -1 below it average to 0 while
    # their absolute values average to 1; above it, 0 and +1.
    rows = entropy_change_by_bucket(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 1.0, 3.0, 5.0]), buckets=2)
    assert [(r["bucket"], r["mean_change"], r["mean_abs_change"]) for r in rows] == [
        ("0-50%", 0.0, 1.0),
        ("50-100%", 0.5, 0.5),
    ]


@pytest.mark.parametrize("ties", [False, True])
def test_decile_boundaries_are_the_percentiles_analyze_reports(ties):
    entropies, mask = random_batch((9, 50), seed=11, ties=ties)
    a = entropies[mask]
    rows = entropy_change_by_bucket(a, a)
    p = entropy_summary(entropies, mask, 0.2, percentiles=range(10, 100, 10))["percentiles"]
    for j, row in enumerate(rows):
        if row["num_tokens"]:
            assert j == 0 or row["entropy_a_min"] > p[f"p{10 * j}"]
            assert j == 9 or row["entropy_a_max"] <= p[f"p{10 * (j + 1)}"]
            assert row["mean_change"] == 0.0 and row["mean_abs_change"] == 0.0
    assert sum(row["num_tokens"] for row in rows) == a.numel()


def test_entropy_change_by_bucket_of_no_tokens_has_empty_buckets_and_rejects_bad_input():
    rows = entropy_change_by_bucket(torch.zeros(0), torch.zeros(0), buckets=4)
    assert [row["num_tokens"] for row in rows] == [0] * 4 and rows[0]["mean_change"] is None
    with pytest.raises(ValueError, match=r"buckets must be an integer >= 1, got 0"):
        entropy_change_by_bucket(torch.ones(3), torch.ones(3), buckets=0)
    with pytest.raises(ValueError, match="same shape"):
        entropy_change_by_bucket(torch.ones(3), torch.ones(4))


@pytest.mark.parametrize("n", [1, 17, 500])
def test_log_histogram_counts_every_value_once_on_increasing_log_edges(n):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 5
    values[: n // 3] = 0.0  # exact zeros fall below the floor and are counted in the first bin
    histogram = log_histogram(values, bins=20)
    edges = np.array(histogram["edges"])
    assert sum(histogram["counts"]) == n
    assert len(edges) == 21 and np.all(np.diff(edges) > 0)
    if n > 1:
        assert edges[0] == pytest.approx(histogram["floor"]) and edges[-1] == pytest.approx(float(values.max()))
        # log-spaced: equal ratios between consecutive edges
        assert np.allclose(np.diff(np.log(edges)), np.log(edges[1] / edges[0]))
        assert histogram["counts"][0] >= n // 3


def test_position_profile_matches_a_loop_over_tokens():
    entropies, mask = random_batch((6, 23), seed=5)
    selected = torch.rand(6, 23, generator=torch.Generator().manual_seed(1)) < 0.3
    selected &= mask
    forks, totals = [0] * 10, [0] * 10
    for row in range(6):
        n = int(mask[row].sum())
        for t in range(n):
            forks[10 * t // n] += bool(selected[row, t])
            totals[10 * t // n] += 1
    expected = [f / t if t else None for f, t in zip(forks, totals, strict=True)]
    assert position_profile(selected, mask) == pytest.approx(expected)


# --- inputs ---------------------------------------------------------------------------------------------------------


def test_malformed_completion_line_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(ValueError, match=r"c\.jsonl:3: malformed JSON"):
        load_completions(str(path))
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: expected an object with 'prompt' and 'completion'"):
        load_completions(str(path))


def test_prompts_load_from_jsonl_and_saved_dataset_with_column_fallback(tmp_path):
    from datasets import Dataset

    messages = [{"role": "user", "content": "What is 1 + 1?"}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": messages}) + "\n" + json.dumps({"prompt": "2 + 2 ="}) + "\n")
    assert load_prompts(str(path)) == [messages, "2 + 2 ="]
    Dataset.from_dict({"problem": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds"), num_samples=2) == ["a", "b"]
    Dataset.from_dict({"problem": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is empty"):
        load_prompts(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"exactly one of prompts"):
        read_inputs(prompts=["a"], completions=[{"prompt": "a", "completion": "b"}])


# --- scoring, report, render and overlap on the tiny model ----------------------------------------------------------


def test_chunked_scoring_matches_entropies_from_full_logits(tiny):
    model, tokenizer = tiny
    records = [{"prompt": f"Question {i}:", "completion": c} for i, c in enumerate(COMPLETIONS)]
    scored = score_completions(model, tokenizer, records, temperature=0.7, batch_size=2, progress=False)
    for record, ids, entropies in zip(records, scored.token_ids, scored.entropies, strict=True):
        prompt = tokenizer(record["prompt"])["input_ids"]
        full = torch.tensor([prompt + ids.tolist()])
        with torch.no_grad():
            logits = model(full).logits[0].float() / 0.7  # (L, V), one unpadded sequence
        log_p = torch.log_softmax(logits, -1)
        naive = -(log_p.exp() * log_p).sum(-1)[len(prompt) - 1 : -1]  # position t - 1 predicts token t
        assert torch.allclose(entropies, naive, atol=1e-4)


def assert_valid_png(path, min_width=300, min_height=150):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert image.width >= min_width and image.height >= min_height
    assert pixels.std() > 5, "the image is (nearly) uniform"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def test_analyze_writes_report_and_charts_that_agree_with_the_statistics(tiny, completions_file, tmp_path, capsys):
    model, tokenizer = tiny
    report = analyze(model, str(tmp_path), completions=completions_file, tokenizer=tokenizer, rho=0.2, progress=False)
    scored = score_completions(model, tokenizer, load_completions(completions_file), progress=False)
    _, entropies, mask = scored.padded()
    assert report["summary"] == entropy_summary(entropies, mask, 0.2)  # same tokens, same entropies, same numbers
    assert report["summary"]["num_tokens"] == sum(len(tokenizer(c)["input_ids"]) for c in COMPLETIONS)
    assert sum(row["count"] for row in report["forking_tokens"]) <= report["summary"]["num_selected"]
    with open(tmp_path / "report.json") as f:
        assert json.load(f)["summary"] == report["summary"]
    assert_valid_png(report["files"]["histogram"])
    assert_valid_png(report["files"]["forking_tokens"])
    out = capsys.readouterr().out
    assert "p80=" in out and "H < 0.01" in out and "threshold" in out


def test_analyze_samples_num_generations_completions_per_prompt(tiny, tmp_path):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": "What is 1 + 2?"}], "Simplify \\frac{3}{4}."]
    report = analyze(
        model,
        str(tmp_path),
        prompts=prompts,
        tokenizer=tokenizer,
        num_generations=3,
        max_new_tokens=12,
        progress=False,
        verbose=False,
    )
    records = load_completions(report["files"]["completions"])
    assert len(records) == 6 and report["num_completions"] == 6
    assert [r["prompt"] for r in records] == [prompts[0]] * 3 + [prompts[1]] * 3
    for record in records:
        ids = record["completion_ids"]
        assert 1 <= len(ids) <= 12
        assert tokenizer.eos_token_id not in ids[:-1]  # cut at the first EOS
    assert report["summary"]["num_tokens"] == sum(len(r["completion_ids"]) for r in records)


def test_string_prompts_sampled_through_the_chat_template_are_saved_as_conversations(tiny, tmp_path):
    model, tokenizer = tiny
    report = analyze(
        model,
        str(tmp_path),
        prompts=["What is 2 + 2?"],
        tokenizer=tokenizer,
        chat_template=True,
        max_new_tokens=8,
        progress=False,
        verbose=False,
    )
    (record,) = load_completions(report["files"]["completions"])
    assert record["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    # Re-scored without the flag, the saved file gives the same entropies as the report.
    again = analyze(
        model,
        str(tmp_path / "again"),
        completions=report["files"]["completions"],
        tokenizer=tokenizer,
        progress=False,
        verbose=False,
    )
    assert again["summary"] == report["summary"]


def test_render_html_holds_every_token_in_order_and_marks_the_top_rho(tiny, completions_file, tmp_path):
    model, tokenizer = tiny
    files = render(model, str(tmp_path), completions=completions_file, tokenizer=tokenizer, rho=0.2, progress=False)
    page = open(files["html"], encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script|<link|<img|src=|url\(|https?://", page), "the page must be standalone"
    sections = page.split('<section class="completion">')[1:]
    assert len(sections) == len(COMPLETIONS)
    n_total, n_marked = 0, 0
    for section, completion in zip(sections, COMPLETIONS, strict=True):
        spans = re.findall(r'<span class="tok( fork)?"[^>]*>(.*?)</span>', section, flags=re.S)
        tokens = [tokenizer.decode([i]) for i in tokenizer(completion)["input_ids"]]
        assert [html.unescape(text) for _, text in spans] == tokens
        assert "".join(html.unescape(text) for _, text in spans) == completion
        n_total += len(spans)
        n_marked += sum(bool(fork) for fork, _ in spans)
    assert n_marked == num_selected(n_total, 0.2)
    assert_valid_png(files["png"])


def test_render_selects_completions_by_index(tiny, completions_file, tmp_path):
    model, tokenizer = tiny
    files = render(
        model, str(tmp_path), completions=completions_file, tokenizer=tokenizer, indices=[3, 0], progress=False
    )
    page = open(files["html"], encoding="utf-8").read()
    assert page.count('<section class="completion">') == 2
    assert page.index("Question 3:") < page.index("Question 0:")
    with pytest.raises(ValueError, match=r"index: \[7\] out of range"):
        render(model, str(tmp_path), completions=completions_file, tokenizer=tokenizer, indices=[7], progress=False)


def test_overlap_of_a_model_with_itself_is_one(tiny_model_dir, completions_file, tmp_path):
    result = overlap(
        tiny_model_dir, tiny_model_dir, str(tmp_path), completions=completions_file, progress=False, verbose=False
    )
    assert result["overlap"] == 1.0 and result["spearman"] == pytest.approx(1.0)
    assert all(row["overlap"] == 1.0 for row in result["per_completion"])
    assert json.load(open(tmp_path / "overlap.json"))["overlap"] == 1.0
    # The same model scores the same tokens: no bucket changes.
    buckets = result["entropy_change_by_bucket"]
    assert sum(row["num_tokens"] for row in buckets) == result["num_tokens"]
    assert all(row["mean_abs_change"] == 0.0 for row in buckets if row["num_tokens"])


def test_overlap_with_a_model_of_another_seed_is_below_one(
    tiny_model_dir, other_model_dir, completions_file, tmp_path, capsys
):
    result = overlap(tiny_model_dir, other_model_dir, str(tmp_path), completions=completions_file, progress=False)
    assert result["num_selected"] == num_selected(result["num_tokens"], 0.2)
    assert result["overlap"] < 1.0 and result["spearman"] < 1.0
    assert len(result["per_completion"]) == len(COMPLETIONS)
    out = capsys.readouterr().out
    assert "top-0.2 overlap" in out and "mean |B-A|" in out and "90-100%" in out
    buckets = json.load(open(tmp_path / "overlap.json"))["entropy_change_by_bucket"]
    assert buckets == result["entropy_change_by_bucket"] and len(buckets) == 10
    # The bucket means, weighted by their counts, give back each model's mean entropy over all tokens.
    model_a, tokenizer = load_model(tiny_model_dir, device="cpu")
    model_b, _ = load_model(other_model_dir, device="cpu")
    records = load_completions(completions_file)
    h_a = torch.cat(score_completions(model_a, tokenizer, records, progress=False).entropies).double()
    h_b = torch.cat(score_completions(model_b, tokenizer, records, progress=False).entropies).double()
    filled = [row for row in buckets if row["num_tokens"]]
    assert sum(r["num_tokens"] * r["mean_entropy_a"] for r in filled) / h_a.numel() == pytest.approx(float(h_a.mean()))
    assert sum(r["num_tokens"] * r["mean_change"] for r in filled) / h_a.numel() == pytest.approx(
        float((h_b - h_a).mean()), abs=1e-6
    )
    assert_valid_png(result["files"]["entropy_change"])


def test_overlap_with_prompts_scores_under_model_b_exactly_what_model_a_sampled(
    tiny_model_dir, other_model_dir, tmp_path
):
    sampled = overlap(
        tiny_model_dir,
        other_model_dir,
        str(tmp_path / "sampled"),
        prompts=["What is 1 + 2?", "Simplify 4 / 2."],
        num_generations=2,
        max_new_tokens=10,
        progress=False,
        verbose=False,
    )
    records = load_completions(sampled["files"]["completions"])
    assert len(records) == 4 and sampled["num_tokens"] == sum(len(r["completion_ids"]) for r in records)
    rescored = overlap(
        tiny_model_dir,
        other_model_dir,
        str(tmp_path / "rescored"),
        completions=sampled["files"]["completions"],
        progress=False,
        verbose=False,
    )
    sampled.pop("files"), rescored.pop("files")
    assert sampled == rescored  # every statistic, per completion and per bucket


def test_overlap_rejects_models_with_different_vocabularies(tiny_model_dir, completions_file, tmp_path):
    from trl_forking.testing import build_tiny_model

    other = build_tiny_model(str(tmp_path / "other-vocab"), seed=3)  # the seed also changes the tokenizer's corpus
    with pytest.raises(ValueError, match="different vocabularies"):
        overlap(tiny_model_dir, other, str(tmp_path / "out"), completions=completions_file, progress=False)
    shutil.rmtree(other)


def test_png_layout_wraps_tokens_breaks_at_newlines_and_cuts_overlong_tokens():
    from trl_forking.analysis.render import _layout

    pieces = _layout(["abc", "defg", "\nxy", "123456789012"], width=5)
    # (token, line, column, text): "defg" does not fit after "abc" (3 + 4 > 5); "\n" starts line 2; the 12-character
    # token starts a fresh line and is cut into lines of 5.
    assert pieces == [
        (0, 0, 0, "abc"),
        (1, 1, 0, "defg"),
        (2, 2, 0, "xy"),
        (3, 3, 0, "12345"),
        (3, 4, 0, "67890"),
        (3, 5, 0, "12"),
    ]


def test_render_per_sequence_marks_the_top_rho_of_each_completion(tiny, completions_file, tmp_path):
    model, tokenizer = tiny
    files = render(
        model,
        str(tmp_path),
        completions=completions_file,
        tokenizer=tokenizer,
        rho=0.3,
        per_sequence=True,
        progress=False,
    )
    sections = open(files["html"], encoding="utf-8").read().split('<section class="completion">')[1:]
    for section in sections:
        spans = re.findall(r'<span class="tok( fork)?"', section)
        # k = ceil(rho * n_i) per completion, rounded as the library's num_selected rounds it
        assert sum(bool(s) for s in spans) == num_selected(len(spans), 0.3)
