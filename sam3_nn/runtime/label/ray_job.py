"""The labelling job on Ray Data: one actor per GPU (or per CPU slot), each holding the library.

    images left to do -> ray.data.from_items -> map_batches(LabelActor, batch_size=shard size,
        compute=ActorPoolStrategy(size=actors), num_gpus=...) -> the driver indexes each shard
        -> the same COCO / YOLO-seg files as a one-machine job

Each actor loads the library and weights once, labels one shard's images per call with the
same pipeline as a one-machine job (``job.label_stream``: decoding overlapped with the library's
work) and writes that shard itself; only the driver writes the index, so a killed job resumes
as a local one does (and either kind of run can resume the other's output). The output folder,
the images, the library and the weights must be reachable at the same paths from every node
(a shared filesystem) and sam3_nn installed there (``pip install 'sam3_nn[ray]'``).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional, Sequence

import numpy as np
from tqdm import tqdm

from sam3_nn.runtime.api import Sam3
from sam3_nn.runtime.label.job import (Summary, batches_ahead, check_formats, default_workers, export, label_stream,
                                       pending, progress_bar)
from sam3_nn.runtime.label.export import check_yolo_names
from sam3_nn.runtime.label.infer import BatchLabeler
from sam3_nn.runtime.label.options import ImageItem, LabelError
from sam3_nn.runtime.label.store import ShardStore, run_prefix


class LabelActor:
    """A Ray Data ``map_batches`` callable class: ``spec`` says what to load (``LabelSpec``)."""

    def __init__(self, spec: Dict):
        model = Sam3.load(spec["library"], spec["weights"], device=spec.get("device"),
                          tokenizer=spec.get("tokenizer"))
        self.labeler = BatchLabeler(model, spec["options"], spec.get("batch"), spec.get("exemplars"))
        workers = spec.get("workers") or default_workers()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="label")
        self.ahead = batches_ahead(workers, self.labeler.batch)
        self.store = ShardStore(spec["output"])
        self.prefix = run_prefix(uuid.uuid4().hex[:8])
        self.seq = 0

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        items = [ImageItem(str(k), str(p)) for k, p in zip(batch["key"], batch["path"])]
        records = list(label_stream(self.labeler, items, self.pool, self.ahead))
        self.seq += 1
        name = self.store.write_shard(records, self.prefix, self.seq)
        return {"key": np.array([r["key"] for r in records], dtype=object),
                "status": np.array([r["status"] for r in records], dtype=object),
                "error": np.array([r.get("error", "") for r in records], dtype=object),
                "shard": np.array([name] * len(records), dtype=object)}


def need_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise LabelError("--ray needs Ray Data: pip install 'sam3_nn[ray]'") from None
    return ray


def run_ray_job(spec: Dict, items: Sequence[ImageItem], store: ShardStore, formats: str = "coco",
                polygons: bool = False, shard_size: int = 64, actors: int = 1, gpus_per_actor: float = 0.0,
                cpus_per_actor: float = 1.0, address: Optional[str] = None, retry_errors: bool = False,
                progress: bool = True, log: Callable[[str], None] = print) -> Summary:
    """Label what a previous run left on Ray (``address``: a cluster's ``ray://`` or ``host:port``;
    None: the running instance ``ray.init`` finds, else a new local one), then write the final
    files from all shards. ``spec``: library, weights, tokenizer, device, options, batch,
    exemplars, workers (decode threads per actor); the output folder is added here."""
    ray = need_ray()
    check_formats(formats, polygons)
    if formats in ("yolo-seg", "both"):
        check_yolo_names([it.key for it in items])
    todo = pending(store, items, retry_errors)
    summary = Summary(images=len(items), skipped=len(items) - len(todo))
    if summary.skipped:
        log(f"resuming: {summary.skipped} of {len(items)} images finished before")
    t0 = time.perf_counter()
    if todo:
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, include_dashboard=False, logging_level="warning",
                     log_to_driver=True)
        try:
            _run(ray, dict(spec, output=os.path.abspath(store.root)), todo, store, shard_size, actors,
                 gpus_per_actor, cpus_per_actor, progress, len(items), summary, log)
        finally:
            if started:
                ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    export(store, items, spec["options"], formats, polygons, summary, log)
    return summary


def _run(ray, spec, todo, store, shard_size, actors, gpus, cpus, progress, total, summary, log):
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours shows rate and ETA over the whole job
    ds = ray.data.from_items([{"key": it.key, "path": os.path.abspath(it.path)} for it in todo])
    ds = ds.map_batches(LabelActor, fn_constructor_kwargs={"spec": spec}, batch_size=shard_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=gpus or None, num_cpus=cpus)
    bar = progress_bar(total, summary.skipped, progress)
    say = (lambda s: tqdm.write(s, file=sys.stderr)) if progress else log
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            shards: Dict[str, Dict[str, str]] = {}
            for key, status, error, shard in zip(out["key"], out["status"], out["error"], out["shard"]):
                shards.setdefault(str(shard), {})[str(key)] = str(status)
                if status != "ok":
                    say(f"skipped {key}: {error}")
            for name, statuses in shards.items():
                store.add_to_index(name, statuses)
            summary.processed += len(out["key"])
            bar.update(len(out["key"]))
    finally:
        bar.close()
