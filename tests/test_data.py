"""WeightedBatches: sample-count weights, microbatches, batch_size_fn, caching, errors."""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hessian_spectra.data import WeightedBatches, default_batch_size, move_batch, slice_batch


def _xy(n: int, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, generator=g)


def test_weights_are_sample_counts_over_total():
    data = [_xy(250), _xy(6, seed=1)]
    wb = list(WeightedBatches(data))
    assert [b.size for b in wb] == [250, 6]
    assert [b.weight for b in wb] == [250 / 256, 6 / 256]
    assert [b.index for b in wb] == [(0, 0), (1, 0)]
    assert sum(b.weight for b in wb) == pytest.approx(1.0, abs=1e-15)


def test_microbatches_split_rows_and_weigh_by_their_size():
    x, y = _xy(10)
    wb = list(WeightedBatches([(x, y), _xy(2, seed=1)], microbatch_size=4))
    assert [b.size for b in wb] == [4, 4, 2, 2]
    assert [b.index for b in wb] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [b.weight for b in wb] == [4 / 12, 4 / 12, 2 / 12, 2 / 12]
    torch.testing.assert_close(torch.cat([b.batch[0] for b in wb[:3]]), x, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([b.batch[1] for b in wb[:3]]), y, rtol=0, atol=0)


def test_batch_size_fn_counts_tokens_while_microbatches_slice_rows():
    # 4 sequences of length 5 with 3, 5, 1, 2 valid tokens: weights follow the tokens
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    batch = {"input_ids": torch.arange(20).reshape(4, 5), "mask": mask}
    other = {
        "input_ids": torch.zeros(1, 5, dtype=torch.long),
        "mask": torch.ones(1, 5, dtype=torch.long),
    }
    tokens = lambda b: int(b["mask"].sum())  # noqa: E731
    whole = list(WeightedBatches([batch, other], batch_size_fn=tokens))
    assert [b.size for b in whole] == [11, 5]
    parts = list(WeightedBatches([batch, other], batch_size_fn=tokens, microbatch_size=3))
    assert [b.size for b in parts] == [9, 2, 5]
    assert [tuple(b.batch["input_ids"].shape) for b in parts] == [(3, 5), (1, 5), (1, 5)]
    assert [b.weight for b in parts] == [9 / 16, 2 / 16, 5 / 16]


def test_mapping_types_survive_slicing_and_moving():
    Pair = namedtuple("Pair", ["x", "y"])
    x, y = _xy(6)

    class Encoding(Mapping):  # like transformers.BatchEncoding: built from one dict
        def __init__(self, data=None):
            self.data = dict(data or {})

        def __getitem__(self, k):
            return self.data[k]

        def __iter__(self):
            return iter(self.data)

        def __len__(self):
            return len(self.data)

    for batch, kind in [
        (OrderedDict(x=x, y=y), OrderedDict),
        (Encoding({"x": x, "y": y}), Encoding),
        (Pair(x, y), Pair),
        ([x, y], list),
    ]:
        part = slice_batch(batch, 1, 3, 6)
        assert type(part) is kind
        moved = move_batch(part, torch.device("cpu"))
        assert type(moved) is kind
        got = part["x"] if isinstance(part, Mapping) else part[0]
        torch.testing.assert_close(got, x[1:3], rtol=0, atol=0)


def test_slice_keeps_tensors_without_the_batch_dimension():
    x, _ = _xy(6)
    scale = torch.ones(3)
    part = slice_batch((x, scale, "name"), 0, 2, 6)
    assert part[0].shape == (2, 3) and part[1] is scale and part[2] == "name"


def test_one_shot_generator_is_cached_and_re_iterable():
    batches = [_xy(3, seed=i) for i in range(3)]
    wb = WeightedBatches(b for b in batches)
    first = [b.batch[0] for b in wb]
    second = [b.batch[0] for b in wb]
    assert len(first) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_shuffling_dataloader_is_cached_into_one_fixed_order():
    x, y = _xy(20)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    wb = WeightedBatches(loader)
    first = torch.cat([b.batch[0] for b in wb])
    second = torch.cat([b.batch[0] for b in wb])
    assert torch.equal(first, second)
    assert [b.size for b in wb] == [6, 6, 6, 2]


def test_num_batches_and_full_dataset_false_limit_the_batches():
    data = [_xy(4, seed=i) for i in range(5)]
    assert len(WeightedBatches(data, num_batches=2)) == 2
    assert len(WeightedBatches(data, full_dataset=False)) == 1
    wb = WeightedBatches(data, num_batches=2)
    assert wb.total_samples == 8 and [b.weight for b in wb] == [0.5, 0.5]


def test_empty_batches_are_skipped_and_set_total_rescales():
    data = [_xy(4), _xy(0, seed=1), _xy(4, seed=2)]
    wb = WeightedBatches(data)
    assert [b.index for b in wb] == [(0, 0), (2, 0)]
    wb.set_total(16)
    assert [b.weight for b in wb] == [0.25, 0.25]
    with pytest.raises(ValueError, match="total sample count must be positive"):
        wb.set_total(0)


def test_batch_size_fn_may_return_numpy_or_tensor_integers():
    data = [_xy(4)]
    assert next(iter(WeightedBatches(data, batch_size_fn=lambda b: np.int64(4)))).size == 4
    assert next(iter(WeightedBatches(data, batch_size_fn=lambda b: torch.tensor(4)))).size == 4


class _Changing:
    """A re-iterable loader whose second pass differs from the first."""

    def __init__(self, sizes_per_pass):
        self.passes = iter(sizes_per_pass)

    def __iter__(self):
        return iter([_xy(n) for n in next(self.passes)])


def test_uncached_loader_that_changes_between_passes_is_refused():
    wb = WeightedBatches(_Changing([[4, 4], [4, 3]]), cache=False)
    with pytest.raises(ValueError, match="changed between passes: batch 1 held 4 samples"):
        list(wb)
    wb = WeightedBatches(_Changing([[4, 4], [4]]), cache=False)
    with pytest.raises(ValueError, match="yielded 2 batches when counted and 1 now"):
        list(wb)


def test_default_batch_size_reads_the_leading_dimension():
    assert (
        default_batch_size({"attention_mask": torch.ones(2, 7), "input_ids": torch.ones(5, 7)}) == 5
    )
    assert default_batch_size((torch.tensor(3.0), torch.ones(4, 2))) == 4
    with pytest.raises(TypeError, match="pass batch_size_fn=lambda batch"):
        default_batch_size("text")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"dataloader": 3}, TypeError, "dataloader must be an iterable of batches"),
        ({"dataloader": torch.ones(3)}, TypeError, r"wrap one batch in a list: \[batch\]"),
        ({"dataloader": []}, ValueError, "yielded no batches"),
        ({"num_batches": 0}, ValueError, "num_batches must be a positive int"),
        ({"microbatch_size": 0}, ValueError, "microbatch_size must be a positive int"),
        ({"batch_size_fn": lambda b: 2.5}, TypeError, "batch_size_fn must return an int"),
        ({"batch_size_fn": lambda b: -1}, ValueError, "sample counts must be >= 0"),
        ({"dataloader": iter([(torch.ones(2),)]), "cache": False}, ValueError, "must be cached"),
    ],
)
def test_bad_arguments_say_what_to_do(kwargs, exc, match):
    kwargs = {"dataloader": [_xy(4)], **kwargs}
    with pytest.raises(exc, match=match):
        WeightedBatches(**kwargs)


def test_microbatches_of_batches_without_tensors_are_refused():
    wb = WeightedBatches([["a", "b"]], batch_size_fn=lambda b: 2, microbatch_size=1)
    with pytest.raises(TypeError, match="microbatch_size needs batches holding tensors"):
        list(wb)
