"""Async tiered checkpoints to S3 through the manager: safe in local memory at once, durable later.

``cache=`` makes every save tiered: inside the (async) save each rank commits to a fast local tier
(here a directory; in production ``/dev/shm`` or local NVMe) and training goes on; a background
worker then copies the checkpoint to the durable root on S3 and commits it there. ``mgr.wait()``
waits until the durable copies are committed. Afterwards the newest step is loaded back into a
fresh model and compared bit for bit.

Credentials and endpoint follow the AWS conventions (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL`` for MinIO and other S3-compatible stores)::

    AWS_ENDPOINT_URL=http://127.0.0.1:9000 python examples/async_tiered_s3.py \\
        --root s3://bucket/run1 --cache /dev/shm/dcp_ext
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dcp_ext  # noqa: E402
from tiny_training import build, launch, say, train_step  # noqa: E402


def run(args: argparse.Namespace) -> None:
    model, opt, app = build()
    state = {"app": app}
    mgr = dcp_ext.CheckpointManager(args.root, cache=args.cache, interval=args.interval, keep_last=2,
                                    async_save=True)
    for step in range(1, args.steps + 1):
        loss = train_step(model, opt, step)
        if mgr.save(step, state, metrics={"loss": loss}):
            say(f"step {step} loss {loss!r}: saved to the fast tier, persisting to {mgr.step_url(step)}")
    mgr.wait()  # every durable copy is committed
    steps = mgr.all_steps()
    say(f"durable checkpoints: {steps}")
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model2, opt2, app2 = build()
    loaded = mgr.load({"app": app2})
    exact = all(torch.equal(trained[k], v) for k, v in model2.state_dict().items())
    flags = torch.tensor([int(exact)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    say(f"loaded step {loaded}: {'every tensor matches' if flags.item() else 'MISMATCH'}")
    mgr.close()
    if not flags.item():
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="durable checkpoint root, e.g. s3://bucket/run1")
    ap.add_argument("--cache", required=True, help="fast-tier directory on each node")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2, help="local ranks (ignored under torchrun)")
    args = ap.parse_args(argv)
    return launch(run, args.nproc, args)


if __name__ == "__main__":
    sys.exit(main())
