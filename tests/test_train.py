"""Real Ray Train runs on synthetic data: learning with 1 worker, the artifact, S3, errors
(2 workers on 2 nodes: test_train_jobs.py)."""

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import ODD_SUFFIXES, PY, ROOT, check_learned, last_json, run_job, small_train_config, upload_tree

from crackscale import artifact
from crackscale import model as M
from crackscale.data import labelled
from crackscale.imaging import tfdecode
from crackscale.training import callbacks as train_callbacks
from crackscale.training import driver as train_driver
from crackscale.training import inputs as train_inputs
from crackscale.training import raydata, tfdata

pytestmark = pytest.mark.slow


def test_one_worker_learns_and_writes_a_self_describing_artifact(trained_run):
    # the shared run (conftest.trained_run): jobs/train.py, 1 worker, its own local Ray
    cfg, summary, art = trained_run["cfg"], trained_run["summary"], trained_run["artifact"]
    assert summary["artifact"] == str(art)
    meta = artifact.read_meta(str(art))
    check_learned(summary, meta)
    # two phases ran, epochs numbered consecutively, threshold chosen for the target recall on val
    phases = [h["phase"] for h in meta["history"]]
    assert phases[0] == "head" and phases[-1] == "fine_tune"
    assert [h["epoch"] for h in meta["history"]] == list(range(1, len(phases) + 1))
    assert meta["metrics"]["after"]["val"]["recall"] >= cfg.target_recall
    assert meta["threshold"] == meta["metrics"]["after"]["val"]["threshold"]
    for key in (
        "class_names",
        "crack_class",
        "image_size",
        "preprocessing",
        "config",
        "manifest_hash",
        "versions",
        "model_sha256",
        "data_stats",
    ):
        assert key in meta, key
    assert meta["versions"]["ray"] == "2.60.0" and meta["config"]["image_size"] == 96
    assert meta["resize_antialias"] is False and "antialias=False" in meta["preprocessing"]  # the default
    assert meta["strategy"] == "default (one device)" and meta["num_replicas"] == 1
    for cm in (
        meta["metrics"]["after"]["test"]["confusion_matrix"],
        meta["metrics"]["before"]["test"]["confusion_matrix"],
    ):
        assert set(cm) == {"tn", "fp", "fn", "tp"}
    assert (art / "config.yaml").is_file() and (art / "manifest.csv").is_file()
    assert list((art / "tensorboard").rglob("events.out.tfevents*")), "TensorBoard logs missing"
    # its LiteRT export was checked against tf.keras on real validation images at save time
    lit = meta["litert"]
    assert lit["parity_on"] == "validation images" and lit["parity_images"] >= 16, lit
    assert 0 <= lit["parity_max_abs_diff"] <= 1e-4 and artifact.sha256_file(art / "model.tflite") == lit["sha256"]
    # the artifact alone reproduces the reported test metrics
    loaded = artifact.load(str(art))
    prepared = labelled.scan(cfg)
    assert prepared.manifest_hash == meta["manifest_hash"]
    ds = tfdata.tf_dataset(
        prepared.images["test"], prepared.labels["test"], 96, 64, False, 0, False, antialias=meta["resize_antialias"]
    )
    p = M.predict(loaded.model, ds)
    m = M.metrics(np.array(prepared.labels["test"]), p, meta["threshold"])
    assert m["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    # a run name is never silently reused (refused before Ray starts)
    with pytest.raises(Exception, match="already exists"):
        train_driver.run(cfg)


def test_phase_lr_warms_up_then_decays():
    lrs = [train_callbacks.phase_lr(1e-3, i, 4, cosine=True) for i in range(4)]
    assert lrs[0] == pytest.approx(1e-3) and all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
    assert lrs[2] == pytest.approx(0.5e-3)
    warm = [train_callbacks.phase_lr(1e-3, i, 6, cosine=True, warmup=2) for i in range(6)]
    assert warm[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3]) and warm[4] == pytest.approx(0.5e-3)
    assert [train_callbacks.phase_lr(1e-3, i, 3, cosine=False, warmup=1) for i in range(3)] == pytest.approx(
        [0.5e-3, 1e-3, 1e-3]
    )


def test_weight_averaging_means_the_last_epochs_then_recomputes_batchnorm(tmp_path):
    import types

    import tensorflow as tf

    k = M.keras()
    tf.keras.utils.set_random_seed(0)
    inputs = k.Input((4,))
    mdl = k.Model(inputs, k.layers.Dense(1)(k.layers.BatchNormalization(momentum=0.9)(k.layers.Dense(3)(inputs))))
    mdl.compile(optimizer=k.optimizers.SGD(0.1), loss="mse")
    x = np.random.default_rng(0).normal(2.0, 3.0, (40, 4)).astype(np.float32)
    y = x.sum(axis=1, keepdims=True)
    seen: list[list[np.ndarray]] = []
    snapshot = k.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(mdl.get_weights()))
    mdl.fit(x, y, batch_size=10, epochs=3, shuffle=False, verbose=0, callbacks=[snapshot])

    # a resumed phase: epoch 3's weights come from the checkpoint, epochs 4 and 5 are trained now
    train_callbacks.save_averaged([(2, seen[1]), (3, seen[2])], str(tmp_path))
    initial = train_callbacks.load_averaged(str(tmp_path))
    assert [e for e, _ in initial] == [2, 3] and all(np.array_equal(a, b) for a, b in zip(initial[1][1], seen[2]))
    es, state, recomputed = types.SimpleNamespace(best_weights=None), {}, []
    averager = train_callbacks.Averager(3, es, state, initial, recomputed.append)
    mdl.fit(x, y, batch_size=10, epochs=5, initial_epoch=3, shuffle=False, verbose=0, callbacks=[snapshot, averager])
    for got, a, b, c in zip(mdl.get_weights(), seen[2], seen[3], seen[4]):
        np.testing.assert_allclose(got, (a + b + c) / 3, rtol=1e-5)
    assert not np.allclose(seen[3][0], seen[4][0]) and recomputed == [mdl]
    assert state["averaged_epochs"] == [3, 4, 5] and es.best_weights is not None

    bn = mdl.layers[2]
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(10).repeat()
    train_callbacks.recompute_batchnorm(mdl, tf.distribute.get_strategy(), batches, 4)
    h = mdl.layers[1](x).numpy().reshape(4, 10, 3)  # the BatchNorm input, per batch
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(axis=1).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(axis=1).mean(axis=0), rtol=1e-3)
    assert bn.momentum == 0.9


def test_training_and_evaluation_resize_as_configured(synth_data):
    """`resize_antialias` reaches the training input pipeline and the evaluation that sets the
    threshold, and Ray Data ingest's decode gives the same pixels."""
    import tensorflow as tf

    from crackscale.config.loader import replace
    from crackscale.config.train import TrainConfig

    pos = sorted((synth_data / "Positive").glob("*.jpg"))[:2]
    neg = sorted((synth_data / "Negative").glob("*.jpg"))[:2]
    images, labels = [p.read_bytes() for p in pos + neg], [1, 1, 0, 0]
    mean_pixel = lambda x, training: tf.reduce_mean(x, axis=[1, 2, 3]) / 255.0  # noqa: E731 (a stand-in model)
    decoded = {aa: np.stack([tf.round(tfdecode.decode(b, 96, aa)).numpy() for b in images]) for aa in (False, True)}
    assert np.abs(decoded[True] - decoded[False]).max() > 10  # the two resizes differ on these images
    for aa in (False, True):
        cfg = replace(TrainConfig(), image_size=96, batch_size=4, resize_antialias=aa)
        x = next(iter(train_inputs.distributed(tf.distribute.get_strategy(), images, labels, cfg, training=False)))[0]
        np.testing.assert_array_equal(x.numpy(), decoded[aa])
        p = M.predict(mean_pixel, train_inputs.in_order(cfg, images, labels))
        np.testing.assert_allclose(p, decoded[aa].mean(axis=(1, 2, 3)) / 255.0, rtol=1e-5)
        rows = {"uri": np.array([str(f) for f in pos + neg]), "label": np.array(labels)}
        got = raydata.decode_rows(rows, 96, aa, {})
        np.testing.assert_array_equal(got["image"], decoded[aa].astype(np.uint8))
        assert got["label"].tolist() == labels and got["uri"].tolist() == rows["uri"].tolist()


def test_s3_data_in_artifact_out(ray_local, s3_server, s3_bucket, synth_data, tmp_path):
    upload_tree(s3_server, synth_data, s3_bucket, "inspections/train")
    cfg = small_train_config(
        f"s3://{s3_bucket}/inspections/train",
        tmp_path,
        name="s3run",
        head_epochs=2,
        fine_tune_epochs=1,
        limit_per_class=60,
        storage_path=f"s3://{s3_bucket}/runs",
        mixed_precision="true",  # float16 training runs on CPU too (slowly): its code path, here
    )
    summary = train_driver.run(cfg)
    assert summary["artifact"] == f"s3://{s3_bucket}/runs/s3run/model"
    loaded = artifact.load(summary["artifact"])
    assert loaded.meta["config"]["data"][0]["uri"].startswith("s3://") and loaded.meta["history"]
    # trained in float16 compute, stored as a float32 model
    assert loaded.meta["mixed_precision"]["training"] is True and loaded.model.dtype_policy.name == "float32"
    assert loaded.model.predict(np.zeros((2, 96, 96, 3), np.float32), verbose=0).shape == (2, 1)
    import boto3

    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket, Prefix="runs/s3run/")[
            "Contents"
        ]
    ]
    assert any("/checkpoint_" in k for k in keys), "no checkpoints in the S3 run storage"
    assert "runs/s3run/crackscale/manifest.csv" in keys


def test_tampered_artifact_is_refused(model_artifact, tmp_path):
    import shutil

    art = tmp_path / "model"
    shutil.copytree(model_artifact["uri"], art)
    meta = json.loads((art / "model.json").read_text())
    meta["model_sha256"] = "0" * 64
    (art / "model.json").write_text(json.dumps(meta))
    with pytest.raises(artifact.ArtifactError, match="does not match the checksum"):
        artifact.load(str(art))


PER_DEVICE_DATASETS = """
import json, sys
import tensorflow as tf
from tensorflow.python.data.ops import multi_device_iterator_ops as mdi
from crackscale.training import tfdata
from crackscale.training import callbacks as train_callbacks
from crackscale.training import inputs as train_inputs
from crackscale.training import raydata
from crackscale.training import strategy as train_strategy
from crackscale.config.loader import replace
from crackscale.config.train import TrainConfig

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
if sys.argv[1] == "patched":
    train_strategy._per_device_datasets_without_autotune()
    train_strategy._per_device_datasets_without_autotune()  # idempotent: wrapped once
build, seen, sources = mdi._create_device_dataset, [], []
mdi._create_device_dataset = lambda *a, **k: seen.append(build(*a, **k)) or seen[-1]
tf_dataset = tfdata.tf_dataset
tfdata.tf_dataset = lambda *a, **k: sources.append(tf_dataset(*a, **k)) or sources[-1]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
images = [open(p, "rb").read() for p in sys.argv[2:]]
cfg = replace(TrainConfig(), image_size=32, batch_size=4)
x = next(iter(train_inputs.distributed(strategy, images, [0, 1, 0, 1], cfg, training=True)))[0]
next(iter(train_inputs.distributed(tf.distribute.get_strategy(), images, [0, 1, 0, 1], cfg, training=True)))
inner = [c.cell_contents for c in build.__closure__ or ()]  # what the wrapper wraps
print(json.dumps({"wrapped_once": getattr(build, "crackscale_no_autotune", False) and
                  not any(getattr(f, "crackscale_no_autotune", False) for f in inner if callable(f)),
                  "replicas": len(strategy.experimental_local_results(x)),
                  "per_device_autotune": [d.options().autotune.enabled for d in seen],
                  "source_autotune": [d.options().autotune.enabled for d in sources]}))
"""


@pytest.mark.parametrize("mode", ["patched", "tensorflow default"])
def test_distributed_input_pipelines_run_without_tf_data_autotuning(mode, synth_data):
    """The autotuning thread of a tf.data iterator stalls its teardown (up to 60 s at each phase
    change, see tfdata.no_autotune_options). Under a multi-device strategy (MirroredStrategy over 2
    logical CPUs here, as over 2 GPUs; MWMS alike) our pipelines turn it off, and so do the
    per-device datasets the strategy builds. Single-device pipelines keep it (faster here)."""
    imgs = [str(p) for p in sorted((synth_data / "Positive").glob("*.jpg"))[:4]]
    r = subprocess.run(
        [PY, "-c", PER_DEVICE_DATASETS, mode.split()[0], *imgs], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    # under the strategy: off; on one device (the default strategy): TensorFlow's default
    assert out["replicas"] == 2 and out["source_autotune"] == [False, None]
    if mode == "patched":
        assert out["per_device_autotune"] == [False, False] and out["wrapped_once"]
    else:  # what the patch is for: TensorFlow's own per-device datasets keep the default (autotune on)
        assert out["per_device_autotune"] == [None, None] and not out["wrapped_once"]


MIRRORED_RAY_DATA = """
import json, sys
import numpy as np
import ray, ray.data, ray.train
import tensorflow as tf
from crackscale import model as M
from crackscale.config.loader import replace
from crackscale.config.train import TrainConfig
from crackscale.training import callbacks as train_callbacks
from crackscale.training import inputs as train_inputs
from crackscale.training import raydata

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
ray.init(num_cpus=2, include_dashboard=False)
cfg = replace(TrainConfig(), image_size=32, alpha=0.35, weights="none", batch_size=8, head_epochs=2, seed=3)
uris = sys.argv[1:]
labels = [int("/Positive/" in u) for u in uris]
ds = ray.data.from_items([{"uri": u, "label": y} for u, y in zip(uris, labels)]).map_batches(
    raydata.decode_rows,
    batch_format="numpy",
    fn_kwargs={"image_size": cfg.image_size, "antialias": False, "storage_cfg": {}},
).materialize()
pulled = []
class Counting:
    # the shard iterator a Train worker gets, counting the rows it hands out
    def __init__(self, it):
        self.it = it
    def iter_batches(self, **kw):
        for b in self.it.iter_batches(**kw):
            pulled.append(len(b["label"]))
            yield b
ray.train.get_dataset_shard = lambda name: Counting(ds.iterator())
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
source = train_inputs.RayDataSplits({"rows": {"train": len(uris)}}, cfg, 1, autotune=False)
data, steps = source.fit_data(strategy, "train", training=True)
with strategy.scope():
    mdl, base = M.build(cfg)
    M.set_phase(cfg, mdl, base, "head")
seen = []
class Steps(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        seen.append(batch)
hist = mdl.fit(data, epochs=2, steps_per_epoch=steps, callbacks=[Steps()], verbose=0)
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "steps": steps, "steps_run": len(seen),
                  "batch_sizes": sorted(set(pulled)), "rows_pulled": sum(pulled), "loss": hist.history["loss"]}))
ray.shutdown()
"""


def test_mirrored_strategy_in_one_worker_trains_from_a_ray_data_shard(synth_data):
    """ingest: ray_data inside one worker with several devices (MirroredStrategy over 2 logical
    CPUs here, as over a node's GPUs): each step takes a per-replica batch for every replica from
    the shard, an epoch is the shard once, and the model trains."""
    uris = [str(p) for c in ("Negative", "Positive") for p in sorted((synth_data / c).glob("*.jpg"))[:24]]
    r = subprocess.run([PY, "-c", MIRRORED_RAY_DATA, *uris], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    # 48 rows, global batch 8 = 4 per replica x 2 replicas: 6 steps an epoch
    assert out["replicas"] == 2 and out["steps"] == 6 and out["steps_run"] == 12
    # per-replica batches from the shard, at least two passes of it (prefetching reads ahead)
    assert out["batch_sizes"] == [4] and out["rows_pulled"] >= 2 * 48
    assert all(np.isfinite(out["loss"]))


TRAINER_WITHOUT_TF = """
import json, os, sys
import ray
from ray import cloudpickle
from crackscale.training import callbacks as train_callbacks
from crackscale.training import inputs as train_inputs
from crackscale.training import raydata
from crackscale.training import strategy as train_strategy
from crackscale.training import driver as train_driver
from crackscale.training import backend as train_backend
from crackscale.config.train import TrainConfig

ray.init(num_cpus=1, include_dashboard=False)
trainer = train_driver.make_trainer(TrainConfig(num_workers=2), {})
cloudpickle.loads(cloudpickle.dumps(trainer))  # what the Train controller receives
train_backend.set_tf_config(["10.0.0.1:1234", "10.0.0.2:5678"], 1)
print(json.dumps({"tf": "tensorflow" in sys.modules, "TF_CONFIG": json.loads(os.environ["TF_CONFIG"]),
                  "legacy": os.environ["TF_USE_LEGACY_KERAS"], "backend": type(trainer.backend_config).__name__}))
ray.shutdown()
"""


def test_building_the_trainer_does_not_import_tensorflow():
    # the driver (a Tune trial's) and the Train controller never run a TF op: no 5 s import there
    r = subprocess.run(
        [PY, "-c", TRAINER_WITHOUT_TF],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, RAY_ADDRESS="local"),
    )  # its own Ray
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json(r.stdout)
    assert out["tf"] is False and out["backend"] == "MWMSConfig" and out["legacy"] == "1"
    assert out["TF_CONFIG"] == {
        "cluster": {"worker": ["10.0.0.1:1234", "10.0.0.2:5678"]},
        "task": {"type": "worker", "index": 1},
    }


def test_odd_file_names_through_train_report_and_score(trained_run, odd_named_data, ray_local, tmp_path):
    """File names with a quote, a comma, é, a space and a newline keep their exact path through the
    shared real training run (its manifest and test predictions, written and read by ``csv``), its
    report (every test image it shows is found) and a scoring run over the same folder."""
    import csv

    from crackscale import query
    from crackscale.config.score import ScoreConfig
    from crackscale.scoring import run as scoring_run

    art = trained_run["artifact"]
    files = {str(p) for p in odd_named_data.rglob("*.jpg")}
    odd = {f for f in files if any(s in f for s in ODD_SUFFIXES)}
    assert len(odd) == len(files) // 3 and all(any(s in f for f in odd) for s in ODD_SUFFIXES)
    with open(art / "manifest.csv", newline="", encoding="utf-8") as f:
        assert {row["uri"] for row in csv.DictReader(f)} == files
    with open(art / "test_predictions.csv", newline="", encoding="utf-8") as f:
        tested = {row["uri"] for row in csv.DictReader(f)}
    assert tested <= files and tested & odd, sorted(tested)[:5]
    page = (art / "report" / "index.html").read_text(encoding="utf-8")
    assert "image unavailable" not in page and 'quote"d' not in page  # shown names are escaped

    out = tmp_path / "scores"
    s = scoring_run.run(
        ScoreConfig(model=str(art), input=str(odd_named_data), output=str(out), cache_dir=str(tmp_path / "c"))
    )
    assert (s["scored"], s["failed"]) == (len(files), 0), s
    rows = query.open_scores(str(out)).to_table(columns=["uri", "error"]).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(files) and not any(r["error"] for r in rows)


def test_benchmark_flips_prints_each_view_count_against_one_threshold_rule(trained_run):
    """jobs/benchmark_flips.py: 1, 2 and 4 averaged views of the artifact's own validation and test
    images, each with the threshold for its target recall picked on validation; the 1-view row
    is the artifact's recorded test result."""
    out = run_job(["jobs/benchmark_flips.py", str(trained_run["artifact"])], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = last_json(out.stdout)
    meta = artifact.read_meta(str(trained_run["artifact"]))
    assert [row["views"] for row in r["rows"]] == [1, 2, 4]
    one = r["rows"][0]
    recorded = meta["metrics"]["after"]["test"]
    assert one["threshold"] == pytest.approx(meta["threshold"], abs=1e-3)
    assert one["test_accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-9)
    for row in r["rows"]:
        n_wrong = round((1 - row["test_accuracy"]) * r["test_images"])
        assert len(row["wrong"]) == n_wrong and all(w["label"] in (0, 1) for w in row["wrong"])
