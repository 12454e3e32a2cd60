"""Preemption: checkpoint on SIGTERM (or SIGUSR1), on every rank at the same step, then exit.

Schedulers announce preemption with a signal and kill the job a little later. With
``save_on_signal=("SIGTERM", "SIGUSR1")`` the manager notes the signal; the next
``mgr.maybe_save(step, state)`` (called every step) learns through a collective whether *any* rank
was signalled, so every rank checkpoints the same step even if only one got the signal; it waits
until the checkpoint is committed and exits with code 128 + the signal (143 for SIGTERM). Run it
again and it resumes from that step. The regular interval here is long (``--interval 1000``): the
preemption checkpoint is the only one.

    python examples/preemption.py --dir /tmp/run --steps 500 &   # then: kill -TERM <a rank's pid>
    python examples/preemption.py --dir /tmp/run --steps 500     # resumes where it was preempted
"""

from __future__ import annotations

import argparse  # noqa: F401 - argparse.Namespace in annotations
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402

import dcp_ext  # noqa: E402
from tiny_training import build, example_parser, launch, say, train_step  # noqa: E402


def run(args: argparse.Namespace) -> None:
    model, opt, app = build()
    state = {"app": app}
    mgr = dcp_ext.CheckpointManager(args.dir, interval=args.interval, async_save=True,
                                    save_on_signal=("SIGTERM", "SIGUSR1"))
    # one write of the whole line: every rank shares this stdout, and print() writes the text and
    # its newline separately, so two ranks' lines could interleave ("rank 0 pid 1rank 1 pid 2")
    sys.stdout.write(f"rank {dist.get_rank()} pid {os.getpid()}\n")
    sys.stdout.flush()
    start = mgr.load(state)
    say("fresh start" if start is None else f"resumed from step {start}")
    for step in range((start or 0) + 1, args.steps + 1):
        loss = train_step(model, opt, step)
        say(f"step {step} loss {loss!r}")
        try:
            mgr.maybe_save(step, state, metrics={"loss": loss})
        except SystemExit as e:
            say(f"preempted: checkpoint of step {step} committed; exiting with {e.code}")
            raise
        time.sleep(args.sleep)
    mgr.close()
    say("done")


def main(argv: list[str] | None = None) -> int:
    args = example_parser(__doc__, steps=500, interval=1000, sleep=0.05).parse_args(argv)
    return launch(run, args.nproc, args)


if __name__ == "__main__":
    sys.exit(main())
