"""Small shared helpers of rlmt_edu.utils."""

import pytest
import torch

from rlmt_edu.utils import epoch_batches


def test_epoch_batches_cover_each_epoch_once_and_skip_the_incomplete_tail():
    batches = epoch_batches(10, 4, torch.Generator().manual_seed(0))
    epoch_1 = [next(batches) for _ in range(2)]  # 8 of 10 rows; the last 2 would make an incomplete batch
    epoch_2 = [next(batches) for _ in range(2)]
    for epoch in (epoch_1, epoch_2):
        rows = torch.cat(epoch)
        assert all(len(b) == 4 for b in epoch)
        assert len(set(rows.tolist())) == 8 and rows.max() < 10  # no row twice within an epoch
    assert torch.cat(epoch_1).tolist() != torch.cat(epoch_2).tolist()  # reshuffled


def test_epoch_batches_draw_the_same_numbers_as_shuffling_inline():
    """The first permutation is drawn at the call: the generator's stream is used as by an inline loop."""
    inline_generator, helper_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    order, cursor, inline = torch.randperm(7, generator=inline_generator), 0, []
    batches = epoch_batches(7, 3, helper_generator)
    for _ in range(5):
        if cursor + 3 > 7:
            order, cursor = torch.randperm(7, generator=inline_generator), 0
        inline.append(order[cursor : cursor + 3].tolist())
        cursor += 3
    assert [next(batches).tolist() for _ in range(5)] == inline


@pytest.mark.parametrize("n, batch_size, named", [(0, 4, "n=0"), (5, 0, "batch_size=0")])
def test_epoch_batches_reject_empty_sizes(n, batch_size, named):
    with pytest.raises(ValueError, match=named):
        epoch_batches(n, batch_size, torch.Generator())
