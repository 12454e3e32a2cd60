"""Train, get killed, restart, and continue on exactly the same loss curve.

Two gloo ranks train a small model data-parallel with AdamW and checkpoint every ``--interval``
steps through ``dcp_ext.CheckpointManager`` (async saves: training blocks only for a host copy;
the newest 3 complete checkpoints are kept). Start it again after any crash, even ``kill -9``
in the middle of a save: ``mgr.load`` picks the newest *complete* checkpoint (a save that did not
finish is never loaded, and its leftovers are removed), and the run continues from there. Data
depends on the step only, so the resumed run's losses equal an uninterrupted run's, bit for bit.

    python examples/train_and_resume.py --dir /tmp/run --steps 12     # kill it, run it again
    torchrun --nproc-per-node 2 examples/train_and_resume.py --dir /tmp/run
"""

from __future__ import annotations

import argparse  # noqa: F401 - argparse.Namespace in annotations
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dcp_ext  # noqa: E402
from tiny_training import build, example_parser, launch, say, train_step  # noqa: E402


def run(args: argparse.Namespace) -> None:
    model, opt, app = build()
    state = {"app": app}
    mgr = dcp_ext.CheckpointManager(args.dir, interval=args.interval, keep_last=3, async_save=True)
    start = mgr.load(state)  # None on a fresh run
    say("fresh start" if start is None else f"resumed from step {start}")
    for step in range((start or 0) + 1, args.steps + 1):
        loss = train_step(model, opt, step)
        say(f"step {step} loss {loss!r}")
        mgr.save(step, state, metrics={"loss": loss})
        time.sleep(args.sleep)
    mgr.wait()  # the last upload
    steps = mgr.all_steps()
    mgr.close()
    say(f"done; complete checkpoints: {steps}")


def main(argv: list[str] | None = None) -> int:
    args = example_parser(__doc__, steps=12, interval=2, sleep=0.0).parse_args(argv)
    return launch(run, args.nproc, args)


if __name__ == "__main__":
    sys.exit(main())
