"""Train a ResNet classifier with Ray Train on alpha-mixed real/synthetic batches.

Data path (nothing is gathered on one node):

    real/train/*.parquet ──┐  Ray Data read + project to (id, source_id, aug_index, label, image_bytes)
    synthetic/**.parquet ──┴─> union ─> randomize_block_order ─> streaming_split(workers, equal=False)
        └─> each worker: its share, read once into memory (sorted by id) when the whole union is
            at most cache_mb, else streamed again on every pass
            └─> every epoch: P whole passes over the real train set (P x N / batch ~ iterations_per_epoch
                steps, so every shot count trains as long, as in the reference); in every pass each
                real id is kept exactly once, itself or one of its synthetic images (mixing.keep_mask
                with a choice drawn per (seed, epoch, pass, id)); rows decoded and transformed ahead
                in threads, the random transform seeded per (seed, epoch, pass, id)
                └─> exact-size batches cut across pass boundaries ─> DDP step

The mixing choice is stateless, so keeping "the chosen row of every source" in each worker's rows
gives every real example exactly once per pass, whichever worker holds it. Shards differ in size by
a few rows; DDP's Join context lets a worker that runs out early shadow the collectives of the
others, so no rows are dropped and nobody hangs. With the in-memory share, the same config gives
the same checkpoint bytes on one CPU worker.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
from ray.data.collate_fn import NumpyBatchCollateFn

from . import mixing, plan, schema, storage
from .classifier import (
    CHECKPOINT_META,
    build_model,
    decode_uint8,
    load_train_state,
    TrainTransform,
    make_transform,
    save_checkpoint,
)
from .config import TrainConfig, callable_stage_module
from .configlib import config_record
from .errors import ConfigError
from .logs import setup_logging
from .modes import TRAIN_METHODS
from .runinfo import CostMeter, versions
from .watchdog import Watchdog, checkpoint_probe, sigint_kept

__all__ = [
    "TrainResult",
    "train",
    "method_settings",
    "ValCollate",
    "exact_batches",
    "train_step",
    "streaming_data",
    "StreamingData",
    "exact_split_config",
    "passes_per_epoch",
    "item_seed",
]

RESULT_FILE = "train_result.json"

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `train` produced."""

    output: str
    """Run URI: <output>/<name> (Ray Train's run directory, train_result.json, manifest.json)."""
    name: str
    method: str
    alpha: float
    best_checkpoint: Optional[str]
    """URI of the checkpoint with the best val_mean_class_acc."""
    best_val_mean_class_acc: Optional[float]
    epochs_completed: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """One entry per epoch (loss, val accuracy, synthetic fraction, samples/s, optimiser steps)."""
    seconds: float = 0.0
    optimizer_steps: int = 0
    """Optimiser steps actually taken over all epochs."""


def method_settings(cfg: TrainConfig) -> tuple[float, bool]:
    """(alpha actually used, RandAugment on) for the configured method (modes.TRAIN_METHODS)."""
    method = TRAIN_METHODS[cfg.method]
    randaugment = method.randaugment if cfg.randaugment is None else cfg.randaugment
    return (cfg.alpha if method.synthetic_mode else 0.0), randaugment


def item_seed(seed: int, epoch: int, pass_index: int, row_id: str) -> int:
    """Seed of one row's random train transform in one pass: the same run draws the same flips,
    rotations and RandAugment ops whatever the thread, worker count or order."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{pass_index}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


_POOLS: dict[int, Any] = {}
_POOLS_LOCK = threading.Lock()


def _row_pool(threads: int) -> Any:
    """This process's thread pool of that size for decoding and transforming rows (made once)."""
    from concurrent.futures import ThreadPoolExecutor

    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="decode-rows")
        return _POOLS[threads]


def _transform_rows(transform: Any, image_size: int, image_bytes: Any, labels: Any, aug: Any, ids: Any,
                    seeds: Optional[list[int]], pass_index: int, threads: int = 1, in_step: bool = False) -> tuple:
    """Decode and transform rows -> (x (B, 3, S, S), y (B,), aug_index (B,), ids (B,), pass (B,)).

    `seeds`: one per row, for a training transform (`TrainTransform`: each row draws from its own
    generator); None for a transform without random draws (validation's).
    With `threads` > 1 the rows are split over this process's decoding threads (torch's decode,
    resize and rotate release the GIL); each row's result depends only on its bytes and seed.
    The training transform handles each thread's rows as one batch (`TrainTransform.many`).
    `in_step` (a training transform that `splits`, with seeds): only decode, resize and draw here;
    x is then uint8 and the tuple ends with each row's flip and angle, for `batch_images` to finish
    in the training step on the training device.
    """
    import torch

    if seeds is not None and not isinstance(transform, TrainTransform):
        raise TypeError(f"seeded rows need a TrainTransform, got {type(transform).__name__}")
    in_step = in_step and seeds is not None and transform.splits

    def part(rows: range) -> Any:
        images = [decode_uint8(image_bytes[i]) for i in rows]
        if seeds is None:
            return (torch.stack([transform(image) for image in images]),)
        generators = [torch.Generator().manual_seed(seeds[i]) for i in rows]
        return transform.draw(images, generators) if in_step else (transform.many(images, generators),)

    n = len(image_bytes)
    if n == 0:
        drawn: tuple = transform.draw([], []) if in_step else (torch.empty(0, 3, image_size, image_size),)
    elif threads > 1 and n > 1:
        step = math.ceil(n / min(threads, n))
        parts = list(_row_pool(threads).map(part, [range(i, min(i + step, n)) for i in range(0, n, step)]))
        drawn = _concat_columns(parts)
    else:
        drawn = part(range(n))
    y = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: a Ray task's arguments are read-only
    return drawn[0], y, np.asarray(aug), np.asarray(ids), np.full(len(ids), pass_index), *drawn[1:]


def _concat_columns(parts: list[tuple]) -> tuple:
    """Row-aligned tuples of tensors and arrays joined column by column."""
    import torch

    return tuple(torch.cat(cols) if isinstance(cols[0], torch.Tensor) else np.concatenate(cols) for cols in zip(*parts))


def augments_in_step(cfg: TrainConfig, device: Any) -> bool:
    """Whether this worker's training step finishes the batch's transform (`augment_in_step`; by
    default when it trains on a GPU)."""
    return device.type == "cuda" if cfg.augment_in_step is None else cfg.augment_in_step


def decode_thread_count(cfg: TrainConfig) -> int:
    """A worker's decoding threads: `decode_threads`, or for 0 one per whole CPU it reserves."""
    return cfg.decode_threads or max(1, int(cfg.cpus_per_worker))


def batch_images(transform: Any, x: Any, drawn: Any, device: Any) -> Any:
    """A batch's images for the model: as the decoding threads made them, or, when they handed
    over uint8 images with each row's flip and angle (`drawn`, see `_transform_rows`), finished
    on `device`: on a GPU a few kernels per batch, where the decoding threads would spend about
    1.5-2 ms per 224 px row on them (benchmarks/decode_rate.py)."""
    if not drawn:
        return x
    return transform.finish(x.to(device, non_blocking=True), *drawn)


class ValCollate(NumpyBatchCollateFn):
    """Ray Data collate for validation: decode and transform every row of the batch (no random
    draw). Runs in Ray Data's prefetch threads; returns (images (B, 3, S, S), labels, aug_index,
    ids, pass), as `_transform_rows` does."""

    def __init__(self, transform, image_size: int, threads: int = 1):
        self.transform, self.image_size, self.threads = transform, image_size, threads

    def __call__(self, batch: dict[str, np.ndarray]):
        return _transform_rows(self.transform, self.image_size, batch["image_bytes"], batch["label"],
                               batch["aug_index"], batch["id"], None, 0, self.threads)


def exact_batches(chunks, batch_size: int, carry: Optional[list] = None, last: bool = True) -> Iterator[tuple]:
    """Re-cut variable-size chunks (tuples of row-aligned tensors and arrays) into batches of
    `batch_size` rows.

    The remainder joins the last batch (so it holds batch_size..2*batch_size-1 rows): no row is
    dropped, and BatchNorm never sees a lone trailing sample. With a `carry` list, the rows in it
    (a remainder left by an earlier call) come first, and unless `last`, this call's remainder is
    left in it for the next call instead of being trained short: streamed passes then cut batches
    across pass boundaries as the cached epoch does.
    """

    def cut(batch, start, stop):
        return tuple(col[start:stop] for col in batch)

    pending: list[tuple] = list(carry or [])
    count = sum(len(chunk[1]) for chunk in pending)
    if carry is not None:
        carry.clear()
    held = None  # the last full batch, kept back until we know whether a remainder follows
    for chunk in chunks:
        if len(chunk[1]) == 0:
            continue
        pending.append(chunk)
        count += len(chunk[1])
        while count >= batch_size:
            joined = _concat_columns(pending)
            if held is not None:
                yield held
            held = cut(joined, 0, batch_size)
            rest = cut(joined, batch_size, None)
            pending, count = ([rest] if len(rest[1]) else []), len(rest[1])
    if not last:
        if held is not None:
            yield held
        carry.extend(pending)
        return
    if held is not None and count:
        yield _concat_columns([held, *pending])
    elif held is not None:
        yield held
    elif count:
        yield _concat_columns(pending)


def passes_per_epoch(num_real: int, batch_size: int, iterations_per_epoch: int) -> int:
    """Whole passes over the real train set that make about `iterations_per_epoch` steps of
    `batch_size` (the reference trains 200 steps per epoch whatever the shot count)."""
    return max(1, math.ceil(iterations_per_epoch * batch_size / max(num_real, 1)))


def train_step(model, optimizer, scaler, x, y, device, channels_last: bool = False):
    """One optimiser step (AMP on CUDA); returns the detached loss."""
    import torch
    import torch.nn.functional as F

    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, y = x.to(device, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _freeze_batchnorm(model) -> None:
    """A linear probe keeps the frozen backbone's BatchNorm statistics too."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


# --------------------------------------------------------------------------------------
# The per-worker loop
# --------------------------------------------------------------------------------------


def _allreduce_sum(values, device):
    import torch
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu().numpy()


def _allreduce_max(values, device):
    import torch
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().numpy()


def _debug_write(debug_dir: Optional[str], name: str, obj: Any) -> None:
    if debug_dir:
        storage.write_json(storage.join(debug_dir, name), obj)


class _RaySession:
    """The loop's runner inside a Ray Train worker group."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def shard(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def prepare(self, model: Any) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[str]]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], directory: Optional[str]) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


class _LocalSession:
    """The loop's runner in the calling process (num_workers 0): no worker group to start, which is
    most of the cost of a small run. Checkpoints go to <run>/checkpoint_<epoch>, the best
    num_to_keep by val_mean_class_acc and the latest are kept, and a re-run resumes from the latest."""

    RECORD = "_local_checkpoints.json"

    def __init__(self, cfg: TrainConfig, run_uri: str, datasets: dict[str, Any]) -> None:
        import torch

        self.cfg, self.run_uri, self.datasets = cfg, run_uri, datasets
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        try:
            records = storage.read_json(storage.join(run_uri, self.RECORD), cfg.endpoint_url)
        except FileNotFoundError:
            records = []
        # a run killed while pruning may leave records of deleted checkpoints: resume from those still there
        self.records: list[dict[str, Any]] = [r for r in records if storage.exists(r["path"], cfg.endpoint_url)]

    def shard(self, name: str) -> Any:
        return self.datasets[name]

    def prepare(self, model: Any) -> Any:
        return model.to(self.device)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[str]]:
        if not self.records:
            yield None
            return
        uri = self.records[-1]["path"]
        if not storage.is_s3(uri):
            yield storage.resolve(uri)[1]  # a local path or a file:// URI: the path torch.load reads
            return
        with tempfile.TemporaryDirectory() as d:
            storage.download_dir(uri, d, self.cfg.endpoint_url)
            yield d

    def report(self, metrics: dict[str, Any], directory: Optional[str]) -> None:
        ep = self.cfg.endpoint_url
        uri = storage.join(self.run_uri, f"checkpoint_{metrics['epoch']:06d}")
        storage.upload_dir(directory, uri, ep)
        self.records = [r for r in self.records if r["path"] != uri] + [{"path": uri, "metrics": metrics}]
        latest = self.records[-1]
        best = sorted(self.records[:-1], key=lambda r: (r["metrics"]["val_mean_class_acc"], r["metrics"]["epoch"]),
                      reverse=True)[: self.cfg.num_to_keep]
        dropped = [r for r in self.records if r is not latest and r not in best]
        self.records = sorted(best, key=lambda r: r["metrics"]["epoch"]) + [latest]
        # the record first, then the deletions: a kill between them leaves unrecorded files, never a
        # record of a deleted checkpoint
        storage.write_json(storage.join(self.run_uri, self.RECORD), self.records, ep)
        for r in dropped:
            storage.delete(r["path"], ep)


def _train_loop(loop: dict[str, Any], session: Optional[Any] = None) -> None:
    """A training worker: resume, then per epoch train on the exact mixture, validate, checkpoint."""
    import torch

    setup_logging()
    session = session or _RaySession()
    cfg = TrainConfig.from_dict(loop["config"])
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(cfg.seed * 1000 + rank)
    _debug_write(cfg.debug_dir, f"pid-rank{rank}-{os.getpid()}.json", {"rank": rank, "pid": os.getpid()})

    # 1. model, optimiser, AMP scaler; resume from the latest checkpoint if there is one
    model, bare, optimizer, scaler = _prepare_model(cfg, loop["num_classes"], session)
    start_epoch, history = _resume(bare, optimizer, scaler, session)

    # 2. this worker's share of the union: read once into memory when the whole union is small enough
    # (straight from the files, split by id hash), else streamed from Ray Data on every pass
    if loop["cache"]:
        ep = cfg.endpoint_url
        cache = _RowCache.read(loop["files"]["train"], loop["files"]["synthetic"], rank, world, ep)
        val = _RowCache.read(loop["files"]["val"], [], rank, world, ep)
        train_shard = None
    else:
        cache, val, train_shard = None, session.shard("val"), session.shard("train")

    # 3. per epoch: whole passes over the exact mixture, validate, checkpoint
    for epoch in range(start_epoch, cfg.epochs):
        stats = _train_epoch(cfg, loop, model, optimizer, scaler, train_shard, cache, epoch, rank, world, device)
        confusion = _validate(cfg, bare, val, loop["num_classes"], world, device)
        metrics = _epoch_metrics(epoch, stats, confusion)
        history.append(metrics)
        _checkpoint(cfg, loop, bare, optimizer, scaler, epoch, history, session)


def _prepare_model(cfg: TrainConfig, num_classes: int, session: Any) -> tuple[Any, Any, Any, Any]:
    """(DDP-wrapped model, bare model, Adam over the trainable parameters, AMP scaler)."""
    import torch

    model = build_model(cfg.arch, num_classes, cfg.weights, cfg.backbone, cfg.endpoint_url)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = session.prepare(model)
    bare = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=session.device.type == "cuda")
    return model, bare, optimizer, scaler


def _resume(bare: Any, optimizer: Any, scaler: Any, session: Any) -> tuple[int, list[dict[str, Any]]]:
    """Load the latest checkpoint (after a worker failure or a re-submitted run): (next epoch, history)."""
    with session.latest_checkpoint() as d:
        if d is None:
            return 0, []
        model_state, train_state, meta = load_train_state(d, session.device)
    bare.load_state_dict(model_state)
    optimizer.load_state_dict(train_state["optimizer"])
    if train_state.get("scaler"):  # empty when saved without AMP (CPU): resumed on a GPU, the scale starts afresh
        scaler.load_state_dict(train_state["scaler"])
    if session.rank == 0:
        log.info("resuming after epoch %d", meta["epoch"])
    return meta["epoch"] + 1, meta["history"]


class _RowCache:
    """This worker's share of the real+synthetic union (or of val), encoded, sorted by id.

    Read once, straight from the parquet files, each worker keeping the rows whose id hashes to
    its rank (a disjoint cover: every real id and its synthetic versions on exactly one worker's
    list of candidates). Every later pass draws from memory, so a few-shot run does not re-read
    storage hundreds of times per epoch, and sorting makes the run independent of read order.
    """

    COLUMNS = ("id", "source_id", "aug_index", "label", "image_bytes")

    def __init__(self, cols: dict[str, np.ndarray]) -> None:
        order = np.argsort(cols["id"].astype(str), kind="stable")
        for c in self.COLUMNS:
            setattr(self, c, cols[c][order])

    @classmethod
    def read(cls, real_files: list[str], synthetic_files: list[str], rank: int, world: int,
             endpoint_url: Optional[str]) -> "_RowCache":
        parts: dict[str, list] = {c: [] for c in cls.COLUMNS}
        for files, synthetic in ((real_files, False), (synthetic_files, True)):
            columns = ["id", "source_id", "aug_index", "label", "image"] if synthetic else ["id", "label", "image"]
            for uri in files:
                table = _union_rows(storage.read_parquet(uri, endpoint_url, columns=columns), synthetic)
                ids = table.column("id").to_pylist()
                mine = [i for i, rid in enumerate(ids) if _owner(rid, world) == rank]
                for c in cls.COLUMNS:
                    parts[c] += [table.column(c)[i].as_py() for i in mine]
        cols = {c: np.array(v, dtype=object) if c in ("id", "source_id", "image_bytes") else np.array(v, dtype=np.int64)
                for c, v in parts.items()}
        return cls(cols)

    def __len__(self) -> int:
        return len(self.id)


def _owner(row_id: str, world: int) -> int:
    """The worker that holds a row: a stable hash of its id. (Which worker holds a synthetic
    version does not matter: the mixing choice picks one row per source, wherever it is.)"""
    if world == 1:
        return 0
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "little") % world


def _cache_passes(cache: _RowCache, cfg: TrainConfig, loop: dict[str, Any], transform: Any, epoch: int, rank: int,
                  local_batch: int, passes: int, in_step: bool) -> Iterator[tuple]:
    """Chunks of transformed rows for every pass of an epoch, decoded ahead in a thread pool."""

    def plan() -> Iterator[tuple]:
        for p in range(passes):
            chosen = np.flatnonzero(mixing.keep_mask(cache.source_id, cache.aug_index, loop["candidates"], cfg.seed,
                                                     epoch, loop["alpha"], p))
            chosen = chosen[np.random.default_rng([cfg.seed, epoch, p, rank]).permutation(len(chosen))]
            for start in range(0, len(chosen), local_batch):
                idx = chosen[start:start + local_batch]
                yield p, {c: getattr(cache, c)[idx] for c in _RowCache.COLUMNS}

    yield from _decoded_ahead(plan(), cfg, transform, epoch, in_step)


def _decode_chunk(transform: Any, image_size: int, seed: int, epoch: int, in_step: bool, threads: int,
                  pass_index: int, rows: dict[str, np.ndarray]) -> tuple:
    """One chunk of chosen rows decoded and transformed, each row's draws seeded by its id."""
    seeds = [item_seed(seed, epoch, pass_index, str(i)) for i in rows["id"]]
    return _transform_rows(transform, image_size, rows["image_bytes"], rows["label"], rows["aug_index"], rows["id"],
                           seeds, pass_index, threads, in_step)


def _decode_chunk_in_task(setup: tuple, pass_index: int, rows: dict[str, np.ndarray]) -> tuple[tuple, tuple, float]:
    """A Ray task's side of `_TaskDecoder`: the chunk as numpy arrays (read from the object store
    without a copy on the same node), which of them were tensors, and the task's seconds."""
    import torch

    start = time.perf_counter()
    out = _decode_chunk(*setup, 1, pass_index, rows)
    return (tuple(c.numpy() if isinstance(c, torch.Tensor) else c for c in out),
            tuple(isinstance(c, torch.Tensor) for c in out), time.perf_counter() - start)


@functools.lru_cache(maxsize=None)
def _decode_task() -> Any:
    import ray

    return ray.remote(_decode_chunk_in_task)


class _TaskDecoder:
    """Chunks decoded in Ray tasks of one CPU each (`decode_processes`): the training process then
    only masks, submits and steps. Ray's default placement prefers this node (the caller's, holding
    the arguments) and spills to another when it has no CPU free; a hard or soft node affinity
    would wait forever behind a worker that reserved all of its node's CPUs. Threads in the training
    process share its interpreter and CPU time with the step: on an H100 a ResNet-50 step slowed
    from 38 to 84 ms beside 12 decoding threads (docs/benchmarks.md)."""

    spent = 0.0
    """Seconds the tasks of this process's decoders worked (their CPU for the stage's cost)."""

    def __init__(self, transform: Any, cfg: TrainConfig, epoch: int, in_step: bool) -> None:
        import ray

        plan._connect()  # the local runner (num_workers 0) may be the first to use Ray
        self.task = _decode_task().options(num_cpus=1, name="decode_rows")
        self.setup = ray.put((transform, cfg.image_size, cfg.seed, epoch, in_step))
        self.pending: collections.deque = collections.deque()

    def submit(self, pass_index: int, rows: dict[str, np.ndarray]) -> None:
        self.pending.append(self.task.remote(self.setup, pass_index, rows))

    def next(self) -> tuple:
        import ray
        import torch

        arrays, tensors, seconds = ray.get(self.pending.popleft())
        _TaskDecoder.spent += seconds
        # copies: arrays from the object store are read-only, and the batch is ours to keep
        return tuple(torch.from_numpy(a.copy()) if t else a.copy() for a, t in zip(arrays, tensors))

    def close(self) -> None:
        self.cancel_pending()  # a stopped epoch (an error, a closed stream) leaves nothing running
        self.pending.clear()

    def cancel_pending(self) -> None:
        """Cancel the tasks asked for and not yet taken; safe from another thread than the one that
        asks (a snapshot: nothing is removed, and the asker meets the cancellation at its next take)."""
        import ray

        for ref in list(self.pending):
            try:
                ray.cancel(ref)
            except Exception as e:  # never in place of the error that stopped the epoch
                log.debug("could not cancel a decoding task: %s", e)


class _ThreadDecoder:
    """Chunks decoded in this process: two chunks at a time, each over `decode_threads` threads."""

    def __init__(self, transform: Any, cfg: TrainConfig, epoch: int, in_step: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.setup = (transform, cfg.image_size, cfg.seed, epoch, in_step, cfg.decode_threads)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self.pending: collections.deque = collections.deque()

    def submit(self, pass_index: int, rows: dict[str, np.ndarray]) -> None:
        self.pending.append(self.pool.submit(_decode_chunk, *self.setup, pass_index, rows))

    def next(self) -> tuple:
        return self.pending.popleft().result()

    def close(self) -> None:
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)


def _decoded_ahead(planned: Iterator[tuple[int, dict[str, np.ndarray]]], cfg: TrainConfig, transform: Any, epoch: int,
                   in_step: bool) -> Iterator[tuple]:
    """Transformed chunks of `planned` (pass, rows), in order, each decoded while the ones before it
    train: prefetch_batches chunks ahead in this process's threads, or with decode_processes, that
    many in Ray tasks (never more at once), the planning, submitting and fetching then run ahead
    in a thread of their own (`_run_ahead`). Every row's transform is seeded by its id, so either way
    the same bytes are trained on."""
    decoder = (_TaskDecoder if cfg.decode_processes else _ThreadDecoder)(transform, cfg, epoch, in_step)
    chunks = _decode_in_order(planned, decoder, cfg.decode_processes or cfg.prefetch_batches)
    if cfg.decode_processes and _CHUNKS_AHEAD:
        return _run_ahead(chunks, _CHUNKS_AHEAD, abandon=decoder.cancel_pending)
    return chunks


_CHUNKS_AHEAD = 2
"""Decoded chunks `_run_ahead` holds ready for the step (with decode_processes); 0: no thread
(benchmarks/train_overhead.py --no-run-ahead measures what the thread saves)."""
_STOP_WAIT = 5.0
"""Seconds a stopped consumer waits for the thread of `_run_ahead` to end before leaving it behind."""


def _run_ahead(items: Iterator[tuple], depth: int, abandon: Optional[Any] = None) -> Iterator[tuple]:
    """`items` produced by a thread of this process, at most `depth` ahead of the consumer, in order.

    With decode_processes, what a batch still costs the training process (Ray Data's blocks, the
    mixing mask and draws, submitting a chunk, fetching and copying its arrays) ran between steps
    while the GPU idled, since each step waits for the GPU (the AMP scaler's check, the loss): on an
    H200 node the stream of 6 decoding tasks waited 27% of its time (docs/benchmarks.md). In a thread it runs
    while the training thread waits on the GPU with the interpreter lock released. The thread owns
    `items` (a generator is closed by the thread that runs it): the consumer's close or error stops
    it after the item in hand, and closing `items` there cancels what it had asked for; an error in
    it is raised in the consumer. A thread still inside a read `_STOP_WAIT` s after the consumer
    stopped is left to end on its own, after `abandon()` (cancelling the tasks it had asked for):
    a stage failing, or interrupted by the stall watchdog, never waits on a hung read."""
    import queue

    if depth < 1:  # a Queue of maxsize 0 would hold everything
        raise ValueError(f"depth must be at least 1, got {depth}")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def hand(entry: tuple) -> bool:  # False once the consumer stopped
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand((item, None)):
                    return
            hand((end, None))
        except BaseException as exc:  # raised again in the consumer, with its traceback
            hand((None, exc))
        finally:
            close = getattr(items, "close", None)  # a generator's: what it had asked for is cancelled
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="chunks ahead", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            if item is end:
                finished = True
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=None if finished else _STOP_WAIT)
        if thread.is_alive():
            log.warning("the thread reading training chunks ahead is still inside a read %gs after the epoch "
                        "stopped; cancelling its decoding tasks and leaving it to end on its own", _STOP_WAIT)
            if abandon is not None:
                abandon()


def _decode_in_order(planned: Iterator[tuple[int, dict[str, np.ndarray]]], decoder: Any, ahead: int) -> Iterator[tuple]:
    """`_decoded_ahead`'s chunks, decoded by `decoder` (threads or Ray tasks) `ahead` at a time, in
    `planned`'s order; the decoder is closed at the end."""
    try:
        for pass_index, rows in planned:
            if len(decoder.pending) >= ahead:  # take the oldest, then refill: `ahead` decode during the step
                done = decoder.next()
                decoder.submit(pass_index, rows)
                yield done
            else:
                decoder.submit(pass_index, rows)
        while decoder.pending:
            yield decoder.next()
    finally:
        decoder.close()


def _stream_pass(shard: Any, cfg: TrainConfig, loop: dict[str, Any], transform: Any, epoch: int, rank: int,
                 local_batch: int, pass_index: int, in_step: bool) -> Iterator[tuple]:
    """Chunks of one pass, streamed from storage (for unions larger than cache_mb).

    Each block is masked as it arrives (this pass's mixing choice; no image decoded), and only the
    chosen rows enter a shuffle buffer of `shuffle_buffer` rows, from which chunks of `local_batch`
    are drawn at random (seeded by seed, epoch, pass and rank). Ray Data's own local shuffle buffer
    counts rows before the choice: with M synthetic rows per real one it held about 1/(M+1) of its
    size in chosen rows, and a batch came mostly from one block, all real or all synthetic.
    """
    rng = np.random.default_rng([cfg.seed, epoch, pass_index, rank])
    columns = _RowCache.COLUMNS
    least = max(cfg.shuffle_buffer, local_batch)

    def plan() -> Iterator[tuple]:
        held = {c: np.empty(0, dtype=object if c in ("id", "source_id", "image_bytes") else np.int64) for c in columns}
        for block in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=cfg.prefetch_batches):
            mask = mixing.keep_mask(block["source_id"], block["aug_index"], loop["candidates"], cfg.seed, epoch,
                                    loop["alpha"], pass_index)
            held = {c: np.concatenate([held[c], block[c][mask]]) for c in columns}
            while len(held["id"]) >= least:
                drawn = np.zeros(len(held["id"]), dtype=bool)
                drawn[rng.choice(len(drawn), local_batch, replace=False)] = True
                yield pass_index, {c: held[c][drawn] for c in columns}
                held = {c: held[c][~drawn] for c in columns}
        order = rng.permutation(len(held["id"]))
        for start in range(0, len(order), local_batch):
            idx = order[start:start + local_batch]
            yield pass_index, {c: held[c][idx] for c in columns}

    yield from _decoded_ahead(plan(), cfg, transform, epoch, in_step)


def _segments(shard: Any, cache: Optional[_RowCache], cfg: TrainConfig, loop: dict[str, Any], transform: Any,
              epoch: int, rank: int, local_batch: int, in_step: bool) -> Iterator[tuple[Iterator[tuple], bool]]:
    """The epoch's chunk streams, each run to its end by every worker before the next begins, and
    whether it is the epoch's last.

    From memory the whole epoch is one stream. Streamed from storage, every pass is its own: Ray
    Data starts a pass only when every worker asks for it, and a worker in step with the others
    (DDP) cannot ask before they finish theirs. Either way batches are cut across pass boundaries
    (`exact_batches` carries a pass's remainder into the next).
    """
    passes = loop["passes_per_epoch"]
    if cache is not None:
        yield _cache_passes(cache, cfg, loop, transform, epoch, rank, local_batch, passes, in_step), True
    else:
        for p in range(passes):
            yield _stream_pass(shard, cfg, loop, transform, epoch, rank, local_batch, p, in_step), p == passes - 1


def _train_epoch(cfg: TrainConfig, loop: dict[str, Any], model: Any, optimizer: Any, scaler: Any, shard: Any,
                 cache: Optional[_RowCache], epoch: int, rank: int, world: int, device: Any) -> dict[str, float]:
    """One epoch: `passes` whole passes over the real train set, each real id exactly once per pass
    (itself or one of its synthetic images)."""
    from torch.distributed.algorithms.join import Join

    model.train()
    if cfg.backbone == "linear_probe":
        _freeze_batchnorm(model)
    local_batch = max(1, cfg.batch_size // world)
    transform = make_transform(cfg.image_size, True, cfg.rotation, cfg.hflip, loop["randaugment"], cfg.fill)
    in_step = augments_in_step(cfg, device)
    loss_sum = seen = synthetic = steps = 0
    seen_rows: list[list[Any]] = []
    carry: list = []  # a streamed pass's rows short of a batch, trained at the head of the next pass
    start, spent = time.perf_counter(), _TaskDecoder.spent
    for segment, last in _segments(shard, cache, cfg, loop, transform, epoch, rank, local_batch, in_step):
        # uneven shards: a worker that runs out shadows the others' collectives until they finish
        segment_steps = 0
        # closing: an error in a step stops the segment's chunks (and a thread reading them ahead) now,
        # not whenever the error's traceback lets the generator go
        with contextlib.closing(segment), Join([model]) if world > 1 else contextlib.nullcontext():
            for x, y, aug, ids, passes, *drawn in exact_batches(segment, local_batch, carry, last):
                x = batch_images(transform, x, drawn, device)
                loss = train_step(model, optimizer, scaler, x, y, device, cfg.channels_last)
                segment_steps += 1
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
                synthetic += int((aug >= 0).sum())
                if cfg.debug_dir:
                    seen_rows += [[str(i), int(a), int(lbl), int(p)]
                                  for i, a, lbl, p in zip(ids, aug, y.tolist(), passes)]
        if world > 1:
            _share_training_state(optimizer, scaler, segment_steps, device)
        steps += segment_steps
    seconds = time.perf_counter() - start
    _debug_write(cfg.debug_dir, f"epoch{epoch}-rank{rank}-{os.getpid()}.json", seen_rows)
    if cfg.debug_dir:
        _debug_write(cfg.debug_dir, f"optimizer-epoch{epoch}-rank{rank}-{os.getpid()}.json",
                     {"steps": steps, "optimizer": _state_digest(optimizer)})
    loss_sum, seen, synthetic, decoding = _allreduce_sum([loss_sum, seen, synthetic, _TaskDecoder.spent - spent],
                                                         device)
    (steps,) = _allreduce_max([steps], device)  # with Join, the longest worker's steps are everyone's
    return {"loss_sum": loss_sum, "seen": seen, "synthetic": synthetic, "seconds": seconds, "steps": steps,
            "decode_task_seconds": decoding}


def _share_training_state(optimizer: Any, scaler: Any, steps: int, device: Any) -> None:
    """After a segment of uneven shards, every worker takes the optimizer (and AMP scaler) state of
    the worker that stepped last, the one whose parameters DDP's Join kept (the highest rank of those
    with the most steps). A worker that ran out skipped its last optimizer steps, so its Adam moments
    and step count lagged: the same averaged gradients then moved each copy differently, and a
    resumed run (rank 0's state) did not continue the uninterrupted one. Workers that took as many
    steps as each other still agree, and nothing is sent."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    held = len(optimizer.state)
    spread = torch.tensor([steps, -steps, held, -held], device=device)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    most, fewest, most_held, fewest_held = int(spread[0]), -int(spread[1]), int(spread[2]), -int(spread[3])
    if most == fewest:
        return
    source = torch.tensor([rank if steps == most else -1], device=device)
    dist.all_reduce(source, op=dist.ReduceOp.MAX)
    source = int(source.item())
    if most_held == fewest_held:  # every worker holds state for the same parameters: one buffer per dtype
        by_dtype: dict[Any, list] = collections.defaultdict(list)
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                for key in sorted(state):
                    if torch.is_tensor(state[key]):
                        by_dtype[state[key].dtype].append(state[key])
        for tensors in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors])
            dist.broadcast(flat, source)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
    else:  # a worker that never stepped (an empty shard) has none yet: the whole state travels once
        sent = [optimizer.state_dict() if rank == source else None]
        dist.broadcast_object_list(sent, source, device=device)
        optimizer.load_state_dict(sent[0])
    if scaler.is_enabled():
        sent = [scaler.state_dict() if rank == source else None]
        dist.broadcast_object_list(sent, source, device=device)
        scaler.load_state_dict(sent[0])


def _state_digest(optimizer: Any) -> str:
    """A digest of the optimizer's state (debug_dir: workers' copies must agree)."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key in sorted(state):
                value = state[key]
                digest.update(key.encode())
                digest.update(value.detach().cpu().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode())
    return digest.hexdigest()


def _validate(cfg: TrainConfig, bare: Any, val: Any, num_classes: int, world: int, device: Any) -> np.ndarray:
    """Confusion matrix on val (this worker's rows: a _RowCache, or a Ray Data shard), summed over workers."""
    import torch

    confusion = np.zeros((num_classes, num_classes))
    eval_model = bare.eval()
    transform = make_transform(cfg.image_size, False)
    batch = max(1, cfg.batch_size // world)
    if isinstance(val, _RowCache):
        batches: Iterator[tuple] = (
            _transform_rows(transform, cfg.image_size, val.image_bytes[i:i + batch], val.label[i:i + batch],
                            val.aug_index[i:i + batch], val.id[i:i + batch], None, 0, cfg.decode_threads)
            for i in range(0, len(val), batch))
    else:
        batches = val.iter_torch_batches(batch_size=batch, device="cpu", prefetch_batches=cfg.prefetch_batches,
                                         collate_fn=ValCollate(transform, cfg.image_size, cfg.decode_threads))
    with torch.no_grad():
        for x, y, *_ in batches:
            if len(y) == 0:
                continue
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                pred = eval_model(x.to(device)).argmax(1).cpu()
            np.add.at(confusion, (y.numpy(), pred.numpy()), 1)
    return _allreduce_sum(confusion, device).reshape(num_classes, num_classes)


def _epoch_metrics(epoch: int, stats: dict[str, float], confusion: np.ndarray) -> dict[str, Any]:
    support = confusion.sum(1)
    per_class = np.diag(confusion)[support > 0] / support[support > 0]
    seen, seconds = stats["seen"], stats["seconds"]
    return {
        "epoch": epoch,
        "train_loss": float(stats["loss_sum"] / max(seen, 1)),
        "train_samples": int(seen),
        "synthetic_fraction": float(stats["synthetic"] / max(seen, 1)),
        "samples_per_s": float(seen / seconds) if seconds > 0 else 0.0,
        "steps": int(stats["steps"]),
        "val_mean_class_acc": float(per_class.mean()) if len(per_class) else 0.0,
        "val_top1": float(np.trace(confusion) / max(confusion.sum(), 1)),
        **({"decode_task_seconds": round(float(stats["decode_task_seconds"]), 3)}
           if stats.get("decode_task_seconds") else {}),  # decode_processes: the tasks' time, all workers
    }


def _checkpoint(cfg: TrainConfig, loop: dict[str, Any], bare: Any, optimizer: Any, scaler: Any, epoch: int,
                history: list[dict[str, Any]], session: Any) -> None:
    """Rank 0 writes the checkpoint; every rank reports (Ray Train wants the same number of reports)."""
    metrics = history[-1]
    with tempfile.TemporaryDirectory() as tmp:
        directory = None
        if session.rank == 0:
            save_checkpoint(tmp, bare.state_dict(), {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
                            {"epoch": epoch, "history": history, "arch": cfg.arch, "num_classes": loop["num_classes"],
                             "image_size": cfg.image_size, "classes": loop["classes"], "method": cfg.method,
                             "alpha": loop["alpha"]})
            directory = tmp
            log.info("epoch %d/%d loss %.4f val_mean_class_acc %.4f synthetic %.3f %.1f samples/s", epoch + 1,
                     cfg.epochs, metrics["train_loss"], metrics["val_mean_class_acc"], metrics["synthetic_fraction"],
                     metrics["samples_per_s"])
        session.report(metrics, directory)


# --------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------


def _union_rows(batch: pa.Table, synthetic: bool) -> pa.Table:
    """Project real or synthetic rows onto the columns the training stream needs."""
    n = batch.num_rows
    images = batch.column("image").combine_chunks() if n else pa.array([], schema.IMAGE_TYPE)
    return pa.table({
        "id": batch.column("id").cast(pa.string()),
        "source_id": batch.column("source_id").cast(pa.string()) if synthetic else batch.column("id").cast(pa.string()),
        "aug_index": batch.column("aug_index").cast(pa.int32()) if synthetic else pa.array([mixing.REAL] * n, pa.int32()),
        "label": batch.column("label").cast(pa.int64()),
        "image_bytes": images.field("bytes"),
    })


def _synthetic_candidates(cfg: TrainConfig, real_labels: dict[str, int],
                          class_names: list[str]) -> tuple[list[str], dict, dict[str, Any]]:
    """Synthetic parquet files, source_id -> aug indices kept (checked against the real train set
    and, with `synthetic_filter`, passing it), and what the filter dropped."""
    manifest = storage.read_manifest(cfg.synthetic, cfg.endpoint_url)
    if manifest is None:
        raise FileNotFoundError(
            f"synthetic set {cfg.synthetic} is incomplete (no {storage.MANIFEST}); let `ray-dafusion augment` finish "
            "(a re-run resumes) before training on it"
        )
    made_by = manifest.get("mode") or (manifest.get("config") or {}).get("mode")
    wanted = TRAIN_METHODS[cfg.method].synthetic_mode
    if made_by != wanted:
        raise ConfigError(
            f"config field 'synthetic': method {cfg.method} trains on a {wanted} synthetic set, but {cfg.synthetic} "
            f"was made in mode {made_by!r}; point `synthetic` at the augment output of mode {wanted}"
        )
    # data/ holds the images; errors/ (quarantined rows) and scores/ have other schemas
    files = storage.list_files(storage.join(cfg.synthetic, "data"), ".parquet", cfg.endpoint_url, recursive=True)
    if not files:
        raise FileNotFoundError(f"synthetic set {cfg.synthetic} has a manifest but no parquet files under data/")
    # Only small columns reach the driver: the candidate table, not the images.
    columns = ["id", "source_id", "aug_index", "label"]
    meta = pa.concat_tables([storage.read_parquet(f, cfg.endpoint_url, columns=columns) for f in files]).to_pydict()
    foreign = sorted({s for s in meta["source_id"] if s not in real_labels})
    if foreign:
        raise ValueError(
            f"synthetic set {cfg.synthetic} holds images of {len(foreign)} sources that are not in "
            f"{cfg.real}/train (e.g. {foreign[:3]}); it was made from another real set"
        )
    wrong = [(s, lbl) for s, lbl in zip(meta["source_id"], meta["label"]) if real_labels[s] != lbl]
    if wrong:
        raise ValueError(f"synthetic images carry a label different from their source's, e.g. {wrong[:3]}")
    _check_coverage(cfg, real_labels, set(meta["source_id"]))
    keep = np.ones(len(meta["id"]), dtype=bool)
    report: dict[str, Any] = {}
    if cfg.synthetic_filter:
        keep, report = _apply_filter(cfg, meta, class_names)
    sids = [s for s, k in zip(meta["source_id"], keep) if k]
    augs = [a for a, k in zip(meta["aug_index"], keep) if k]
    candidates = mixing.candidate_table(sids, augs)
    without = sum(1 for s in real_labels if s not in candidates)
    if cfg.synthetic_filter:
        report["sources_without_synthetic"] = without
        log.info("synthetic_filter %r keeps %d of %d synthetic images; %d real images keep no synthetic version "
                 "and stay real", cfg.synthetic_filter, report["kept"], len(keep), without)
    elif without:
        log.info("%d of %d real images have no synthetic version (augment quarantined them) and stay real",
                 without, len(real_labels))
    return files, candidates, report


def _check_coverage(cfg: TrainConfig, real_labels: dict[str, int], sources: set[str]) -> None:
    """Every real train image has synthetic versions or was quarantined by augment: a synthetic set
    made from a smaller real set (fewer shots) would leave the rest real and quietly lower alpha."""
    uncovered = [s for s in real_labels if s not in sources]
    if not uncovered:
        return
    unexplained = sorted(set(uncovered) - schema.quarantined_items(cfg.synthetic, cfg.endpoint_url))
    if unexplained:
        raise ValueError(
            f"synthetic set {cfg.synthetic} has no images of {len(unexplained)} of the {len(real_labels)} images in "
            f"{cfg.real}/train, and augment did not quarantine them (e.g. {unexplained[:3]}); it was made from "
            "another real set (fewer shots?): augment this real set"
        )


def _apply_filter(cfg: TrainConfig, meta: dict[str, list], class_names: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows of `meta` that pass `synthetic_filter`, and counts of what it dropped per class."""
    from .filters import parse_filter
    from .score import read_scores

    scores_root = storage.join(cfg.synthetic, "scores")
    available: dict[str, set[str]] = {}
    for scorer in storage.list_dirs(scores_root, cfg.endpoint_url):
        manifest = storage.read_manifest(storage.join(scores_root, scorer), cfg.endpoint_url)
        if manifest is not None:
            available[scorer] = set(manifest.get("columns", {}))
    flt = parse_filter(cfg.synthetic_filter, available)
    index = {rid: i for i, rid in enumerate(meta["id"])}
    values: dict[str, np.ndarray] = {}
    for scorer, cols in flt.columns.items():
        table = read_scores(cfg.synthetic, scorer, sorted(cols), cfg.endpoint_url).to_pydict()
        missing = len(index) - len(set(table["id"]) & set(index))
        if missing:
            raise ValueError(f"{scorer} scores of {cfg.synthetic} lack {missing} of its images; re-run "
                             "`ray-dafusion score` (it resumes)")
        order = np.array([index[i] for i in table["id"] if i in index])
        for c in cols:
            column = np.empty(len(index), dtype=float)
            column[order] = np.asarray([v for i, v in zip(table["id"], table[c]) if i in index], dtype=float)
            values[f"{scorer}.{c}"] = column
    keep = flt.mask(values)
    dropped: dict[str, int] = defaultdict(int)
    for label, kept in zip(meta["label"], keep):
        if not kept:
            dropped[class_names[label]] += 1
    return keep, {"expression": cfg.synthetic_filter, "kept": int(keep.sum()), "dropped": int((~keep).sum()),
                  "dropped_per_class": dict(sorted(dropped.items()))}


def exact_split_config():
    """A Ray Train DataConfig that splits every dataset without dropping rows.

    Ray Train's default splits with equal=True, which may drop up to world_size - 1 rows per
    epoch; a dropped chosen row would break "every real example exactly once".
    """
    from ray.train import (
        DataConfig,  # imported here so the module imports without Ray Train
    )

    class ExactSplitDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output: list[dict] = [{} for _ in range(world_size)]
            hints = worker_node_ids if getattr(self, "_enable_shard_locality", False) else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, it in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = it
            return output

    return ExactSplitDataConfig()


@dataclass
class StreamingData:
    """The lazily read datasets of a run and what the workers need to mix them."""

    classes: list
    real_labels: dict[str, int]
    candidates: dict[str, tuple[int, ...]]
    train: Any
    """Ray Dataset: real rows (aug_index -1) and synthetic rows, columns id, source_id, aug_index, label, image_bytes."""
    val: Any
    num_synthetic: int
    rows_per_real: int
    """Union rows per real row: how many rows to read for one batch of chosen rows."""
    union_bytes: int = 0
    """Size of the parquet files of the union (encoded images), to decide whether workers cache it."""
    filtered: dict[str, Any] = field(default_factory=dict)
    """What synthetic_filter kept and dropped (per class), when one is set."""
    files: dict[str, list[str]] = field(default_factory=dict)
    """The parquet files of the real train split, the synthetic set and val (for reading them directly)."""


def streaming_data(cfg: TrainConfig, alpha: float) -> StreamingData:
    """Check the inputs and build the (lazy, streaming) Ray datasets; only ids and labels reach the driver."""
    ep = cfg.endpoint_url

    # 1. real data: class table, splits, labels of the train ids
    classes = schema.read_class_table(cfg.real, ep)
    splits = {s: storage.list_files(storage.join(cfg.real, s), ".parquet", ep, recursive=True) for s in ("train", "val")}
    for split, files in splits.items():
        if not files:
            raise FileNotFoundError(f"no parquet files under {storage.join(cfg.real, split)}")
    ids = storage.read_parquet(storage.join(cfg.real, "train"), ep, columns=["id", "label"]).to_pydict()
    real_labels = dict(zip(ids["id"], ids["label"]))

    # 2. synthetic data, needed exactly when alpha > 0
    synthetic_files: list[str] = []
    candidates: dict[str, tuple[int, ...]] = {}
    filtered: dict[str, Any] = {}
    if alpha > 0:
        if not cfg.synthetic:
            raise ConfigError(f"config field 'synthetic': method {cfg.method} with alpha {alpha} needs a synthetic "
                              "set (the output of `ray-dafusion augment`); or set alpha: 0")
        synthetic_files, candidates, filtered = _synthetic_candidates(cfg, real_labels, [c.name for c in classes])

    # 3. the union for training (block order shuffled; rows are shuffled again in each worker), val as is
    train_ds = storage.ray_dataset(splits["train"], ["id", "label", "image"], ep).map_batches(
        _union_rows, batch_format="pyarrow", fn_kwargs={"synthetic": False}, zero_copy_batch=True)
    if synthetic_files:
        synth_columns = ["id", "source_id", "aug_index", "label", "image"]
        synth_ds = storage.ray_dataset(synthetic_files, synth_columns, ep).map_batches(
            _union_rows, batch_format="pyarrow", fn_kwargs={"synthetic": True}, zero_copy_batch=True)
        train_ds = train_ds.union(synth_ds)
    train_ds = train_ds.randomize_block_order(seed=cfg.seed)
    val_ds = storage.ray_dataset(splits["val"], ["id", "label", "image"], ep).map_batches(
        _union_rows, batch_format="pyarrow", fn_kwargs={"synthetic": False}, zero_copy_batch=True)
    n_synth = sum(len(c) for c in candidates.values())
    return StreamingData(classes, real_labels, candidates, train_ds, val_ds, n_synth,
                         max(1, math.ceil((len(real_labels) + n_synth) / max(len(real_labels), 1))),
                         storage.total_size(splits["train"] + synthetic_files, ep), filtered,
                         {"train": splits["train"], "synthetic": synthetic_files, "val": splits["val"]})


def _checkpoint_uri(cfg: TrainConfig, checkpoint) -> str:
    return f"s3://{checkpoint.path}" if storage.is_s3(cfg.output) else checkpoint.path


@storage.leased("train", lambda cfg: storage.join(cfg.output, cfg.name or cfg.method) if cfg.output else "")
def train(cfg: TrainConfig) -> TrainResult:
    """Train `cfg.method` with Ray Train; re-running the same name and output resumes."""
    cfg.require("real", "output")
    started = time.time()
    meter = CostMeter(cfg.cost)
    alpha, randaugment = method_settings(cfg)
    name = cfg.name or cfg.method
    run_uri = storage.join(cfg.output, name)
    ep = cfg.endpoint_url

    # 1. a finished run of this config and these inputs with at least these epochs: nothing to do
    # (more epochs resume)
    made_of = config_record(cfg, alpha=alpha, **_input_identities(cfg))
    config_fp = storage.fingerprint(made_of)
    _adopt_older_record(run_uri, storage.fingerprint(config_record(cfg, alpha=alpha)), config_fp, made_of, ep)
    done = _finished_run(run_uri, config_fp, cfg.epochs, ep)
    if done is not None:
        return done

    # 2. the streaming datasets (real+synthetic union, val) and the mixing candidates
    data = streaming_data(cfg, alpha)

    # 3. fail early on the driver: weights that cannot load, a run made with another config
    build_model(cfg.arch, len(data.classes), cfg.weights, cfg.backbone, ep)
    if cfg.backbone == "linear_probe" and cfg.weights == "none":
        log.warning("backbone linear_probe with weights none trains a linear head on a frozen, randomly initialised "
                    "%s: give pretrained weights (imagenet, or a state-dict file) or set backbone: finetune", cfg.arch)
    storage.ensure_fresh_output(run_uri, "train", config_fp, cfg.overwrite, ep, made_of)

    # 4. Ray Train: DDP workers with fractional CPUs so Ray Data keeps CPUs for reading
    # (a checkpoint uploaded but not yet recorded when a local run was killed counts here though
    # it trains again: that epoch's decoding tasks then go unbilled)
    fitting, trained_before = time.time(), _epochs_trained(run_uri, ep) if cfg.decode_processes else 0
    result = _fit(cfg, name, data, alpha, randaugment)
    meter.add_actor_seconds((time.time() - fitting) * cfg.num_workers, cfg.cpus_per_worker,
                            1.0 if cfg.use_gpu else 0.0)  # the worker group held its reservation throughout

    # 5. results: best on val and the per-epoch history; the manifest last
    out = _write_results(cfg, name, run_uri, data, result, alpha, randaugment, config_fp, started, meter,
                         trained_before)
    acc = f"{out.best_val_mean_class_acc:.3f}" if out.best_val_mean_class_acc is not None else "n/a"
    log.info("%s: %d epochs (%d optimiser steps) on %d real + %d synthetic images, best val mean per-class "
             "accuracy %s; run, checkpoints and %s in %s (%.1fs)", name, out.epochs_completed, out.optimizer_steps,
             len(data.real_labels), data.num_synthetic, acc, RESULT_FILE, run_uri, out.seconds)
    return out


def _input_identities(cfg: TrainConfig) -> dict[str, Any]:
    """What the run trains on, by content: the config fingerprints of the real set, the synthetic set
    and, with a filter, the score tables it reads. Inputs re-made with another config (a sweep's pool
    from another source, a synthetic set made again) make another run, never a finished one."""
    from .filters import parse_filter

    ep = cfg.endpoint_url
    inputs: dict[str, Any] = {"real": (storage.read_manifest(cfg.real, ep) or {}).get("config_fingerprint")}
    if cfg.synthetic and TRAIN_METHODS[cfg.method].synthetic_mode:
        inputs["synthetic"] = (storage.read_manifest(cfg.synthetic, ep) or {}).get("config_fingerprint")
        if cfg.synthetic_filter:
            scores = storage.join(cfg.synthetic, "scores")
            inputs["scores"] = {scorer: (storage.read_manifest(storage.join(scores, scorer), ep) or {}).get(
                "config_fingerprint") for scorer in sorted(parse_filter(cfg.synthetic_filter, None).columns)}
    return inputs


def _adopt_older_record(run_uri: str, older_fp: str, config_fp: str, made_of: dict[str, Any],
                        ep: Optional[str]) -> None:
    """A run made before train recorded its inputs carries the fingerprint of its config alone
    (`older_fp`). When that is this config's, the run is this one as far as its maker could tell:
    its records are rewritten, once, to the identity with inputs, so it stands (or resumes) as
    before instead of being refused as another config."""
    records = {storage.MANIFEST: storage.read_manifest(run_uri, ep)}
    try:
        records[storage.RUN_RECORD] = storage.read_json(storage.join(run_uri, storage.RUN_RECORD), ep)
    except FileNotFoundError:
        pass
    older = {name: r for name, r in records.items() if r and r.get("config_fingerprint") == older_fp}
    if not older:
        return
    log.info("%s was made before train recorded its inputs: taken as made from the current ones", run_uri)
    for name, record in older.items():
        storage.write_json(storage.join(run_uri, name), {**record, "config_fingerprint": config_fp,
                                                         **({"made_of": made_of} if "made_of" in record else {})}, ep)


def _finished_run(run_uri: str, config_fp: str, epochs: int, ep: Optional[str]) -> Optional[TrainResult]:
    finished = storage.read_manifest(run_uri, ep)
    if not finished or finished.get("config_fingerprint") != config_fp:
        return None
    record = storage.read_json(storage.join(run_uri, RESULT_FILE), ep)
    if record["epochs_completed"] < epochs:
        return None
    log.info("%s is complete (same config, %d epochs); nothing to do", run_uri, record["epochs_completed"])
    return TrainResult(**{f.name: record[f.name] for f in dataclasses.fields(TrainResult) if f.name in record})


@dataclass
class _FitOutcome:
    """Where a fit left its checkpoints: the latest, and the best kept ones with their metrics."""

    latest: Optional[str]
    best: list[tuple[str, dict[str, Any]]]


def _fit(cfg: TrainConfig, name: str, data: StreamingData, alpha: float, randaugment: bool) -> _FitOutcome:
    """Run the loop on a Ray Train worker group, or in this process when num_workers is 0."""
    run_uri = storage.join(cfg.output, name)
    cache = data.union_bytes <= cfg.cache_mb * 2**20
    # Ray Train workers run in their own directory: every local path they are handed is absolute
    def absolute(uri: Optional[str]) -> Optional[str]:
        return storage.absolute(uri) if uri else uri

    worker_cfg = dataclasses.replace(
        cfg, real=absolute(cfg.real), output=absolute(cfg.output), synthetic=absolute(cfg.synthetic),
        weights=cfg.weights if cfg.weights in ("none", "imagenet") else absolute(cfg.weights),
        debug_dir=absolute(cfg.debug_dir), decode_threads=decode_thread_count(cfg))
    loop = {
        "config": worker_cfg.to_dict(), "alpha": alpha, "randaugment": randaugment, "num_classes": len(data.classes),
        "candidates": data.candidates, "classes": [dataclasses.asdict(c) for c in data.classes],
        "rows_per_real": data.rows_per_real, "cache": cache,
        "files": {split: [storage.absolute(u) for u in uris] for split, uris in data.files.items()},
        "passes_per_epoch": passes_per_epoch(len(data.real_labels), cfg.batch_size, cfg.iterations_per_epoch),
    }
    hint = (f"{cfg.num_workers} workers reserve cpus_per_worker {cfg.cpus_per_worker:g}"
            + (" and a GPU each" if cfg.use_gpu else "") + "; lower them, or add nodes")
    _check_same_runner(cfg, run_uri)
    with Watchdog("train", "epoch", cfg.stall_warning, cfg.stall_timeout, hint=hint,
                  probe=checkpoint_probe(run_uri, cfg.endpoint_url), poll_seconds=5.0):
        if cfg.num_workers == 0:
            session = _LocalSession(cfg, run_uri, {"train": data.train, "val": data.val})
            _train_loop(loop, session)
            if not session.records:
                return _FitOutcome(None, [])
            return _FitOutcome(session.records[-1]["path"], [(r["path"], r["metrics"]) for r in session.records])
        with sigint_kept():
            result = _ray_train(cfg, name, data, loop, cache).fit()
    best = [(_checkpoint_uri(cfg, c), m) for c, m in (result.best_checkpoints or [])]
    return _FitOutcome(_checkpoint_uri(cfg, result.checkpoint) if result.checkpoint is not None else None, best)


def _epochs_trained(run_uri: str, ep: Optional[str]) -> int:
    """Epochs held by the run's latest checkpoint before this call trains: 0 for a new run. Both
    runners' checkpoint names sort by when they were made (checkpoint_<epoch>, checkpoint_<time>)."""
    names = sorted(d for d in storage.list_dirs(run_uri, ep) if d.startswith("checkpoint_"))
    for name in reversed(names):
        try:
            return len(storage.read_json(storage.join(run_uri, name, CHECKPOINT_META), ep)["history"])
        except (FileNotFoundError, ValueError, KeyError):  # one being written when an earlier call stopped
            continue
    return 0


def _check_same_runner(cfg: TrainConfig, run_uri: str) -> None:
    """An unfinished run resumes only on the runner that started it: the local loop (num_workers 0)
    keeps its checkpoints in _local_checkpoints.json, Ray Train its own (checkpoint_<time>), and
    neither reads the other's, so a switch would retrain the finished epochs."""
    ep = cfg.endpoint_url
    if cfg.num_workers == 0 and any(d.startswith("checkpoint_") and not d[len("checkpoint_"):].isdigit()
                                    for d in storage.list_dirs(run_uri, ep)):
        started = "Ray Train (num_workers >= 1)"
    elif cfg.num_workers > 0 and storage.exists(storage.join(run_uri, _LocalSession.RECORD), ep):
        started = "num_workers 0"
    else:
        return
    raise ConfigError(
        f"train run {run_uri} was started with {started} and holds its checkpoints; it resumes only on the same "
        f"runner, not with num_workers {cfg.num_workers}: set num_workers back to resume it, or delete {run_uri} to "
        "start it again"
    )


def _ray_train(cfg: TrainConfig, name: str, data: StreamingData, loop: dict[str, Any], cache: bool) -> Any:
    """The TorchTrainer: DDP workers with fractional CPUs so Ray Data keeps CPUs for reading; Ray Data
    datasets only when the union streams (a cached union is read by the workers themselves)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cap = plan.capacity()
    pin = plan.node_pinning(cfg.node_resource, 1.0 if cfg.use_gpu else 0.0, cap, "train")
    plan.check("train", plan.Demand(
        "training workers", cfg.num_workers, {"CPU": cfg.cpus_per_worker, "GPU": 1.0 if cfg.use_gpu else 0.0, **pin},
        size_fields={"cpus_per_worker": cfg.cpus_per_worker, "num_gpus (use_gpu)": 1.0 if cfg.use_gpu else 0.0},
        count_field=None, needs_data_tasks=not cache or cfg.decode_processes > 0), cap)
    fs, path = storage.resolve(cfg.output, cfg.endpoint_url)
    run_config = RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs if storage.is_s3(cfg.output) else None,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep, checkpoint_score_attribute="val_mean_class_acc",
                                           checkpoint_score_order="max"),
    )
    return TorchTrainer(
        _train_loop,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **pin}),
        run_config=run_config,
        **({} if cache else {"datasets": {"train": data.train, "val": data.val},
                             "dataset_config": exact_split_config()}),
    )


def _write_results(cfg: TrainConfig, name: str, run_uri: str, data: StreamingData, result: _FitOutcome, alpha: float,
                   randaugment: bool, config_fp: str, started: float, meter: CostMeter,
                   trained_before: int = 0) -> TrainResult:
    """train_result.json (best checkpoint on val, history) and the manifest, last. The cost adds
    the decoding tasks' seconds (decode_processes) of the epochs this call trained, those after
    `trained_before`."""
    ep = cfg.endpoint_url
    history: list[dict[str, Any]] = []
    if result.latest is not None:  # the history rides in every checkpoint, so it survives resumes
        history = storage.read_json(storage.join(result.latest, CHECKPOINT_META), ep)["history"]
    meter.add_task_seconds(sum(m.get("decode_task_seconds", 0.0) for m in history[trained_before:]), 1.0)
    best_uri, best_acc = None, None
    scored = [(m.get("val_mean_class_acc", -1.0), m.get("epoch", -1), c) for c, m in result.best]
    if scored:
        best_acc, _, best_uri = max(scored, key=lambda t: (t[0], t[1]))
    out = TrainResult(
        output=run_uri, name=name, method=cfg.method, alpha=alpha, best_checkpoint=best_uri,
        best_val_mean_class_acc=best_acc, epochs_completed=len(history), metrics=history,
        seconds=round(time.time() - started, 2), optimizer_steps=sum(int(m.get("steps", 0)) for m in history),
    )
    n_real = len(data.real_labels)
    storage.write_json(storage.join(run_uri, RESULT_FILE), {
        **dataclasses.asdict(out), "config": cfg.to_dict(), "randaugment": randaugment,
        "classes": [dataclasses.asdict(c) for c in data.classes], "real": storage.absolute(cfg.real),
        "synthetic": cfg.synthetic and storage.absolute(cfg.synthetic),
        "num_real_train": n_real, "num_synthetic": data.num_synthetic, "synthetic_filter": data.filtered,
    }, ep)
    storage.write_manifest(run_uri, {
        "stage": "train", "config": cfg.to_dict(), "config_fingerprint": config_fp,
        "counts": {"epochs": len(history), "optimizer_steps": out.optimizer_steps, "real_train": n_real,
                   "synthetic": data.num_synthetic},
        "timings": {"seconds": out.seconds},
        "cost": meter.report(samples=sum(int(m.get("train_samples", 0)) for m in history)), "versions": versions(),
    }, ep)
    return out


callable_stage_module(__name__)  # `from ray_dafusion import train` may give this module: call it as the stage
