"""What runs on the Ray workers of a scoring job: read + decode, and predict (``Predictor`` actors;
with ``decode: actor`` they read and decode too, else ``decode_batch`` runs in tasks before them).

``decode_batch`` reads objects and decodes them exactly like training (``crackscale.data.decode``:
``tf.io.decode_image`` + bilinear ``tf.image.resize`` with the artifact's ``resize_antialias``, rounded to uint8 as
``data.tf_dataset`` feeds the model), with EXIF orientation applied and one error string per bad
file instead of a failed block. JPEGs of models trained without antialiasing (the default) are
decoded without TensorFlow, to the same pixels (``crackscale.jpeg``). ``Predictor`` loads the artifact
once per actor.

Model runtimes: tf.keras (GPU or CPU) and LiteRT/XNNPACK (CPU: 3-4× tf.keras on an AVX2 host, 1.5×
on an AVX-512 one; README "Benchmark"). Both take a batch of RGB images of the artifact's
``image_size`` (uint8 or float32, 0..255) and return P(crack) as float32 of shape (N,). LiteRT is
exported from the artifact's own Keras model, cached by the model's SHA-256, and only used after
its probabilities match tf.keras on sample images within a tolerance (``parity``); otherwise the
scorer falls back to tf.keras with a warning.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

import numpy as np

from crackscale.config import ScoreConfig
from crackscale.data import RESIZE_ANTIALIAS

log = logging.getLogger(__name__)


class Runtime(Protocol):
    name: str

    def predict(self, images: np.ndarray) -> np.ndarray: ...


def configure_tf(use_gpu: bool, threads: int = 0) -> int:
    """Call before the first TF op: GPU memory growth (TF grabs all memory otherwise), thread pools.

    Returns the number of visible GPUs. Safe to call on a CPU-only node (no GPUs: nothing to set).
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as e:  # runtime already initialised in this process
            log.warning("could not enable memory growth on %s: %s", gpu.name, e)
    if use_gpu and not gpus:
        log.warning("use_gpu is set but TensorFlow sees no GPU on this node; running on CPU")
    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        except RuntimeError:
            pass
    return len(gpus)


# images per model call when ``batch_size`` is 0. LiteRT/XNNPACK on CPU runs fastest on small
# batches (their activations stay in cache): on the Zen 4 host, batch 1–8 gave 417–529 img/s and
# batch 64 359–401 (README "Benchmark"). tf.keras (GPU) wants large ones.
DEFAULT_BATCH = {"litert": 4, "tf": 64}


def _pad(images: np.ndarray, n: int) -> np.ndarray:
    """Pad a batch to ``n`` rows so compiled shapes never change (no retracing/reallocation)."""
    if len(images) == n:
        return images
    pad = np.zeros((n - len(images),) + images.shape[1:], dtype=images.dtype)
    return np.concatenate([images, pad])


class TFRuntime:
    """tf.keras in graph mode (``tf.function``), fixed batch shape."""

    name = "tf"

    def __init__(self, model: Any, batch_size: int) -> None:
        import tensorflow as tf

        self.batch_size = batch_size
        self._fn = tf.function(lambda x: model(x, training=False))

    def predict(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            part = images[i: i + self.batch_size]
            x = _pad(part.astype(np.float32, copy=False), self.batch_size)
            out.append(self._fn(x).numpy().reshape(-1)[: len(part)])
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class LiteRTRuntime:
    """An exported ``.tflite`` model on the LiteRT interpreter (XNNPACK delegate, fp32)."""

    name = "litert"

    def __init__(self, model: str | Path | bytes, batch_size: int, threads: int = 0) -> None:
        """``model``: a ``.tflite`` path, or its bytes."""
        from ai_edge_litert.interpreter import Interpreter

        self.batch_size = batch_size
        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        self._it = Interpreter(**source, num_threads=threads or os.cpu_count() or 1)
        inp = self._it.get_input_details()[0]
        self._in = inp["index"]
        self._it.resize_tensor_input(self._in, [batch_size, *inp["shape"][1:]])
        self._it.allocate_tensors()
        self._out = self._it.get_output_details()[0]["index"]

    def predict(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            part = images[i: i + self.batch_size]
            self._it.set_tensor(self._in, _pad(part.astype(np.float32, copy=False), self.batch_size))
            self._it.invoke()
            out.append(self._it.get_tensor(self._out).reshape(-1)[: len(part)].copy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def export_litert(model: Any, path: str | Path) -> Path:
    """Convert a tf.keras model to an fp32 ``.tflite`` file (inference mode, any batch size;
    atomic write).

    Converted from one concrete function whose only tracked state is the model's variables:
    ``TFLiteConverter.from_keras_model`` first writes a Keras SavedModel, tracing every layer's
    call (≈ 21 s for MobileNetV2 here); this way takes ≈ 5 s and yields the same probabilities.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
    holder = tf.Module()
    holder.variables_ = list(model.variables)
    holder.serve = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([holder.serve.get_concrete_function()], holder)
    data = conv.convert()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # concurrent actors on one node may race: last complete file wins
    return path


def sample_images(image_size: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """Deterministic concrete-like images (half with cracks) for parity checks, uint8 NHWC."""
    from PIL import Image

    from crackscale import synth

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, _ = synth.make_image(rng, crack=bool(i % 2), size=max(image_size, 64))
        out.append(np.asarray(img.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8))
    return np.stack(out)


def parity(a: Runtime, b: Runtime, images: np.ndarray) -> float:
    """max |Δp| between two runtimes on ``images``."""
    return float(np.max(np.abs(a.predict(images) - b.predict(images)))) if len(images) else 0.0


def cache_path(cache_dir: str, model_sha256: str) -> Path:
    root = Path(cache_dir or os.path.join(tempfile.gettempdir(), "crackscale-cache"))
    return root / "litert" / f"{model_sha256}.tflite"


def select(model: Any, meta: dict[str, Any], kind: str, batch_size: int, threads: int = 0,
           n_gpus: int = 0, cache_dir: str = "", tolerance: float = 1e-4,
           check_images: np.ndarray | None = None) -> tuple[Runtime, dict[str, Any]]:
    """The runtime to score with and a record of the choice (runtime, parity max |Δp|).

    ``auto``: tf.keras when a GPU is visible (``n_gpus``), else LiteRT if it passes the parity
    check, else tf. ``litert`` forces LiteRT but still refuses it (ValueError) when parity fails.
    """
    tf_rt = TFRuntime(model, batch_size or DEFAULT_BATCH["tf"])
    if kind == "tf" or (kind == "auto" and n_gpus > 0):
        return tf_rt, {"runtime": "tf", "gpus": n_gpus, "parity_max_abs_diff": None}
    sha = str(meta.get("model_sha256") or "")
    path = cache_path(cache_dir, sha) if sha else Path(tempfile.mkdtemp()) / "model.tflite"
    try:
        if not path.is_file():
            log.info("exporting the model to LiteRT: %s", path)
            export_litert(model, path)
        lite = LiteRTRuntime(path, batch_size or DEFAULT_BATCH["litert"], threads)
    except Exception as e:  # converter/interpreter failure: tf.keras still scores correctly
        if kind == "litert":
            raise
        log.warning("LiteRT export/load failed (%s); scoring with tf.keras", e)
        return tf_rt, {"runtime": "tf", "gpus": n_gpus, "parity_max_abs_diff": None}
    images = check_images if check_images is not None else sample_images(int(meta["image_size"]))
    diff = parity(tf_rt, lite, images)
    info = {"runtime": "litert", "gpus": n_gpus, "parity_max_abs_diff": diff, "litert": "converted"}
    if diff > tolerance:
        msg = f"LiteRT export differs from tf.keras by max |Δp| = {diff:.2e} > {tolerance:.0e}"
        if kind == "litert":
            raise ValueError(msg + " (runtime: litert was requested)")
        log.warning("%s; scoring with tf.keras", msg)
        return tf_rt, dict(info, runtime="tf")
    log.info("LiteRT parity with tf.keras: max |Δp| = %.2e on %d images", diff, len(images))
    return lite, info


def artifact_litert(cfg: ScoreConfig) -> tuple[Runtime, dict[str, Any]] | None:
    """The artifact's own LiteRT export (``model.tflite``, checksummed in ``model.json``) if its
    recorded parity with tf.keras is within ``cfg.parity_tolerance``; else None (artifacts from
    before exports were stored, or a failed export: the caller converts and checks instead).

    Starts in well under a second: no TensorFlow import, no Keras load, no conversion.
    """
    from crackscale import artifact

    meta = artifact.read_meta(cfg.model, cfg.storage)
    lit = meta.get("litert") or {}
    diff = lit.get("parity_max_abs_diff")
    if not lit.get("sha256") or diff is None:
        return None
    if diff > cfg.parity_tolerance:
        log.warning("the artifact's LiteRT export differs from tf.keras by max |Δp| = %.2e > %.0e; "
                    "converting again", diff, cfg.parity_tolerance)
        return None
    rt = LiteRTRuntime(artifact.read_litert(cfg.model, meta, cfg.storage), cfg.batch_size or DEFAULT_BATCH["litert"],
                       cfg.threads)
    return rt, {"runtime": "litert", "gpus": 0, "parity_max_abs_diff": diff, "litert": "artifact",
                "parity_images": lit.get("parity_images")}


# ---- Ray Data stages ------------------------------------------------------------------------------

_DECODERS: dict[tuple[int, bool], Any] = {}
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF"}


def _get_object(uri: str, cfg: ScoreConfig) -> bytes:
    """An S3 object's bytes in one GET (pyarrow's streams send a HEAD first: twice the requests).

    Raises FileNotFoundError (no such key), PermissionError or ValueError (an answer about the
    object: its error row), or OSError (transient: throttling, 5xx, connection lost)."""
    import botocore.exceptions as bx
    import urllib3.exceptions

    from crackscale.storage import s3_client

    bucket, _, key = uri[len("s3://"):].partition("/")
    try:
        client = s3_client(cfg.storage, pool=2 * cfg.read_threads)  # two decode calls at a time per actor
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except bx.ClientError as e:
        err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        code, status = str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)
        msg = f"{code or status}: {err.get('Message') or e}"
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            raise FileNotFoundError(uri) from None
        if code in ("AccessDenied", "403") or status == 403:
            raise PermissionError(f"ACCESS_DENIED {msg}") from None
        if status >= 500 or status == 429 or "SlowDown" in code or "Throttl" in code or not status:
            raise OSError(msg) from None
        raise ValueError(msg) from None  # 400, InvalidObjectState, …: about this object
    except (bx.BotoCoreError, urllib3.exceptions.HTTPError, ConnectionError) as e:  # refused, reset, timeout, cut body
        raise OSError(f"{type(e).__name__}: {e}") from None


def _read(uri: str, cfg: ScoreConfig, attempts: int = 3) -> bytes | str:
    """The object's bytes, or an error string (missing/denied object).

    A transient S3 failure (throttling, 5xx, connection reset, timeout) that outlasts the
    client's own retries is retried ``attempts`` times with backoff and then raised: it fails
    the task, and so the run, instead of marking a good image as failed forever (the commit
    protocol would never score it again).
    """
    import time

    from crackscale.storage import S3Settings, StorageError, is_s3, resolve

    for attempt in range(attempts):
        try:
            if is_s3(uri):
                return _get_object(uri, cfg)
            fs, path = resolve(uri)
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return "read: not found"
        except Exception as e:  # permanent (denied, invalid key, local I/O): this image's error row
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            transient = isinstance(e, OSError) and not isinstance(e, PermissionError)
            if not is_s3(uri) or not transient:  # _get_object raises OSError only for transient faults
                return f"read: {msg}"
            if attempt + 1 == attempts:
                raise StorageError(f"cannot read {uri} (endpoint {S3Settings.resolve(cfg.storage).describe()}) "
                                   f"after {attempts} rounds "
                                   f"of retries: {msg}") from None
            time.sleep(2 ** attempt)
    raise AssertionError("unreachable")


def resize_antialias(meta: dict[str, Any]) -> bool:
    """How the artifact's training resized images (artifacts without the key: antialiased)."""
    return bool(meta.get("resize_antialias", True))


TF_IMPORT_CUT_SHORT_EXIT = 75  # exit status of a worker process whose TensorFlow import was cut short


def tf_import_cut_short() -> bool:
    """True in a process where ``import tensorflow`` was interrupted half-way.

    Python drops the failed ``tensorflow`` package but keeps the submodules already loaded, with
    their registries: every later ``import tensorflow`` in the process then fails ("Name
    tf.RaggedTensorSpec has already been registered"). Ray cancels a failed attempt's read/decode
    tasks (KeyboardInterrupt in the worker) and reuses the worker process for later tasks.
    """
    return "tensorflow" not in sys.modules and any(m.startswith("tensorflow.") for m in sys.modules)


def import_tf_or_exit() -> Any:
    """``import tensorflow`` for a Ray task. In a process where an earlier import was cut short and
    importing again fails, the process ends itself (status ``TF_IMPORT_CUT_SHORT_EXIT``): only a
    new process can import TensorFlow, and Ray Data retries a task whose worker died elsewhere."""
    cut_short = tf_import_cut_short()
    try:
        import tensorflow as tf
    except Exception as e:
        if not cut_short:
            raise
        log.error("TensorFlow import was cut short earlier in this process (a cancelled task) and "
                  "fails now (%s: %s); exiting so that the task is retried in a new worker process",
                  type(e).__name__, str(e)[:200])
        logging.shutdown()
        os._exit(TF_IMPORT_CUT_SHORT_EXIT)
    return tf


def _decoder(image_size: int, antialias: bool) -> tuple[Any, Any]:
    """Compiled decoders (one pair per process): bytes + EXIF orientation → uint8 [size, size, 3],
    for one image and for a batch (the same ops in a ``tf.map_fn``: one call per batch saves the
    ≈ 0.5 ms of Python dispatch a per-image call costs, and gives bit-identical pixels)."""
    if (image_size, antialias) in _DECODERS:
        return _DECODERS[image_size, antialias]
    tf = import_tf_or_exit()

    if not _DECODERS:
        try:  # per-image ops: one thread each; parallelism comes from Ray tasks
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
    def orient(img: Any, orientation: Any) -> Any:
        """EXIF orientation 1..8 → upright, as PIL.ImageOps.exif_transpose."""
        def tr(a: Any) -> Any:
            return tf.transpose(a, [1, 0, 2])

        branches = {
            1: lambda: img, 2: lambda: img[:, ::-1], 3: lambda: img[::-1, ::-1], 4: lambda: img[::-1],
            5: lambda: tr(img), 6: lambda: tf.image.rot90(img, 3), 7: lambda: tr(img)[::-1, ::-1],
            8: lambda: tf.image.rot90(img, 1),
        }
        return tf.switch_case(orientation - 1, [branches[k] for k in range(1, 9)])

    def decode(data: Any, orientation: Any) -> Any:
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        img = tf.image.resize(orient(img, orientation), (image_size, image_size), antialias=antialias)
        return tf.cast(tf.round(tf.clip_by_value(img, 0, 255)), tf.uint8)

    one = tf.function(decode, autograph=False,
                      input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32)])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)],
                 autograph=False)
    def many(data: Any, orientation: Any) -> Any:
        return tf.map_fn(lambda x: decode(x[0], x[1]), (data, orientation),
                         fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.uint8))

    _DECODERS[image_size, antialias] = (one, many)
    return one, many


def _clean(e: Exception) -> str:
    """TF's error text without its graph locations (``{{function_node …}}``, ``[[…]]``, ``[Op:…]``)."""
    msg = str(getattr(e, "message", "") or e)
    msg = re.sub(r"\{\{[^}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]", " ", msg, flags=re.S)
    skip = ("Graph execution error", "Detected at node", "File ")  # where the op was defined
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return lines[0] if lines else type(e).__name__


def _header(data: bytes, uri: str, cfg: ScoreConfig) -> tuple[int, str, str]:
    """(EXIF orientation 1..8, "", PIL format) if the object may be decoded, else (0, error, "");
    header only."""
    from PIL import Image, UnidentifiedImageError

    ext = os.path.splitext(uri)[1].lower()
    allowed = {FORMATS[e.lower()] for e in cfg.extensions if e.lower() in FORMATS}
    if ext not in {e.lower() for e in cfg.extensions}:
        return 0, f"unsupported: extension {ext or '(none)'}", ""
    if not data:
        return 0, "empty file", ""
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only: format, size, EXIF
            fmt, (w, h) = im.format, im.size
            fmt = "JPEG" if fmt == "MPO" else fmt  # multi-picture JPEG (cameras, phones): its first picture
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
    except UnidentifiedImageError:
        return 0, "decode: not an image", ""
    except Image.DecompressionBombError as e:  # PIL's own guard (> 2 × its MAX_IMAGE_PIXELS)
        return 0, f"too large: {_clean(e)}", ""
    except Exception as e:  # PIL raises many kinds on garbage headers
        return 0, f"decode: {_clean(e)}", ""
    if fmt not in allowed:
        return 0, f"unsupported: format {fmt}", ""
    if w * h > cfg.max_pixels:
        return 0, f"too large: {w}x{h} pixels > max_pixels {cfg.max_pixels}", ""
    return (orientation if 1 <= orientation <= 8 else 1), "", str(fmt)


def fast_jpeg(cfg: ScoreConfig, antialias: bool) -> bool:
    """Whether JPEGs are decoded without TensorFlow (``crackscale.jpeg``): ``decoder: auto``, a model
    trained without antialiasing, and the check image gives TensorFlow's pixels on this node."""
    if cfg.decoder != "auto" or antialias:
        return False
    from crackscale import jpeg

    return jpeg.available()


def decode_image(data: bytes, uri: str, image_size: int, cfg: ScoreConfig,
                 antialias: bool = RESIZE_ANTIALIAS) -> tuple[np.ndarray | None, str]:
    """(uint8 image, "") or (None, error) for one object; never raises. ``antialias``: the
    artifact's ``resize_antialias`` (as its training resized)."""
    orientation, err, fmt = _header(data, uri, cfg)
    if err:
        return None, err
    if fmt == "JPEG" and fast_jpeg(cfg, antialias):
        from crackscale import jpeg

        img = jpeg.decode(data, image_size, orientation)
        if img is not None:
            return img, ""
    try:
        return _decoder(image_size, antialias)[0](data, orientation).numpy(), ""
    except Exception as e:  # corrupt/truncated data
        return None, f"decode: {_clean(e)}"


def decode_batch(batch: dict[str, np.ndarray], image_size: int, cfg: ScoreConfig,
                 antialias: bool = RESIZE_ANTIALIAS) -> dict[str, np.ndarray]:
    """Ray Data task: read + decode a batch; adds ``image`` (zeros on error) and ``error`` ("" if ok).

    JPEGs are decoded without TensorFlow where ``fast_jpeg`` allows. The other objects whose header
    passes (and JPEGs libjpeg warns about) are decoded by TensorFlow in one call; if that call fails
    (a corrupt body), each is decoded on its own so that only the bad ones get an error.
    """
    from crackscale.storage import is_s3

    uris = [str(u) for u in batch["uri"]]
    if any(is_s3(u) for u in uris):  # latency-bound: many requests at once
        with ThreadPoolExecutor(max_workers=min(cfg.read_threads, max(1, len(uris)))) as pool:
            blobs = list(pool.map(lambda u: _read(u, cfg), uris))
    else:  # local files: a thread pool cost 9× the CPU of reading them in turn (0.16 vs 0.018 ms each)
        blobs = [_read(u, cfg) for u in uris]
    images = np.zeros((len(uris), image_size, image_size, 3), np.uint8)
    errors = [""] * len(uris)
    sizes = np.asarray(batch["size"], dtype=np.int64).copy()
    todo: list[tuple[int, bytes, int]] = []
    fast = fast_jpeg(cfg, antialias)
    if fast:
        from crackscale import jpeg
    for i, (uri, blob) in enumerate(zip(uris, blobs)):
        if isinstance(blob, str):
            errors[i] = blob
            continue
        if sizes[i] < 0:
            sizes[i] = len(blob)
        orientation, errors[i], fmt = _header(blob, uri, cfg)
        if errors[i]:
            continue
        if fast and fmt == "JPEG" and (img := jpeg.decode(blob, image_size, orientation)) is not None:
            images[i] = img
            continue
        todo.append((i, blob, orientation))
    if todo:
        one, many = _decoder(image_size, antialias)
        try:
            images[[i for i, _, _ in todo]] = many([b for _, b, _ in todo], [o for _, _, o in todo]).numpy()
        except Exception:  # at least one corrupt body: find it (them)
            for i, blob, orientation in todo:
                try:
                    images[i] = one(blob, orientation).numpy()
                except Exception as e:
                    errors[i] = f"decode: {_clean(e)}"
    return dict(batch, size=sizes, image=images, error=np.array(errors, dtype=object))


class Predictor:
    """Ray Data actor: loads the artifact once (``loader`` is injectable for tests), then P(crack).

    ``decode`` (the keyword arguments of ``decode_batch``): batches hold URIs, and the actor reads
    and decodes them itself before predicting. Calls may then run two at a time (``actor_calls``; by
    default for objects on S3: one reading while the other predicts); the model runs one batch at a
    time.
    """

    def __init__(self, cfg: ScoreConfig, loader: Callable[..., Any] | None = None,
                 decode: dict[str, Any] | None = None) -> None:
        import threading

        from crackscale import artifact

        self.decode = decode
        self._model_lock = threading.Lock()
        ready = None
        if loader is None and not cfg.use_gpu and cfg.runtime in ("auto", "litert"):
            ready = artifact_litert(cfg)  # the artifact's checked export: no Keras model in this actor
        if ready is None:
            n_gpus = configure_tf(cfg.use_gpu, cfg.threads)  # before the model's first TF op
            loaded = (loader or artifact.load)(cfg.model, cfg.storage)
            ready = select(loaded.model, loaded.meta, cfg.runtime, cfg.batch_size, cfg.threads, n_gpus,
                           cfg.cache_dir, cfg.parity_tolerance)
        self.runtime, self.info = ready
        if decode:  # ready the decoder now, not in the first batch (TF's: after the model set its threads)
            size, aa = int(decode["image_size"]), bool(decode.get("antialias", RESIZE_ANTIALIAS))
            if not fast_jpeg(cfg, aa):  # else TensorFlow is imported only if a PNG/GIF/BMP (or damaged JPEG) comes
                _decoder(size, aa)
        log.info("predictor ready: %s", self.info)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        if self.decode:
            batch = decode_batch(batch, **self.decode)
        errors = np.asarray(batch["error"], dtype=object)
        ok = np.array([not e for e in errors], dtype=bool)
        p = np.full(len(errors), np.nan, np.float32)
        if ok.any():
            with self._model_lock:
                p[ok] = self.runtime.predict(np.asarray(batch["image"])[ok])
        out = {k: v for k, v in batch.items() if k != "image"}
        n = len(errors)
        out.update(crack_probability=p, error=errors,
                   scored_at_us=np.full(n, int(time.time() * 1e6), np.int64),
                   runtime=np.array([self.runtime.name] * n, dtype=object))
        return out
