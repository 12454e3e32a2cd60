"""Optimizer state checkpointing on real gloo groups, compared exactly with a single-process reference."""

from __future__ import annotations

import pytest
import torch.distributed.checkpoint as dcp

from tests import optim_rank_fns as f


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd", "rmsprop", "adagrad"])
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


@pytest.mark.parametrize("use_layout", [False, True])
def test_interop_with_stock_get_optimizer_state_dict(ranks, tmp_path, use_layout):
    # FSDP2 (fully_shard on a CPU mesh over gloo) optimizer state saved through torch's
    # get_optimizer_state_dict, next to ours, in one checkpoint (stock or Reshard planners)
    how = ranks(2).run(f.interop_stock, str(tmp_path / "ck"), True, use_layout)
    assert how == ["fsdp2", "fsdp2"]


# ---------------------------------------------------------------- single-process behaviour and errors
import copy  # noqa: E402

import torch  # noqa: E402

from dcp_ext.optim import OptimizerStateError, optimizer_state  # noqa: E402


def _trained(kind="adam", steps=2):
    m = f.Net(n_layers=1)
    o = f.make_opt(kind, list(m.named_parameters()))
    for s in range(steps):
        f.ref_step(m, o, s)
        o.step()
    return m, o


def test_state_dict_is_fqn_keyed():
    m, o = _trained()
    sd = optimizer_state(m, o).state_dict()
    assert set(sd["state"]) == {n for n, _ in m.named_parameters()}
    assert set(sd["state"]["layers.0.fc1.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"]["layers.0.fc1.weight"]["exp_avg"] is o.state[m.layers[0].fc1.weight]["exp_avg"]
    assert [g["lr"] for g in sd["param_groups"]] == [0.01, 0.02]
    assert sd["param_groups"][1]["params"] == [n for n, _ in m.named_parameters() if f.group_of(n) == 1]


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd", "rmsprop", "adagrad"])
def test_lazy_init_is_equivalent_to_fresh(kind):
    # state_dict() on a never-stepped optimizer initialises state; training must be unaffected
    m1, m2 = f.Net(n_layers=1), f.Net(n_layers=1)
    o1, o2 = f.make_opt(kind, list(m1.named_parameters())), f.make_opt(kind, list(m2.named_parameters()))
    sd = optimizer_state(m2, o2).state_dict()
    assert all(sd["state"][n] for n, _ in m2.named_parameters())
    for s in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            f.ref_step(m, o, s)
            o.step()
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n


def test_load_state_dict_round_trip_and_errors():
    m, o = _trained()
    sd = copy.deepcopy(optimizer_state(m, o).state_dict())
    m2 = copy.deepcopy(m)
    o2 = f.make_opt("adam", list(m2.named_parameters()))
    optimizer_state(m2, o2).load_state_dict(sd)
    for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        for k in o.state[p]:
            assert torch.equal(o.state[p][k], o2.state[p2][k]), (n, k)

    bad = copy.deepcopy(sd)
    bad["state"]["layers.0.fc1.weight"]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(OptimizerStateError, match=r"optimizer state 'layers.0.fc1.weight'.'exp_avg': saved shape "
                                                  r"\(3, 3\) does not match the optimizer's \(16, 8\)"):
        optimizer_state(m2, o2).load_state_dict(bad)

    bad = copy.deepcopy(sd)
    bad["param_groups"] = bad["param_groups"][:1]
    with pytest.raises(OptimizerStateError, match="checkpoint has 1 optimizer param groups, the optimizer has 2"):
        optimizer_state(m2, o2).load_state_dict(bad)

    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"].append("head.bias")
    bad["param_groups"][1]["params"].remove("head.bias")
    with pytest.raises(OptimizerStateError, match="parameter 'head.bias' is in param group 1 of the optimizer "
                                                  "but in group 0 of the checkpoint"):
        optimizer_state(m2, o2).load_state_dict(bad)

    bad = copy.deepcopy(sd)
    del bad["state"]["emb.weight"]
    with pytest.raises(OptimizerStateError, match="optimizer state for parameter 'emb.weight' is missing"):
        optimizer_state(m2, o2).load_state_dict(bad)

    with pytest.raises(OptimizerStateError, match="state dict has no 'param_groups'"):
        optimizer_state(m2, o2).load_state_dict({"state": {}})


# ---------------------------------------------------------------- layouts (TP / PP / DP) via the Reshard planners
layout = pytest.importorskip("dcp_ext.layout")

SAVE_LOAD = [
    ((2, 1, 1), (1, 2, 1)),  # TP 2 -> PP 2
    ((1, 2, 2), (2, 1, 2)),  # PP 2 x DP 2 -> TP 2 x DP 2
    ((2, 2, 1), (4, 1, 1)),  # TP 2 x PP 2 -> TP 4 (fused fc1 segments re-split)
    ((1, 3, 1), (1, 1, 1)),  # uneven PP 3 (2+1+1 layers) -> one process
]


@pytest.mark.parametrize("save,load", SAVE_LOAD)
def test_plain_adam_reshard(ranks, tmp_path, save, load):
    ck = str(tmp_path / "ck")
    ranks(save[0] * save[1] * save[2]).run(f.save_plain, ck, save, "adam", 3, True)
    out = ranks(load[0] * load[1] * load[2]).run(f.load_plain, ck, load, "adam", 3, True)
    assert all(n > 0 for n in out)


def test_plain_resume_bit_identical_tp_pp(ranks, tmp_path):
    out = ranks(4).run(f.resume_same, str(tmp_path / "ck"), (2, 2, 1), "adam", 2, 2, True)
    assert all(n > 0 for n in out)


def test_zero_dp_1_2_3_4_with_padding(ranks, tmp_path):
    """(c) One state hops DP 1 -> 2 -> 3 -> 4 -> 1, each hop with another alignment padding and
    bucket size: every load is compared exactly with the single-process reference (padding left
    untouched, every parameter element filled) and the *loaded* state is what the next hop saves."""
    steps = 2
    hops = [(1, 4, 150), (2, 8, 100), (3, 1, None), (4, 16, 64), (1, 4, 150)]
    dp, alignment, bucket = hops[0]
    prev = str(tmp_path / "hop0")
    ranks(dp).run(f.zero_save, prev, (1, 1, dp), steps, alignment, bucket)
    for i, (dp, alignment, bucket) in enumerate(hops[1:], 1):
        nxt = str(tmp_path / f"hop{i}")
        out = ranks(dp).run(f.zero_load, prev, (1, 1, dp), steps, alignment, bucket, "zero", nxt)
        assert out == [3] * dp  # master, exp_avg, exp_avg_sq slices checked on every rank
        prev = nxt


def test_zero_bf16_model_fp32_master(ranks, tmp_path):
    """A bf16 model with fp32 master weights and moments in the flat buffers: saved at TP 2 x DP 2,
    loaded at DP 3; the checkpoint keeps the dtypes (bf16 weights, fp32 master/exp_avg)."""
    ck = str(tmp_path / "ck")
    ranks(4).run(f.zero_save, ck, (2, 1, 2), 2, 4, 100, "bfloat16")
    md = dcp.FileSystemReader(ck).read_metadata().state_dict_metadata
    dtypes: dict[str, set] = {}
    for k, v in md.items():
        if k.startswith(("optim.state.", "model.")) and hasattr(v, "properties"):
            dtypes.setdefault(k.rsplit(".", 1)[-1] if k.startswith("optim.") else "model", set()).add(v.properties.dtype)
    assert dtypes == {"model": {torch.bfloat16}, "master": {torch.float32}, "exp_avg": {torch.float32},
                      "exp_avg_sq": {torch.float32}, "step": {torch.float32}}
    out = ranks(3).run(f.zero_load, ck, (1, 1, 3), 2, 8, None, "zero", None, "bfloat16")
    assert out == [3] * 3


def test_zero_reshard_tp_pp_and_into_plain_adam(ranks, tmp_path):
    ck = str(tmp_path / "ck")
    ranks(4).run(f.zero_save, ck, (2, 1, 2), 3, 2, 64)
    assert all(n == 3 for n in ranks(4).run(f.zero_load, ck, (1, 2, 2), 3, 8, None, "zero"))
    assert all(n > 0 for n in ranks(2).run(f.zero_load, ck, (2, 1, 1), 3, 1, None, "adam"))


def test_example_resume_different_layout(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "resume_different_layout.py"),
                        str(tmp_path / "ex")], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bit for bit: OK" in r.stdout
    assert "uninterrupted 5-step run at TP=1 (up to TP=2's rounding): OK" in r.stdout


def test_dropped_pieces_are_an_error():
    # stock DefaultLoadPlanner.set_up_planner replaces objects it does not know (GlobalPieces) by None
    m, o = _trained()
    st = optimizer_state(m, o, layout.ParallelLayout())
    sd = st.state_dict()
    assert isinstance(sd["state"]["emb.weight"]["exp_avg"], layout.GlobalPieces)
    sd["state"]["emb.weight"]["exp_avg"] = None
    with pytest.raises(OptimizerStateError, match=r"optimizer state 'emb.weight'.'exp_avg' came back as None.*"
                                                  r"dcp_ext.ReshardLoadPlanner"):
        st.load_state_dict(sd)


def test_zero_resume_bit_identical_tp_dp(ranks, tmp_path):
    out = ranks(4).run(f.zero_resume_same, str(tmp_path / "ck"), (2, 1, 2), 2, 2)
    assert all(n > 0 for n in out)


def test_optimizer_state_of_fsdp2_model(ranks, tmp_path):
    out = ranks(2).run(f.fsdp2_ours, str(tmp_path / "ck"))
    assert out[0] > 0 and out[0] == out[1]
