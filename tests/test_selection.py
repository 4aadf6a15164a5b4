"""forking_mask and entropy_quantiles against naive references: sizes, ties, padding, rho edges, ranks."""

import math
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks

from trl_forking import entropy_quantiles, forking_mask, num_selected
from trl_forking.metrics import forking_metrics


def exact_k(rho, n):
    """ceil(rho * n) in exact rational arithmetic, rho read as the decimal it was written as."""
    return math.ceil(Fraction(str(rho)) * n)


def naive_top(entropies, mask, rho):
    """Stable top-k over the row-major valid tokens: exactly ceil(rho*N), earlier tokens first among ties."""
    valid = mask.bool().flatten()
    values = entropies.flatten()[valid].float()
    k = exact_k(rho, values.numel())
    order = sorted(range(values.numel()), key=lambda i: (-values[i].item(), i))
    top = torch.zeros(values.numel(), dtype=torch.bool)
    top[order[:k]] = True
    out = torch.zeros(entropies.numel(), dtype=torch.bool)
    out[valid] = top
    return out.view(entropies.shape)


def naive_mask(entropies, mask, rho, selection):
    top = naive_top(entropies, mask, rho)
    return mask.bool() & ~top if selection == "bottom" else top


def random_case(generator, ties: bool):
    rows, cols = torch.randint(1, 9, (2,), generator=generator).tolist()
    if ties:
        entropies = torch.randint(0, 3, (rows, cols), generator=generator).float() / 2
    else:
        entropies = torch.rand(rows, cols, generator=generator) * 5
    mask = (torch.rand(rows, cols, generator=generator) > 0.3).int()
    return entropies, mask


@pytest.mark.parametrize("selection", ["top", "bottom"])
@pytest.mark.parametrize("rho", [1e-4, 0.2, 0.33, 0.5, 1.0])
def test_forking_mask_matches_naive_reference_on_random_shapes_and_ties(selection, rho):
    # A fixed seed per case (not hash(), which Python randomizes per process for strings).
    generator = torch.Generator().manual_seed(int(rho * 10**6) * 2 + (selection == "bottom"))
    for trial in range(60):
        entropies, mask = random_case(generator, ties=trial % 2 == 0)
        got = forking_mask(entropies, mask, rho, selection)
        assert torch.equal(got, naive_mask(entropies, mask, rho, selection)), (entropies, mask)


def test_hand_computed_top_two_of_five_with_padding():
    # Valid entropies are 0.1, 0.9, 0.5, 0.7 (the 5.0 is padding): ceil(0.5 * 4) = 2 picks 0.9 and 0.7.
    entropies = torch.tensor([[0.1, 0.9, 5.0], [0.5, 0.7, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    expected = torch.tensor([[False, True, False], [False, True, False]])
    assert torch.equal(forking_mask(entropies, mask, 0.5), expected)
    assert torch.equal(forking_mask(entropies, mask, 0.5, "bottom"), torch.tensor([[1, 0, 0], [1, 0, 0]]).bool())


def test_all_equal_entropies_select_exactly_k_earliest_tokens():
    # Every token ties: the count must still be exactly ceil(0.2 * 10) = 2, taken in row-major order.
    entropies = torch.ones(2, 5)
    mask = torch.ones(2, 5)
    got = forking_mask(entropies, mask, 0.2)
    assert got.sum() == 2
    assert got[0, :2].all()


def test_tiny_rho_selects_one_token_and_rho_one_selects_all_valid():
    entropies = torch.rand(3, 7)
    mask = torch.ones(3, 7)
    mask[2, 4:] = 0
    one = forking_mask(entropies, mask, 1e-9)
    assert one.sum() == 1 and entropies[one].item() == entropies[mask.bool()].max().item()
    assert torch.equal(forking_mask(entropies, mask, 1.0), mask.bool())
    assert not forking_mask(entropies, mask, 1.0, "bottom").any()


def test_padding_is_never_selected_even_with_highest_entropy():
    entropies = torch.tensor([[100.0, 1.0, 2.0, 100.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    for selection in ["top", "bottom", "random", "all"]:
        got = forking_mask(entropies, mask, 0.5, selection, generator=torch.Generator().manual_seed(0))
        assert not got[~mask.bool()].any(), selection


def test_empty_mask_gives_empty_selection():
    entropies = torch.rand(2, 3)
    for selection in ["top", "bottom", "random", "all"]:
        assert not forking_mask(entropies, torch.zeros(2, 3), 0.2, selection).any()
    assert not forking_mask(torch.zeros(0, 5), torch.zeros(0, 5), 0.2).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_entropy_at_a_valid_position_raises(bad):
    entropies = torch.tensor([[0.5, bad, 0.1]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        forking_mask(entropies, torch.ones(1, 3), 0.2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        forking_mask(entropies, torch.ones(1, 3), 0.2, per_sequence=True)
    # The same value under padding is ignored.
    assert forking_mask(entropies, torch.tensor([[1, 0, 1]]), 0.5).tolist() == [[True, False, False]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantile": 0.0}, r"quantile must be a number in \(0, 1\], got 0.0"),
        ({"quantile": 1.5}, r"quantile must be a number in \(0, 1\], got 1.5"),
        ({"quantile": 0.2, "selection": "middle"}, r"selection must be one of \['top', 'bottom', 'random', 'all'\]"),
    ],
)
def test_bad_arguments_name_the_field_and_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        forking_mask(torch.rand(2, 2), torch.ones(2, 2), **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        forking_mask(torch.rand(2, 3), torch.ones(2, 2), 0.2)


def test_low_precision_entropies_select_like_float32():
    entropies = torch.rand(4, 33).to(torch.bfloat16)
    mask = torch.ones(4, 33)
    assert torch.equal(forking_mask(entropies, mask, 0.2), naive_top(entropies.float(), mask, 0.2))


def test_per_sequence_selects_ceil_rho_n_i_in_every_row():
    generator = torch.Generator().manual_seed(1)
    for trial in range(40):
        entropies, mask = random_case(generator, ties=trial % 2 == 0)
        got = forking_mask(entropies, mask, 0.3, per_sequence=True)
        for row in range(entropies.size(0)):
            expected = naive_top(entropies[row : row + 1], mask[row : row + 1], 0.3)[0]
            assert torch.equal(got[row], expected)
        bottom = forking_mask(entropies, mask, 0.3, "bottom", per_sequence=True)
        assert torch.equal(bottom, mask.bool() & ~got)


def test_random_selection_has_exact_count_is_reproducible_and_uniform():
    entropies = torch.arange(40.0).view(4, 10)  # highest entropies at the end: random must ignore them
    mask = torch.ones(4, 10)
    mask[3, 5:] = 0
    first = forking_mask(entropies, mask, 0.2, "random", generator=torch.Generator().manual_seed(3))
    again = forking_mask(entropies, mask, 0.2, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    generator = torch.Generator().manual_seed(4)
    counts = torch.zeros(4, 10)
    draws = 2000
    for _ in range(draws):
        picked = forking_mask(entropies, mask, 0.2, "random", generator=generator)
        assert picked.sum() == 7 and not picked[~mask.bool()].any()  # ceil(0.2 * 35) = 7
        counts += picked
    share = counts[mask.bool()] / draws  # each valid token: 7/35 = 0.2 in expectation, sd ~0.009
    assert (share - 0.2).abs().max() < 0.05


def test_num_selected_avoids_float_ceiling_errors():
    assert num_selected(10, 0.2) == 2  # 0.2 * 10 = 2.0000000000000004 in floating point
    assert num_selected(10, 0.2, "bottom") == 8
    assert num_selected(7, 0.2, "all") == 7
    assert num_selected(torch.tensor([10, 3, 0]), 0.2).tolist() == [2, 1, 0]


@pytest.mark.slow
def test_more_than_2_pow_24_tokens_on_one_rank_is_exact():
    # torch.quantile raises above 2**24 elements; ties are plentiful with 1,000 distinct values.
    n = 2**24 + 4097
    generator = torch.Generator().manual_seed(0)
    entropies = (torch.randint(0, 1000, (n,), generator=generator).float() / 100).view(1, n)
    mask = torch.ones(1, n)
    got = forking_mask(entropies, mask, 0.2)
    k = exact_k(0.2, n)
    assert got.sum() == k
    # Reference: a stable sort puts earlier tokens first among ties.
    order = torch.sort(entropies[0], descending=True, stable=True).indices[:k]
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order] = True
    assert torch.equal(got[0], expected)


def test_entropy_quantiles_match_sorted_reference():
    generator = torch.Generator().manual_seed(2)
    for trial in range(30):
        entropies, mask = random_case(generator, ties=trial % 2 == 0)
        values = sorted(entropies[mask.bool()].tolist())
        qs = [0.0, 0.1, 0.5, 0.8, 0.95, 1.0]
        got = entropy_quantiles(entropies, mask, qs)
        if not values:
            assert got is None
            continue
        expected = [values[max(1, math.ceil(round(q * len(values), 6))) - 1] for q in qs]
        assert got.tolist() == pytest.approx(expected)


def test_forking_metrics_match_naive_computation():
    generator = torch.Generator().manual_seed(5)
    entropies = torch.rand(6, 11, generator=generator) * 2
    entropies[0, :4] = 0.001  # some tokens below the paper's 0.01
    mask = torch.ones(6, 11)
    mask[4:, 7:] = 0
    selected = forking_mask(entropies, mask, 0.2)
    metrics = forking_metrics(entropies, mask, selected, 0.2)
    values = sorted(entropies[mask.bool()].tolist())
    n = len(values)
    k = math.ceil(0.2 * n)
    assert metrics["forking/threshold"] == pytest.approx(values[n - k])
    assert metrics["forking/threshold"] == pytest.approx(entropies[selected].min().item())
    assert metrics["forking/selected_fraction"] == pytest.approx(k / n)
    assert metrics["forking/entropy_selected_mean"] == pytest.approx(entropies[selected].mean().item())
    assert metrics["forking/entropy_unselected_mean"] == pytest.approx(entropies[mask.bool() & ~selected].mean().item())
    for p in (50, 80, 95):
        assert metrics[f"forking/entropy_p{p}"] == pytest.approx(values[math.ceil(p / 100 * n) - 1])
    assert metrics["forking/frac_entropy_below_0.01"] == pytest.approx(sum(v < 0.01 for v in values) / n)
    assert metrics["forking/entropy_nonfinite"] == 0 and "forking/excluded_fraction" not in metrics
    empty = forking_metrics(entropies, torch.zeros_like(mask), torch.zeros_like(selected), 0.2)
    assert empty.pop("forking/entropy_nonfinite") == 0
    assert all(math.isnan(v) for v in empty.values())


def test_forking_metrics_leave_out_and_count_nonfinite_entropies_and_report_the_excluded_share():
    # What a full-token run ("all") logs when some entropies are NaN: the figures of the finite ones, and how many
    # were not. Row 5 is outside the population (a zero-advantage completion): 11 of the 66 completion tokens.
    generator = torch.Generator().manual_seed(6)
    entropies = torch.rand(6, 11, generator=generator)
    entropies[1, 2], entropies[2, 5] = float("nan"), float("inf")
    completion = torch.ones(6, 11, dtype=torch.bool)
    population = completion.clone()
    population[5] = False
    metrics = forking_metrics(entropies, population, population, 1.0, completion_mask=completion)
    finite = population & torch.isfinite(entropies)
    assert metrics["forking/entropy_nonfinite"] == 2
    assert metrics["forking/selected_fraction"] == 1.0
    assert metrics["forking/entropy_selected_mean"] == pytest.approx(entropies[finite].mean().item())
    values = sorted(entropies[finite].tolist())
    assert metrics["forking/entropy_p50"] == pytest.approx(values[math.ceil(0.5 * len(values)) - 1])
    assert metrics["forking/excluded_fraction"] == pytest.approx(11 / 66)


# --- two processes (gloo) -------------------------------------------------------------------------------------------


def _distributed_worker(rank, world, cases):
    out = []
    for entropies, mask, rho, selection in cases:
        try:
            got = forking_mask(entropies[rank], mask[rank], rho, selection, group=dist.group.WORLD)
            quantiles = entropy_quantiles(entropies[rank], mask[rank], [0.5, 0.9], group=dist.group.WORLD)
            out.append((got, quantiles))
        except ValueError as error:
            out.append(str(error))
    return out


@pytest.mark.distributed
def test_two_rank_mask_equals_single_process_mask_over_the_concatenation():
    generator = torch.Generator().manual_seed(7)
    cases = []
    for trial in range(12):
        rows, cols = 3 + trial % 2, 5 + trial % 3
        entropies = [torch.randint(0, 4, (rows, cols), generator=generator).float() for _ in range(2)]
        if trial % 3:
            entropies = [torch.rand(rows, cols, generator=generator) for _ in range(2)]
        masks = [(torch.rand(rows, cols, generator=generator) > 0.25).int() for _ in range(2)]
        if trial == 4:
            masks[1].zero_()  # rank 1 has no valid tokens
        if trial == 5:
            masks[0].zero_()
            masks[1].zero_()  # nobody has tokens: empty masks, no hang
        selection = ["top", "bottom"][trial % 2]
        cases.append((entropies, masks, [0.2, 0.5, 0.07][trial % 3], selection))
    bad = [torch.rand(2, 3), torch.rand(2, 3)]
    bad[1][0, 0] = float("nan")  # only rank 1 sees a NaN: both ranks must raise, neither may wait forever
    cases.append((bad, [torch.ones(2, 3), torch.ones(2, 3)], 0.2, "top"))

    results = run_on_ranks(_distributed_worker, 2, cases)
    for index, (entropies, masks, rho, selection) in enumerate(cases[:-1]):
        joined = naive_mask(torch.cat(entropies), torch.cat(masks), rho, selection)
        rows = entropies[0].size(0)
        assert torch.equal(results[0][index][0], joined[:rows]), index
        assert torch.equal(results[1][index][0], joined[rows:]), index
        values = sorted(torch.cat(entropies)[torch.cat(masks).bool()].tolist())
        if values:
            expected = [values[math.ceil(q * len(values)) - 1] for q in (0.5, 0.9)]
            assert results[0][index][1].tolist() == pytest.approx(expected)
            assert results[1][index][1].tolist() == pytest.approx(expected)
        else:
            assert results[0][index][1] is None and results[1][index][1] is None
    assert "NaN or infinite" in results[0][-1] and "NaN or infinite" in results[1][-1]
    assert "huggingface/trl#7221" in results[0][-1]  # the message names the usual cause


def _per_sequence_worker(rank, world, entropies):
    try:
        return forking_mask(entropies[rank], torch.ones(2, 3), 0.2, per_sequence=True, group=dist.group.WORLD)
    except ValueError as error:
        return str(error)


@pytest.mark.distributed
def test_a_nonfinite_entropy_on_one_rank_stops_every_rank_under_per_sequence_selection():
    # Rows are selected independently, but the check is collective: rank 0 must not go on into the next collective
    # while rank 1 raises.
    entropies = [torch.rand(2, 3), torch.rand(2, 3)]
    entropies[1][1, 2] = float("inf")
    results = run_on_ranks(_per_sequence_worker, 2, entropies)
    assert all(isinstance(r, str) and "1 NaN or infinite value(s)" in r for r in results), results


@pytest.mark.gpu
def test_cuda_selection_equals_cpu_selection():
    generator = torch.Generator().manual_seed(9)
    entropies = torch.randint(0, 50, (64, 513), generator=generator).float() / 7
    mask = (torch.rand(64, 513, generator=generator) > 0.1).int()
    for selection in ["top", "bottom"]:
        on_gpu = forking_mask(entropies.cuda(), mask.cuda(), 0.2, selection)
        assert on_gpu.is_cuda
        assert torch.equal(on_gpu.cpu(), forking_mask(entropies, mask, 0.2, selection))
    quantiles = entropy_quantiles(entropies.cuda(), mask.cuda(), [0.5, 0.8])
    assert torch.equal(quantiles.cpu(), entropy_quantiles(entropies, mask, [0.5, 0.8]))
