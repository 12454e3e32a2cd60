"""A tiny Megatron-style GPT for resharding tests: plain local tensors at any TP x PP x DP layout.

* vocab-parallel embedding (ShardSpec(0)), column-parallel fused QKV with grouped-query attention
  (ShardSpec(0, (nh*hd, nkv*hd, nkv*hd)), weight and bias), row-parallel output projection
  (ShardSpec(1)), column-parallel fused SwiGLU gate/up (ShardSpec(0, (ffn, ffn))), row-parallel
  down projection (ShardSpec(1)), replicated RMSNorm weights, column-parallel LM head.
* Layers are split over PP stages (even: ``layer_offset``; uneven: explicit ``stage_layers``).
* Parameters come from a seed (:func:`full_params`), so one process holds the reference; the
  vocabulary is padded with zero rows (``true_vocab`` real tokens of ``vocab`` rows).
* :func:`local_params` cuts a rank's shards with the independent split functions of
  ``tests/reference.py`` (never with ``dcp_ext.layout``, the code under test).
* :func:`forward` is written once against local shards plus two collectives (TP all-reduce and
  TP all-gather); :func:`reference_forward` runs it with TP=PP=1 and identity collectives,
  :func:`distributed_forward` runs it on a gloo group (all ranks in lock-step over the stages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dcp_ext.layout import ParallelLayout, ShardSpec

from tests import reference as ref


@dataclass(frozen=True)
class Cfg:
    vocab: int = 64  # rows of the (padded) embedding and LM head
    hidden: int = 16
    n_heads: int = 8
    n_kv: int = 4
    head_dim: int = 2
    ffn: int = 32
    n_layers: int = 4
    true_vocab: int | None = None  # real tokens (None: no padding); rows beyond are zero


CFG = Cfg(true_vocab=61)


def rules(cfg: Cfg = CFG) -> dict[str, ShardSpec]:
    qkv = (cfg.n_heads * cfg.head_dim, cfg.n_kv * cfg.head_dim, cfg.n_kv * cfg.head_dim)
    return {
        "*embed.weight": ShardSpec(0),
        "*.attn.qkv.weight": ShardSpec(0, qkv),
        "*.attn.qkv.bias": ShardSpec(0, qkv),
        "*.attn.proj.weight": ShardSpec(1),
        "*.mlp.gate_up.weight": ShardSpec(0, (cfg.ffn, cfg.ffn)),
        "*.mlp.down.weight": ShardSpec(1),
        "*output.weight": ShardSpec(0),
    }


def full_params(seed: int = 0, cfg: Cfg = CFG) -> dict[str, torch.Tensor]:
    """The global (unsharded) parameters, deterministic from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    H, hd = cfg.hidden, cfg.head_dim
    qkv_rows = (cfg.n_heads + 2 * cfg.n_kv) * hd
    tokens = cfg.true_vocab or cfg.vocab
    assert ref.padded_vocab(tokens, 4) == cfg.vocab, "vocab must be true_vocab padded to a multiple of 4"
    p = {"embed.weight": ref.pad_vocab(r(tokens, H), cfg.vocab)}
    for i in range(cfg.n_layers):
        p[f"layers.{i}.attn_norm.weight"] = 1 + r(H)
        p[f"layers.{i}.attn.qkv.weight"] = r(qkv_rows, H)
        p[f"layers.{i}.attn.qkv.bias"] = r(qkv_rows)
        p[f"layers.{i}.attn.proj.weight"] = r(H, cfg.n_heads * hd)
        p[f"layers.{i}.mlp_norm.weight"] = 1 + r(H)
        p[f"layers.{i}.mlp.gate_up.weight"] = r(2 * cfg.ffn, H)
        p[f"layers.{i}.mlp.down.weight"] = r(H, cfg.ffn)
    p["final_norm.weight"] = 1 + r(H)
    p["output.weight"] = ref.pad_vocab(r(tokens, H), cfg.vocab)
    return p


@dataclass(frozen=True)
class Topo:
    """A TP x PP x DP layout of the whole job; ``stages`` optionally lists each stage's layers."""

    tp: int
    pp: int
    dp: int
    stages: tuple[tuple[int, ...], ...] | None = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        s = f"{self.tp}x{self.pp}x{self.dp}"
        return s + ("-uneven" if self.stages else "")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp, pp, dp) of ``rank``: TP fastest, then DP, then PP (Megatron order)."""
        return rank % self.tp, rank // (self.tp * self.dp), (rank // self.tp) % self.dp

    def rank_of(self, tp: int, pp: int, dp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def stage_layers(self, pp_rank: int, cfg: Cfg = CFG) -> tuple[int, ...]:
        if self.stages is not None:
            return self.stages[pp_rank]
        per = cfg.n_layers // self.pp
        return tuple(range(pp_rank * per, (pp_rank + 1) * per))

    def layout(self, rank: int, cfg: Cfg = CFG) -> ParallelLayout:
        tp, pp, dp = self.coords(rank)
        common = dict(tp_rank=tp, tp_size=self.tp, pp_rank=pp, pp_size=self.pp, dp_rank=dp, dp_size=self.dp,
                      rules=rules(cfg))
        if self.stages is not None:
            return ParallelLayout(**common, stage_layers=self.stages[pp])
        return ParallelLayout(**common, layer_offset=self.stage_layers(pp, cfg)[0])


def shard_param(gfqn: str, t: torch.Tensor, tp: int, tp_rank: int, cfg: Cfg = CFG) -> torch.Tensor:
    """TP rank ``tp_rank``'s local tensor of the global parameter ``gfqn`` (reference splits)."""
    if gfqn in ("embed.weight", "output.weight"):  # vocab-parallel embedding and LM head
        return ref.vocab_parallel(t, tp, tp_rank)
    if gfqn.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return ref.fused_qkv(t, cfg.n_heads, cfg.n_kv, cfg.head_dim, tp, tp_rank)
    if gfqn.endswith(("attn.proj.weight", "mlp.down.weight")):
        return ref.row_parallel(t, tp, tp_rank)
    if gfqn.endswith("mlp.gate_up.weight"):
        return ref.gate_up(t, cfg.ffn, tp, tp_rank)
    return t.clone()  # norms: replicated


def local_params(topo: Topo, rank: int, full: dict[str, torch.Tensor], cfg: Cfg = CFG) -> dict[str, torch.Tensor]:
    """The plain local parameters (local FQNs) a rank holds at ``topo``, cut from ``full`` by the
    independent reference (tests/reference.py)."""
    tp, pp, _ = topo.coords(rank)
    layers = topo.stage_layers(pp, cfg)
    out = {}
    for g, t in full.items():
        if g == "embed.weight" and pp != 0:
            continue
        if g in ("final_norm.weight", "output.weight") and pp != topo.pp - 1:
            continue
        local = ref.stage_local_name(g, layers)
        if local is None:
            continue
        out[local] = shard_param(g, t, topo.tp, tp, cfg)
    return out


def empty_like_local(topo: Topo, rank: int, cfg: Cfg = CFG) -> dict[str, torch.Tensor]:
    """Same keys and shapes as :func:`local_params`, filled with NaN (a load must overwrite all)."""
    return {k: torch.full_like(v, float("nan")) for k, v in local_params(topo, rank, full_params(0, cfg), cfg).items()}


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def embed(p: dict[str, torch.Tensor], ids: torch.Tensor, tp_rank: int, reduce: Callable) -> torch.Tensor:
    w = p["embed.weight"]
    lo = tp_rank * w.shape[0]
    mask = (ids >= lo) & (ids < lo + w.shape[0])
    x = w[(ids - lo).clamp(0, w.shape[0] - 1)] * mask.unsqueeze(-1)
    return reduce(x)


def layer(p: dict[str, torch.Tensor], i: int, x: torch.Tensor, tp: int, reduce: Callable, cfg: Cfg = CFG) -> torch.Tensor:
    pre = f"layers.{i}."
    hd, nh, nkv = cfg.head_dim, cfg.n_heads // tp, cfg.n_kv // tp
    h = _rms(x, p[pre + "attn_norm.weight"])
    qkv = h @ p[pre + "attn.qkv.weight"].T + p[pre + "attn.qkv.bias"]
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
    S = x.shape[0]
    q = q.view(S, nh, hd).transpose(0, 1)
    k = k.view(S, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
    v = v.view(S, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(S, nh * hd)
    x = x + reduce(att @ p[pre + "attn.proj.weight"].T)
    h = _rms(x, p[pre + "mlp_norm.weight"])
    gate, up = (h @ p[pre + "mlp.gate_up.weight"].T).chunk(2, dim=-1)
    return x + reduce((F.silu(gate) * up) @ p[pre + "mlp.down.weight"].T)


def head(p: dict[str, torch.Tensor], x: torch.Tensor, gather: Callable) -> torch.Tensor:
    return gather(_rms(x, p["final_norm.weight"]) @ p["output.weight"].T)


def reference_forward(full: dict[str, torch.Tensor], ids: torch.Tensor, cfg: Cfg = CFG) -> torch.Tensor:
    ident = lambda t: t  # noqa: E731
    x = embed(full, ids, 0, ident)
    for i in range(cfg.n_layers):
        x = layer(full, i, x, 1, ident, cfg)
    return head(full, x, ident)


def distributed_forward(topo: Topo, local: dict[str, torch.Tensor], ids: torch.Tensor,
                        cfg: Cfg = CFG) -> torch.Tensor | None:
    """Run the model on a gloo group in lock-step (every rank joins every world collective).

    Returns the logits on the last stage's ranks, ``None`` elsewhere.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    tp_rank, pp_rank, dp_rank = topo.coords(rank)
    peers = [topo.rank_of(t, pp_rank, dp_rank) for t in range(topo.tp)]

    def gather_all(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(topo.world)]
        dist.all_gather(out, t.contiguous())
        return out

    def reduce(t: torch.Tensor) -> torch.Tensor:
        parts = gather_all(t)
        acc = parts[peers[0]].clone()
        for r in peers[1:]:
            acc += parts[r]
        return acc

    def gather_cols(t: torch.Tensor) -> torch.Tensor:
        parts = gather_all(t)
        return torch.cat([parts[r] for r in peers], dim=-1)

    zeros = torch.zeros(ids.shape[0], cfg.hidden)
    x = embed(local, ids, tp_rank, reduce) if pp_rank == 0 else reduce(zeros)
    for s in range(topo.pp):
        if s > 0:  # hand the hidden state from stage s-1 to stage s (same tp/dp coordinates)
            parts = gather_all(x)
            x = parts[topo.rank_of(tp_rank, s - 1, dp_rank)]
        for j, g in enumerate(topo.stage_layers(s, cfg)):
            if s == pp_rank:
                x = layer(local, j, x, topo.tp, reduce, cfg)
            else:  # idle stage: join the same collectives with dummy data
                reduce(zeros)
                reduce(zeros)
    local_logits_shape = (ids.shape[0], cfg.vocab // topo.tp)
    if pp_rank == topo.pp - 1:
        return head(local, x, gather_cols)
    gather_cols(torch.zeros(local_logits_shape))
    return None
