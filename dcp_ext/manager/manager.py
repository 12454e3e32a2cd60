"""``CheckpointManager``: step directories, interval, retention, resume and preemption on DCP.

One manager per training run, created on every rank (it forms its own gloo process groups, a
collective). Saves go through stock ``dcp.save`` / ``dcp.async_save`` with the writer and reader
that :func:`dcp_ext.storage_writer` / :func:`dcp_ext.storage_reader` build for the URL and
options (so any backend, tiered with ``cache=``); the manager only decides *when* and *where*,
and keeps the root tidy. Rank 0 does the root's bookkeeping (records, ``latest``, deletions);
every decision the ranks must share goes through a collective on the manager's own group, never
on the training job's default group and never on the group an async upload uses.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import os
import pickle
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from ..config import Config, ManagerOptions, load_config
from ..errors import ConfigError, DcpExtError, IncompleteCheckpointError
from ..storage import storage_reader, storage_writer
from ..torch_compat import destroy_process_groups
from .bookkeeping import RootBookkeeper
from .retention import RetentionPolicy
from .root import CheckpointRoot, StepInfo, jsonable_metrics
from .signals import SignalWatcher, signal_number

__all__ = ["CheckpointManager"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Pending:
    """One save of this manager that is not finished yet (uploading, or persisting)."""

    step: int
    name: str
    info: StepInfo
    writer: Any
    t0: float
    upload: Any = None  # the async upload future (None for sync saves)
    done: threading.Event = field(default_factory=threading.Event)
    upload_error: BaseException | None = None
    durable_error: BaseException | None = None


def _dist_state() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _portable(err: BaseException | None) -> BaseException | None:
    """``err`` if it pickles (to broadcast it), else a DcpExtError with its text."""
    if err is None:
        return None
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001
        return DcpExtError(f"rank 0: {type(err).__name__}: {err}")


class CheckpointManager:
    """Save, keep and resume checkpoints of one training run under ``root`` (any dcp-ext URL).

    >>> mgr = dcp_ext.CheckpointManager("s3://bucket/run1", interval=100, keep_last=3,
    ...                                 async_save=True, save_on_signal=("SIGTERM",))
    >>> start = mgr.load(state)            # newest complete step, or None for a fresh run
    >>> for step in range(0 if start is None else start + 1, steps):
    ...     train_step()
    ...     mgr.save(step, state, metrics={"loss": loss})
    >>> mgr.close()

    Keyword options (each also from the ``[manager]`` config section or ``DCP_EXT_MANAGER_*``):
    ``interval``, ``keep_last``, ``keep_every``, ``keep_best`` + ``best_metric`` + ``best_mode``,
    ``async_save``, ``exclude``, ``save_on_signal``, ``exit_on_signal``; ``cache=DIR`` makes every
    save tiered; any other keyword (``io_threads=``, ``s3={...}``, ...) and ``config=`` go to
    the storage writers/readers. ``process_group`` (default: a gloo group the manager creates)
    is the group DCP saves and loads on; ``stager`` a :class:`~dcp_ext.PooledStager` for async
    saves (default: one the manager creates and closes). See ``docs/manager.md``.
    """

    def __init__(self, root: str | os.PathLike, *, interval: int | None = None, keep_last: int | None = None,
                 keep_every: int | None = None, keep_best: int | None = None, best_metric: str | None = None,
                 best_mode: str | None = None, async_save: bool | None = None, exclude: Any = None,
                 save_on_signal: Any = None, exit_on_signal: bool | None = None, cache: str | os.PathLike | None = None,
                 process_group: Any = None, stager: Any = None, config: Any = None, **options: Any):
        explicit = {k: v for k, v in dict(
            interval=interval, keep_last=keep_last, keep_every=keep_every, keep_best=keep_best,
            best_metric=best_metric, best_mode=best_mode, async_save=async_save, exit_on_signal=exit_on_signal,
            exclude=None if exclude is None else ([exclude] if isinstance(exclude, str) else list(exclude)),
            save_on_signal=None if save_on_signal is None else [
                signal_number(s).name for s in ([save_on_signal] if isinstance(save_on_signal, (str, int))
                                                else save_on_signal)],
        ).items() if v is not None}
        for k in [k for k in options if k in ManagerOptions.__dataclass_fields__]:  # cleanup=, step_prefix=, ...
            explicit[k] = options.pop(k)
        if cache is not None:
            options["tier"] = {**dict(options.get("tier") or {}), "cache": os.fspath(cache)}
        options["manager"] = {**dict(options.get("manager") or {}), **explicit}
        self.config: Config = load_config(config, **options)
        m = self.config.manager
        self.options = m
        self.policy = RetentionPolicy(m.keep_last, m.keep_every, m.keep_best, m.best_metric, m.best_mode)
        self.root = CheckpointRoot(root, self.config)
        self.url = self.root.url
        self._dist, self.rank, self.world_size = _dist_state()
        self._dist = self._dist and self.world_size > 1
        self._own_groups: list[Any] = []
        self._pg = self._save_pg = None
        if self._dist:
            import torch.distributed as dist

            timeout = datetime.timedelta(seconds=m.timeout)
            self._pg = dist.new_group(backend="gloo", timeout=timeout)  # the manager's own decisions
            self._own_groups.append(self._pg)
            if process_group is None:  # DCP's collectives (in the upload thread when async)
                process_group = dist.new_group(backend="gloo", timeout=timeout)
                self._own_groups.append(process_group)
            self._save_pg = process_group
        self._stager = stager
        self._own_stager = stager is None
        self._lock = threading.Lock()  # guards _pending
        self._book = RootBookkeeper(self.root, self.config, self.policy)  # rank 0's view of the root
        self._pending: list[_Pending] = []
        self._closed = False
        self._preempted: int = 0
        self._signals = SignalWatcher(m.save_on_signal) if m.save_on_signal else None
        try:
            self.run_id, steps = self._coordinated(self._start)
        except BaseException:
            self._release()
            raise
        self._saved_steps: set[int] = set()
        logger.info("checkpoint manager on %s: %d complete step(s)%s", self.url, len(steps),
                    f", newest {steps[-1]}" if steps else "")

    # -- public API ------------------------------------------------------------------------
    @property
    def tiered(self) -> bool:
        """Whether saves go to a fast local tier first (``cache=``)."""
        return bool(self.config.tier.cache)

    @property
    def preempted(self) -> int | None:
        """The signal number after which a preemption checkpoint was written (with
        ``exit_on_signal=False``), else None."""
        return self._preempted or None

    def step_url(self, step: int) -> str:
        """Where ``step`` is (or would be) saved."""
        return self.root.step_url(step)

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is on the save interval (signals and ``force`` aside)."""
        return step % self.options.interval == 0

    def save(self, step: int, state: dict[str, Any], *, force: bool = False, metrics: dict | None = None,
             metadata: dict | None = None, planner: Any = None) -> bool:
        """Checkpoint ``state`` as ``step`` if the interval says so, ``force`` is set, or a
        preemption signal arrived on any rank; call it on every rank with the same ``step``.

        Returns whether a save started. A step that already has a complete checkpoint is skipped
        (logged) unless ``force`` is set, which then needs ``overwrite=True``. ``metrics`` (numbers,
        e.g. ``{"loss": 1.25}``) and ``metadata`` (any JSON) are stored in the step's record;
        ``keep_best`` ranks by ``metrics[best_metric]``. Async saves return once the state is
        copied; :meth:`wait` waits for the upload. After a signal-triggered save the process
        exits with ``SystemExit(128 + signal)`` unless ``exit_on_signal=False``.
        """
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise DcpExtError(f"save: step must be an int >= 0, got {step!r}")
        signum = self._agreed_signal()
        if not (force or signum or self.should_save(step)):
            return False
        metrics = jsonable_metrics(metrics)
        metadata = jsonable_metrics(metadata, "metadata")
        self._wait_uploads()  # errors of the previous async save surface here, on every rank
        name = self.root.step_name(step)
        info = StepInfo(step, metrics=metrics, metadata=metadata, world_size=self.world_size,
                        layout=self._layout_of(planner), mode="async" if self.options.async_save else "sync",
                        tier=self.config.tier.cache, run=self.run_id)
        go = self._coordinated(lambda: self._book.claim(name, info, force or bool(signum)))
        if not go:
            return self._after_save(signum, saved=False)
        writer = storage_writer(self.root.step_url(name), config=self.config)
        p = _Pending(step, name, info, writer, time.perf_counter())
        with self._lock:
            self._pending.append(p)
        try:
            if self.options.async_save:
                from ..staging import PooledStager, async_save

                if self._stager is None:
                    self._stager = PooledStager()
                result = async_save(state, storage_writer=writer, async_stager=self._stager, planner=planner,
                                    process_group=self._save_pg)
                p.upload = getattr(result, "upload_completion", result)
                p.upload.add_done_callback(lambda f: self._after_upload(p, f.exception()))
            else:
                import torch.distributed.checkpoint as dcp

                dcp.save(state, storage_writer=writer, planner=planner, process_group=self._save_pg)
                self._after_upload(p, None)
        except BaseException as e:
            self._after_upload(p, e)
            raise
        logger.info("step %d: %s save to %s started", step, info.mode, self.root.step_url(name))
        self._saved_steps.add(step)
        return self._after_save(signum, saved=True)

    def maybe_save(self, step: int, state: dict[str, Any], **kwargs: Any) -> bool:
        """:meth:`save` without ``force``: call it every step; it writes on the interval and
        after a preemption signal."""
        kwargs.pop("force", None)
        return self.save(step, state, **kwargs)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every save started by this manager is committed (durably, for tiered
        saves) and its bookkeeping (record, ``latest``, retention) is done; raise the first
        failure. Call it on every rank."""
        self._wait_uploads(timeout)
        with self._lock:
            pending = list(self._pending)
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not p.done.wait(left):
                raise TimeoutError(f"step {p.step}: the save to {self.root.step_url(p.name)} did not finish "
                                   f"within {timeout}s (still {'persisting' if self.tiered else 'uploading'})")
        with self._lock:
            failed = [p for p in pending if p.durable_error is not None]
            self._pending = [p for p in self._pending if not p.done.is_set()]
        if failed:
            raise failed[0].durable_error

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint under the root, oldest first (a collective: call
        it on every rank; every rank gets rank 0's answer). For tiered saves: complete in the
        durable location."""
        self._check_open()
        return self._coordinated(self._book.scan_committed)

    def latest_step(self) -> int | None:
        """The newest complete step, or None (a collective, like :meth:`all_steps`)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def info(self, step: int) -> StepInfo | None:
        """The record of ``step`` (metrics, wall times, layout, ...), or None if it has none
        (a collective)."""
        self._check_open()
        return self._coordinated(lambda: self.root.read_info(self.root.step_name(step), cached=False))

    def load(self, state: dict[str, Any], step: int | None = None, *, planner: Any = None) -> int | None:
        """Load ``step`` (default: the newest complete one) into ``state`` in place, except the
        ``exclude``d top-level keys; returns the step loaded, or None when there is no
        checkpoint yet (a fresh run). Call it on every rank. Any DCP load planner works
        (e.g. :class:`~dcp_ext.ReshardLoadPlanner` to resume at another layout)."""
        self._check_open()
        self.wait()
        missing = [k for k in self.options.exclude if k not in state]
        if missing:
            raise ConfigError(f"manager.exclude names {missing}, which the state does not have; its top-level keys: "
                              f"{sorted(map(str, state))}")
        if self.tiered:
            step = self._loadable_tiered_step(step)
            if step is None:
                logger.info("no loadable checkpoint under %s (fast tier %s): starting fresh", self.url,
                            self.config.tier.cache)
                return None
        elif step is None:
            step = self.latest_step()
            if step is None:
                logger.info("no complete checkpoint under %s: starting fresh", self.url)
                return None
        else:
            self._coordinated(lambda: self._book.require_step(step))
        name = self.root.step_name(step)
        part = {k: v for k, v in state.items() if k not in self.options.exclude}
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        reader = storage_reader(self.root.step_url(name), config=self.config)
        dcp.load(part, storage_reader=reader, planner=planner, process_group=self._save_pg)
        state.update(part)
        logger.info("step %d: loaded from %s in %.2fs%s", step, self.root.step_url(name), time.perf_counter() - t0,
                    f" (kept {self.options.exclude} as they were)" if self.options.exclude else "")
        return step

    def _loadable_tiered_step(self, step: int | None) -> int | None:
        """Tiered: the newest step (or ``step``) that a load can assemble from the ranks' fast
        tiers or the durable tier, the same on every rank (``dcp_ext.newest_loadable``, a
        collective): a step whose persistence a crash interrupted still resumes from the fast tier."""
        from ..tiered import newest_loadable

        if step is None:  # every step directory the root has, newest first, whatever its durable state
            steps = self._coordinated(lambda: sorted((e.step for e in self.root.scan(with_info=False)), reverse=True))
        else:
            steps = [step]
        urls = [self.root.step_url(s) for s in steps]
        chosen = newest_loadable(urls, config=self.config) if urls else None
        if chosen is None and step is not None:
            avail = self._coordinated(self._book.scan_committed)
            raise IncompleteCheckpointError(
                f"step {step} under {self.url} cannot be loaded from the fast tier ({self.config.tier.cache}) or the "
                f"durable location; durable complete steps: {', '.join(map(str, avail[-20:])) or 'none'}")
        return None if chosen is None else steps[urls.index(chosen)]

    def close(self) -> None:
        """Wait for pending saves (raising their failures), then release the stager, the signal
        handlers and the process groups the manager created. Idempotent."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # don't hide the original error behind a save failure
            try:
                self.close()
            except BaseException as e:  # noqa: BLE001
                logger.error("while closing the checkpoint manager after an error: %s", e)

    # -- coordination ----------------------------------------------------------------------
    def _coordinated(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0; every rank returns its result or raises its error."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                error = e
        if self._dist:
            import torch.distributed as dist

            box = [(result, _portable(error))]
            dist.broadcast_object_list(box, src=0, group=self._pg)
            if self.rank != 0:
                result, error = box[0]
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def _agreed_signal(self) -> int:
        """The highest preemption signal any rank received (0: none). A collective when
        ``save_on_signal`` is set, so every rank decides alike."""
        if self._signals is None:
            return 0
        local = int(self._signals.received or 0)
        if not self._dist:
            return local
        import torch.distributed as dist

        t = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._pg)
        return int(t.item())

    def _after_save(self, signum: int, saved: bool) -> bool:
        if not signum:
            return saved
        import signal

        name = signal.Signals(signum).name
        self._preempted = signum
        logger.warning("%s received: %s; waiting for the checkpoint to be committed", name,
                       "checkpoint started" if saved else "this step is already checkpointed")
        self.wait()
        if self.options.exit_on_signal:
            logger.warning("%s: checkpoint committed; exiting (exit code %d)", name, 128 + signum)
            self._release()
            raise SystemExit(128 + signum)
        return saved

    # -- rank 0 bookkeeping ------------------------------------------------------------------
    def _start(self) -> tuple[str, list[int]]:
        self.run_id = uuid.uuid4().hex[:12]
        return self.run_id, self._book.start(cleanup=self.options.cleanup)

    def _after_upload(self, p: _Pending, error: BaseException | None) -> None:
        """On every rank, when DCP's save of ``p`` returned (sync) or its upload future resolved."""
        if error is not None:
            p.upload_error = error
            logger.error("step %d: saving to %s failed: %s", p.step, self.root.step_url(p.name), error)
            self._finish(p)
            return
        try:
            durable = p.writer.persisted if self.tiered else None
        except Exception:  # noqa: BLE001 - a writer without a background copy
            durable = None
        if isinstance(durable, concurrent.futures.Future):
            durable.add_done_callback(lambda f: self._after_durable(p, f))
        else:
            self._finish(p)

    def _after_durable(self, p: _Pending, f: concurrent.futures.Future) -> None:
        err = f.exception()
        if err is not None:
            p.durable_error = err
            logger.error("step %d: persisting %s failed: %s", p.step, self.root.step_url(p.name), err)
        self._finish(p)

    def _finish(self, p: _Pending) -> None:
        try:
            if self.rank == 0 and p.upload_error is None and p.durable_error is None:
                self._book.committed(p.step, p.name, p.info, p.t0)
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed; tidying is best effort
            logger.warning("step %d: committed, but updating %s failed: %s", p.step, self.url, e)
        finally:
            self._book.finished(p.step)
            p.done.set()

    def _prune(self, just_committed: int | None = None) -> None:
        """Apply retention and remove leftovers of failed saves (rank 0)."""
        self._book.prune(just_committed)

    # -- misc --------------------------------------------------------------------------------
    def _wait_uploads(self, timeout: float | None = None) -> None:
        """Wait for this manager's async uploads; raise the first failure (every rank's upload
        future fails alike: DCP gathers errors from all ranks)."""
        with self._lock:
            # drop finished saves with nothing left to report (an upload not yet reported stays)
            self._pending = [p for p in self._pending
                             if not p.done.is_set() or p.upload is not None or p.durable_error is not None]
            uploads = [p for p in self._pending if p.upload is not None]
        errors: list[tuple[_Pending, BaseException]] = []
        for p in uploads:
            try:
                p.upload.result(timeout)
            except TimeoutError as e:
                raise TimeoutError(f"step {p.step}: the async save to {self.root.step_url(p.name)} is still "
                                   f"uploading after {timeout}s") from e
            except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
                errors.append((p, e))
        with self._lock:
            for p in uploads:
                p.upload = None  # reported once
            failed = {id(p) for p, _ in errors}
            self._pending = [p for p in self._pending if id(p) not in failed]
        if errors:
            raise errors[0][1]

    @staticmethod
    def _layout_of(planner: Any) -> str | None:
        layout = getattr(planner, "layout", None)
        describe = getattr(layout, "describe", None)
        return describe() if callable(describe) else None

    def _check_open(self) -> None:
        if self._closed:
            raise DcpExtError(f"this CheckpointManager ({self.url}) is closed")

    def _release(self) -> None:
        self._closed = True
        if self._signals is not None:
            self._signals.restore()
        if self._stager is not None and self._own_stager:
            try:
                self._stager.close()
            except Exception as e:  # noqa: BLE001
                logger.warning("closing the staging pool: %s", e)
            self._stager = None
        # the groups' last references are handed over: freeing one while holding the GIL can
        # deadlock with its worker threads on torch < 2.8 (see destroy_process_groups)
        self._pg = self._save_pg = None
        groups, self._own_groups = self._own_groups, []
        destroy_process_groups(groups)
        self.root.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.url!r}, rank {self.rank}/{self.world_size})"
