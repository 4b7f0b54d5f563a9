"""Fold ensembles and shard inference: load the fold models once, stream many subjects."""
from __future__ import annotations

import gc
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class FoldModel:
    """One fold of one card, ready to predict."""

    card: object
    index: int
    sha256: str
    model: object
    params: dict

    def predict(self, x: np.ndarray) -> np.ndarray:
        m = self.model
        if hasattr(m, "predict_on_batch"):
            return np.asarray(m.predict_on_batch(x))
        return np.asarray(m.predict(x) if hasattr(m, "predict") else m(x))


def configure_tensorflow(threads: int = 0, deterministic: bool = True, seed: int = 0, onednn: bool = True) -> None:
    """Threads, oneDNN, GPU memory growth, determinism. Call before building models; again before the
    next pipeline's models in the same job (threads and memory growth are then kept as they were
    set, the seed is set again, so each pipeline's results do not depend on the ones before it).

    onednn (``inference.onednn``): TensorFlow's oneDNN CPU kernels (``TF_ENABLE_ONEDNN_OPTS``), which
    TensorFlow turns on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX. On an AVX2 CPU they make
    the brain MeshNets' 3D convolutions 2.5-9x faster (and run dilated ones directly); read when
    TensorFlow is imported, so it only takes effect before the process's first TensorFlow import
    (a warning says when it came too late)."""
    import os

    want = "1" if onednn else "0"
    if "tensorflow" not in sys.modules:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = want
    elif os.environ.get("TF_ENABLE_ONEDNN_OPTS", want) != want:
        log.warning("inference.onednn=%s ignored: TensorFlow was imported before with TF_ENABLE_ONEDNN_OPTS=%s",
                    onednn, os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
    import tensorflow as tf

    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    except RuntimeError:  # TensorFlow already initialised by an earlier pipeline of this job
        pass
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    if deterministic:
        tf.keras.utils.set_random_seed(seed)
        try:
            tf.config.experimental.enable_op_determinism()
        except AttributeError:  # older TF
            pass


def load_models(cards: Sequence, store) -> list[list[FoldModel]]:
    """Verify and load every fold of every card (once per job)."""
    from cohortseg.models.loaders import build

    out = []
    for card in cards:
        folds = []
        for i, rf in enumerate(store.resolve(card)):
            folds.append(FoldModel(card=card, index=i, sha256=rf["sha256"], model=build(card, rf),
                                   params=rf["fold"].get("params", {})))
        out.append(folds)
    return out


def release_models() -> None:
    """Free the models of a pipeline whose items are done (the caller dropped its references), so
    the next pipeline of the same job has the GPU memory."""
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].keras.backend.clear_session()
    gc.collect()
    torch = sys.modules.get("torch")  # PyTorch-loaded cards (deepwmh_torch)
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in ("ResourceExhaustedError", "MemoryError") or "OOM" in str(exc)[:2000]


def predict_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int) -> np.ndarray:
    """Predict `x` in batches; halve the batch on out-of-memory down to 1 before giving up."""
    bs = max(1, int(batch_size))
    while True:
        try:
            parts = [np.asarray(fn(x[i:i + bs]), dtype=np.float32) for i in range(0, len(x), bs)]
            return np.concatenate(parts, axis=0)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e) or bs == 1:
                raise
            bs //= 2
            log.warning("out of memory: retrying with batch size %d", bs)


def fold_average(fold_fns: Sequence[Callable], x: np.ndarray, batch_size: int = 8,
                 mirror_axis: int | None = None) -> np.ndarray:
    """Mean of the fold models' predictions (the ensemble every pipeline uses). ``mirror_axis``:
    test-time augmentation, each fold also predicts ``x`` mirrored along that axis (mirrored back)."""
    if not fold_fns:
        raise ValueError("fold_average needs at least one fold")
    views = [(x, None)]
    if mirror_axis is not None:
        views.append((np.ascontiguousarray(np.flip(x, mirror_axis)), mirror_axis))
    acc = None
    for fn in fold_fns:
        for xin, axis in views:
            p = predict_batched(fn, xin, batch_size)
            p = np.flip(p, axis) if axis is not None else p
            acc = p.astype(np.float64) if acc is None else acc + p
    return (acc / (len(fold_fns) * len(views))).astype(np.float32)


def prefetch(loader: Callable, keys: Sequence, depth: int = 2):
    """Yield (key, loaded or exception) in order, loading up to `depth` items ahead in a thread,
    so disk I/O and decompression overlap with the accelerator."""
    if depth <= 0:
        for k in keys:
            try:
                yield k, loader(k)
            except Exception as e:  # noqa: BLE001
                yield k, e
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        for k in keys:
            if stop.is_set():
                return
            try:
                v = loader(k)
            except Exception as e:  # noqa: BLE001
                v = e
            q.put((k, v))
        q.put(None)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while (got := q.get()) is not None:
            yield got
    finally:
        stop.set()


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 3)
