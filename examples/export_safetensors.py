"""Export a trained model to safetensors and load it with ``safetensors.torch.load_file``.

Trains a few steps, checkpoints with ``dcp_ext.CheckpointManager``, then exports the newest
checkpoint's model weights (not the optimizer) to safetensors twice: in full precision and in
bfloat16. The export streams one tensor at a time from any backend; the same as the CLI::

    dcp-ext convert ROOT/step_3 OUT_DIR --keys 'app.model.*' --strip-prefix app.model. [--dtype bf16]

Needs the ``safetensors`` package for the final check (``pip install 'dcp-ext[hf]'``)::

    python examples/export_safetensors.py --dir /tmp/export_demo
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import dcp_ext  # noqa: E402
from tiny_training import build, launch, say, train_step  # noqa: E402


def run(args: argparse.Namespace) -> None:
    model, opt, app = build()
    with dcp_ext.CheckpointManager(os.path.join(args.dir, "ckpt")) as mgr:
        for step in range(1, 4):
            train_step(model, opt, step)
            mgr.save(step, {"app": app})
        latest = mgr.step_url(mgr.latest_step())
    if torch.distributed.get_rank() != 0:
        return
    from safetensors.torch import load_file

    full = os.path.join(args.dir, "model.safetensors")
    half = os.path.join(args.dir, "model-bf16.safetensors")
    for out, dtype in ((full, None), (half, "bf16")):
        rep = dcp_ext.export_checkpoint(latest, out, keys=["app.model.*"], strip_prefix="app.model.", dtype=dtype,
                                        overwrite=True)
        say(f"exported {rep.tensors} tensors ({rep.bytes} bytes) to {out}")
    want = model.state_dict()
    got, got16 = load_file(full), load_file(half)
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for k, v in want.items():
        assert torch.equal(got[k], v) and torch.equal(got16[k], v.to(torch.bfloat16)), k
    say(f"safetensors.torch.load_file: {len(got)} tensors match the trained model (fp32 exactly, bf16 as cast)")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--nproc", type=int, default=1, help="local ranks (ignored under torchrun)")
    args = ap.parse_args(argv)
    return launch(run, args.nproc, args)


if __name__ == "__main__":
    sys.exit(main())
