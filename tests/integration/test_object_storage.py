"""Everything under ``storage.path`` on an object store: moto's S3 server on 127.0.0.1 (the session's
``s3`` fixture, IAM auth on), a real HTTP endpoint that pyarrow, Ray Train, Ray Data and Serve's
replicas reach with the credentials in their environment, as a cluster's nodes would.

prepare -> train (a worker SIGKILLed after the step-10 checkpoint, resumed from the bucket) ->
export -> serve the artifact from the bucket -> evaluate, every file checked in the bucket (make
test-slow: tests/e2e/test_isolated.py runs the same flow and checks in make test); and a missing
bucket, refused credentials, an unreachable endpoint each fail before any worker starts, naming the
URI and the cause.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from helpers import read_records, serve_on, tiny_config, train_worker_pids, wait_no_train_workers
from modelfleet import storage
from modelfleet.errors import DataError, StorageError

PORT = 8260  # ours alone (see the other suites' ports)
BUCKET = "modelfleet"
ROOT = f"s3://{BUCKET}/it"


@pytest.fixture(scope="module")
def prepared(ray_session, s3):
    from helpers import TEST_SOURCES
    from modelfleet.cli import build_parser
    from modelfleet.cli.commands import cmd_prepare

    args = build_parser().parse_args(
        [
            "prepare",
            "--preset",
            "tiny",
            "--set",
            f"storage.path={ROOT}",
            "--set",
            f"data.sources={json.dumps(TEST_SOURCES)}",
        ]
    )
    assert cmd_prepare(args) == 0
    return f"{ROOT}/data/tiny"


def test_prepare_writes_shards_and_meta_to_the_bucket(prepared, s3):
    keys = s3.keys(BUCKET, "it/data/tiny/")
    assert "it/data/tiny/meta.json" in keys
    assert any(k.startswith("it/data/tiny/train/part-") for k in keys)
    assert any(k.startswith("it/data/tiny/val/part-") for k in keys)
    assert not os.path.exists("s3:"), "a local directory named after the URI"
    with pytest.raises(DataError, match="already holds data; pass --overwrite"):
        from modelfleet.config import DataConfig
        from modelfleet.data.prepare import prepare_dataset
        from modelfleet.data.tokenizer import ByteTokenizer

        prepare_dataset(DataConfig(sources=["stdlib:json/*.py"], path=prepared), 128, ByteTokenizer())


# make test-slow: the in-process variant of tests/e2e/test_isolated.py's object-store test, which
# runs in make test and checks the same bucket contents (every rank's marker, COMPLETE, result.json,
# LATEST, the rolled metrics, the served artifact, the report and its loss curve) after a node kill
# on share-nothing nodes; a worker kill and its restart are test_training.py's kill drill.
@pytest.mark.slow
def test_s3_train_killed_resumed_exported_served_evaluated(prepared, s3, tmp_path):
    """The S3 variant of train -> resume-after-kill -> export -> serve -> evaluate."""
    from modelfleet.evaluate.batch import evaluate_artifact
    from modelfleet.evaluate.report import run_dir_of, write_report
    from modelfleet.serve.operations import deploy
    from modelfleet.train import train

    cfg = tiny_config(ROOT, prepared, ["deepspeed.zero_stage=3", "storage.run_name=s3run", "train.max_failures=1"])
    run = "it/runs/s3run"
    killed, stop = {}, threading.Event()

    def killer() -> None:
        # By condition: step 10's COMPLETE marker is in the bucket (metrics.jsonl rolls every 5 s,
        # too coarse to find the window before step 20).
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not stop.is_set():
            if f"{run}/step_00000010/COMPLETE" in s3.keys(BUCKET, f"{run}/step_00000010/"):
                workers = train_worker_pids(os.getpid())
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed["pid"] = workers[-1]
                    killed["later_checkpoints"] = [k for k in s3.keys(BUCKET, run) if k.endswith("COMPLETE")]
                    return
            time.sleep(0.1)

    wait_no_train_workers(os.getpid())
    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        res = train(cfg, show_progress=False)
    finally:
        stop.set()
        th.join(timeout=5)
    wait_no_train_workers(os.getpid())
    assert killed, "no worker was killed: the drill did not run"
    assert killed["later_checkpoints"] == [f"{run}/step_00000010/COMPLETE"], killed
    assert res.checkpoint_step == 30 and res.run_dir == f"{ROOT}/runs/s3run"

    keys = set(s3.keys(BUCKET, "it/"))
    for step in (10, 20, 30):
        assert {
            f"{run}/step_{step:08d}/COMPLETE",
            f"{run}/step_{step:08d}/rank-00000.json",
            f"{run}/step_{step:08d}/rank-00001.json",
        } <= keys
    assert {
        f"{run}/metrics.jsonl",
        f"{run}/result.json",
        "it/models/tiny/LATEST",
        "it/models/tiny/v1/model.safetensors",
        "it/models/tiny/v1/manifest.json",
    } <= keys
    records = read_records(res.run_dir)  # the whole run, both attempts, rolled as one object
    assert [r["step"] for r in records if r["kind"] == "resume"] == [10]
    assert max(r["step"] for r in records if r["kind"] == "step") == 30
    result = json.loads(storage.read_text(f"{res.run_dir}/result.json"))
    assert result["step"] == 30 and result["artifact"] == f"{ROOT}/models/tiny/v1"
    assert storage.read_text(f"{ROOT}/models/tiny/LATEST").strip() == "v1"

    # Serve: replicas load the artifact from the bucket.
    with serve_on(PORT):
        deploy(
            {
                "app_name": "s3",
                "route_prefix": "/s3",
                "port": PORT,
                "storage_path": ROOT,
                "ingress": {"num_cpus": 0.05},
                "models": [{"name": "tiny", "artifact": "tiny", "ray_actor_options": {"num_cpus": 0.5}}],
            }
        )
        r = httpx.post(
            f"http://127.0.0.1:{PORT}/s3/v1/completions",
            timeout=120,
            json={"model": "tiny", "prompt": "def main(", "max_tokens": 8, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-modelfleet-artifact"] == "tiny@v1"
        assert r.json()["usage"]["completion_tokens"] == 8

    # Evaluate: Ray Data reads the bucket; the report (JSON + loss curves from metrics.jsonl) lands there.
    ev = evaluate_artifact(res.artifact.uri, prepared)
    assert ev["metrics"]["loss"] < 4.0
    files = write_report(ev, f"{ROOT}/evaluations/tiny-v1", run_dir=run_dir_of(res.artifact.uri, ROOT))
    assert files == [f"{ROOT}/evaluations/tiny-v1/evaluation.json", f"{ROOT}/evaluations/tiny-v1/loss_curves.png"]
    report = json.loads(storage.read_text(files[0]))
    assert report["loss_curve"]["step"][-1] == 30
    print(
        f"\n[s3] killed pid {killed['pid']} after step 10's checkpoint; resumed from 10; "
        f"{len(keys)} objects under it/; eval loss {ev['metrics']['loss']:.3f}"
    )


@pytest.mark.parametrize(
    "change, cause",
    [
        ({"storage": "s3://no-such-bucket/x"}, "the bucket does not exist"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "the credentials were refused"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "the endpoint cannot be reached"),
    ],
)
def test_bad_bucket_credentials_or_endpoint_fail_before_any_worker(prepared, monkeypatch, change, cause):
    from modelfleet.train import train

    root = change.pop("storage", ROOT)
    for k, v in change.items():
        monkeypatch.setenv(k, v)
    cfg = tiny_config(root, prepared, ["storage.run_name=never"])
    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        train(cfg, show_progress=False)
    took = time.monotonic() - t0
    assert f"storage.path: storage {root} cannot be written: {cause}" in str(err.value), err.value
    assert "wrong" not in str(err.value) and os.environ["AWS_ACCESS_KEY_ID"] not in str(err.value)
    assert not train_worker_pids(os.getpid())
    print(f"\n[s3-fail-fast] {cause}: refused in {took:.2f} s")


def test_export_and_evaluate_on_a_missing_bucket_fail_naming_it(prepared, capsys):
    from modelfleet.cli import main

    assert main(["export", "--preset", "tiny", "--set", "storage.path=s3://no-such-bucket/x", "some-run"]) == 2
    assert (
        "storage.path: storage s3://no-such-bucket/x cannot be written: the bucket does not exist"
        in capsys.readouterr().err
    )
    assert main(["evaluate", "tiny", "--storage", "s3://no-such-bucket/x", "--data", prepared]) == 2
    assert (
        "--storage: storage s3://no-such-bucket/x cannot be written: the bucket does not exist"
        in capsys.readouterr().err
    )


def test_serving_from_a_missing_bucket_fails_before_serve_is_touched(s3):
    from modelfleet.serve.operations import deploy

    with pytest.raises(
        StorageError,
        match=r"serve.storage_path: storage s3://no-such-bucket/x cannot be read: "
        r"the bucket does not exist",
    ):
        deploy(
            {
                "app_name": "nope",
                "port": PORT,
                "storage_path": "s3://no-such-bucket/x",
                "models": [{"name": "tiny", "artifact": "tiny"}],
            }
        )
