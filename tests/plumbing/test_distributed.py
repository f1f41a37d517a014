"""plumbing/distributed.py: one process is rank 0 of 1; each rank's share of the columns."""
import torch

from plumbing import distributed


def test_one_process_is_rank_0_of_1_and_changes_nothing():
    world = distributed.World()
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    model = torch.nn.Linear(2, 2)
    hidden = (torch.randn(2, 8, 3), torch.randn(2, 8, 3))
    assert world.wrap(model) is model and world.columns(8) == slice(0, 8)
    assert world.gather_columns(hidden) is hidden and world.my_columns(hidden, 8) is hidden
    assert world.any(True) is True and world.from_main(2.5) == 2.5 and world.gather('x') == ['x']


def test_each_rank_takes_its_share_of_the_columns(monkeypatch):
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '4')
    world = distributed.World()
    assert world.columns(8) == slice(2, 4) and not world.is_main
    hidden = torch.arange(2 * 8 * 3).reshape(2, 8, 3)
    assert torch.equal(world.my_columns(hidden, 8), hidden[:, 2:4])
