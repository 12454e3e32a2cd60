"""Optimizer state checkpointing on real gloo groups, compared exactly with a single-process reference."""

from __future__ import annotations

import pytest

from tests import optim_rank_fns as f


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_plain_dp_change(ranks, tmp_path, kind):
    # saved at DP 2, loaded at DP 4 and DP 1 into fresh, never-stepped optimizers
    ck = str(tmp_path / "ck")
    ranks(2).run(f.save_plain, ck, (1, 1, 2), kind, 3, False)
    n4 = ranks(4).run(f.load_plain, ck, (1, 1, 4), kind, 3, False)
    assert all(n > 0 for n in n4)
    n1 = ranks(1).run(f.load_plain, ck, (1, 1, 1), kind, 3, False)
    assert n1 == n4[:1]


def test_plain_resume_bit_identical(ranks, tmp_path):
    out = ranks(2).run(f.resume_same, str(tmp_path / "ck"), (1, 1, 2), "adamw", 3, 3, False)
    assert out[0] > 0


def test_optimizer_param_not_in_model(ranks):
    msg = ranks(1).run(f.bad_optimizer_param)[0]
    assert "OptimizerStateError" in msg
    assert "optimizer param_groups[0]['params'][" in msg and "(shape (2, 2)) is not a parameter of the model Net" in msg
