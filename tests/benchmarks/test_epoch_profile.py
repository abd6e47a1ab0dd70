"""The epoch profile's clock: every phase is counted once, and the KD phases only for KD methods."""

from __future__ import annotations

import pytest
import torch

from benchmarks.epoch_profile import PHASES, profile_method
from rcekd.data import Dataset
from rcekd.kd import Teacher
from rcekd.models import MF


@pytest.mark.parametrize("variant", ["none", "rcekd:K=4,L=4,mxK=10"])
def test_phases_add_up_to_the_epoch(tiny_dataset: Dataset, variant: str) -> None:
    torch.manual_seed(0)
    teacher = Teacher(MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8))
    epochs = profile_method(variant, tiny_dataset, teacher, "unused", epochs=3, seed=0)
    assert len(epochs) == 2  # the first epoch is left out
    for epoch in epochs:
        assert all(epoch[phase] >= 0 for phase in PHASES)
        assert sum(epoch[phase] for phase in PHASES) == pytest.approx(epoch["total"])
        assert epoch["student loss"] > 0 and epoch["optimizer step"] > 0
        kd = variant != "none"
        assert (epoch["KD term"] > 0) == kd and (epoch["student ranking"] > 0) == kd
