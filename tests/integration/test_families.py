"""Model families end to end on real Ray Train + DeepSpeed ZeRO-3 (CPU, 2 workers): prepare the
offline dataset, train, export, evaluate on the held-out test split with Ray Data, serve over
real HTTP (port 8250), k-fold, and the quality gate.

One training run per family, shared by the module (trained on first use)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from modelfleet.families.artifact import load_artifact

PORT = 8250  # also test_hf_family's: serve_on waits for the port and Serve to be free
BASE = f"http://127.0.0.1:{PORT}"
PRESETS = {"cnn": "digits-cnn", "linear": "diabetes-linear", "lstm": "topics-lstm", "mf": "interactions-mf"}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def runs(ray_session, storage):
    """family -> (config, run), each prepared, trained and exported once, on first use, through the
    commands a user types (`modelfleet prepare`, `train --no-export`, `export`) on the shared Ray;
    ``data.path`` is left to the preset: ``<storage>/data/<preset>``."""
    from modelfleet import registry
    from modelfleet.cli import main
    from modelfleet.presets import load_config
    from modelfleet.storage import StorageLayout

    done: dict[str, tuple] = {}

    def get(family: str):
        if family not in done:
            preset = PRESETS[family]
            args = ["--preset", preset, "--set", f"storage.path={storage}", "--set", f"storage.run_name={preset}"]
            assert main(["prepare", *args]) == 0
            assert main(["train", *args, "--no-export"]) == 0
            assert registry.versions(str(storage), preset) == []  # --no-export published nothing
            assert main(["export", preset, *args]) == 0
            cfg = load_config(preset=preset, overrides=args[3::2])
            run = SimpleNamespace(
                run_dir=StorageLayout(str(storage)).run(preset), artifact=registry.resolve(str(storage), preset)
            )
            done[family] = (cfg, run)
        return done[family]

    return get


def _evaluate(runs, family: str) -> dict:
    from modelfleet.cli import main
    from modelfleet.storage import StorageLayout

    cfg, res = runs(family)
    assert res.artifact is not None, "training left no artifact"
    manifest = json.loads(Path(res.artifact.uri, "manifest.json").read_text())
    assert manifest["family"] == family and manifest["config"]["deepspeed"]["zero_stage"] == 3
    assert manifest["export_max_abs_logit_diff"] <= 1e-4  # the artifact reproduces the live engine
    storage = str(Path(cfg.storage.path))
    assert (
        main(["evaluate", f"{res.artifact.name}@{res.artifact.version}", "--data", cfg.data.path, "--storage", storage])
        == 0
    )
    label = f"{res.artifact.name}-{res.artifact.version}"
    out = json.loads(Path(StorageLayout(storage).evaluation(label), "evaluation.json").read_text())
    print(family, json.dumps({k: v for k, v in out["metrics"].items() if k not in ("per_class", "confusion_matrix")}))
    return out["metrics"]


# ---------------------------------------------------------------- quality bars on held-out data


def test_cnn_digits_accuracy_at_least_095(runs):
    m = _evaluate(runs, "cnn")
    assert m["n"] >= 300 and np.array(m["confusion_matrix"]).sum() == m["n"]
    assert m["accuracy"] >= 0.95, m
    assert m["f1_macro"] >= 0.94 and len(m["per_class"]) == 10


def test_linear_diabetes_r2_at_least_04(runs):
    m = _evaluate(runs, "linear")
    assert m["r2"] >= 0.4, m
    assert m["mae"] < 60  # the target's own units (disease progression, std ~77)


def test_lstm_topics_accuracy_well_above_chance(runs):
    m = _evaluate(runs, "lstm")
    # Four topics: chance is 0.25; a third of each sentence's words carry its topic.
    assert m["accuracy"] >= 0.8, m


def test_mf_recall_at_10_well_above_chance(runs):
    m = _evaluate(runs, "mf")
    # Chance recall@10 is 10/120 = 0.083; users draw 80% of their items from one item group.
    assert m["chance_recall@10"] < 0.1
    assert m["recall@10"] >= 3 * m["chance_recall@10"], m
    assert m["ndcg@10"] > m["chance_recall@10"]


def test_tabular_transform_is_fitted_on_train_only_and_saved_with_the_artifact(runs):
    from modelfleet.data.families import read_raw

    cfg, res = runs("linear")
    train_raw = read_raw(cfg.data.path, "train")
    _, transform, _ = load_artifact(res.artifact.uri)
    kinds = {s["type"].rsplit(".", 1)[-1] for s in transform.state["steps"]}
    assert {"simple_imputer", "standard_scaler", "min_max_scaler", "one_hot_encoder"} <= kinds, kinds
    imputed = next(s["stats"] for s in transform.state["steps"] if "mean(bmi)" in s["stats"])
    # The imputer's mean is the training split's mean (test rows never leak into it).
    assert imputed["mean(bmi)"] == pytest.approx(train_raw["bmi"].mean())
    full = np.concatenate([train_raw["bmi"], read_raw(cfg.data.path, "test")["bmi"]])
    assert imputed["mean(bmi)"] != pytest.approx(np.nanmean(full), rel=1e-9)
    # A missing value is imputed, then scaled: the row equals the row with bmi set to the mean.
    row = train_raw.drop(columns=["target"]).iloc[[0]].copy()
    row["bmi"] = np.nan
    filled = row.copy()
    filled["bmi"] = train_raw["bmi"].mean()
    np.testing.assert_allclose(transform.features(row), transform.features(filled), rtol=1e-6, atol=1e-6)
    assert transform.features(row).shape[1] == 11  # 9 numeric + sex one-hot (2)


# ---------------------------------------------------------------- serving over HTTP


@pytest.fixture(scope="module")
def served(runs, storage):
    """One Serve app (port 8250) serving the four trained artifacts by registry name."""
    from helpers import serve_on
    from modelfleet.serve.operations import deploy

    models = []
    for family in PRESETS:
        _, res = runs(family)
        models.append(
            {
                "name": family,
                "artifact": f"{res.artifact.name}@{res.artifact.version}",
                "ray_actor_options": {"num_cpus": 0.25},
                "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.2},
            }
        )
    with serve_on(PORT):
        deploy(
            {
                "app_name": "families",
                "route_prefix": "/families",
                "port": PORT,
                "storage_path": str(storage),
                "ingress": {"num_cpus": 0.05},
                "models": models,
            }
        )
        yield f"{BASE}/families"


def _predict(client: httpx.Client, url: str, model: str, instances: list) -> httpx.Response:
    return client.post(f"{url}/v1/models/{model}/predict", json={"instances": instances})


def _in_process(runs, family: str, instances: list[dict]) -> list[dict]:
    from modelfleet.families import get_family

    _, res = runs(family)
    model, transform, _ = load_artifact(res.artifact.uri)
    fam = get_family(family)
    schema = fam.request_model(transform)
    return fam.predict(model, transform, [schema.model_validate(i) for i in instances])


def test_predict_endpoint_serves_every_family_over_http(runs, served):
    from modelfleet.data.families import read_raw

    cnn_cfg, _ = runs("cnn")
    test = read_raw(cnn_cfg.data.path, "test").iloc[:16]
    images = [{"image": np.asarray(img).reshape(28, 28).round(3).tolist()} for img in test["image"]]
    lin_cfg, _ = runs("linear")
    rows = read_raw(lin_cfg.data.path, "test").iloc[:4].drop(columns=["target"])
    records = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        for r in rows.to_dict("records")
    ]
    records[0]["bmi"] = None  # a missing value is imputed at serving time as in training
    with httpx.Client(timeout=120) as c:
        r = _predict(c, served, "cnn", images)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert len(preds) == 16 and r.json()["model"] == "cnn"
        hits = sum(p["label"] == str(y) for p, y in zip(preds, test["label"]))
        assert hits >= 14, (hits, [p["label"] for p in preds], test["label"].tolist())
        assert [p["label"] for p in preds] == [p["label"] for p in _in_process(runs, "cnn", images)]
        assert abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-3

        r = _predict(c, served, "linear", records)
        assert r.status_code == 200, r.text
        served_values = [p["value"] for p in r.json()["predictions"]]
        local = [p["value"] for p in _in_process(runs, "linear", records)]
        np.testing.assert_allclose(served_values, local, rtol=1e-5)
        assert all(25 <= v <= 350 for v in served_values)  # the target's own units

        r = _predict(
            c,
            served,
            "lstm",
            [
                {"text": "the coach saw the team score a goal in the match"},
                {"text": "bake the bread and add cheese to the soup"},
            ],
        )
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == ["sports", "food"]

        mf_cfg, _ = runs("mf")
        seen = set(json.loads(Path(mf_cfg.data.path, "transform.json").read_text())["seen"][7])
        r = _predict(c, served, "mf", [{"user": 7, "k": 5}])
        assert r.status_code == 200, r.text
        items = r.json()["predictions"][0]["items"]
        assert len(items) == 5 and not seen & set(items)
        scores = r.json()["predictions"][0]["scores"]
        assert scores == sorted(scores, reverse=True)


def test_predict_validation_errors_are_422_naming_the_field(served):
    cases = [
        ("cnn", [{"image": [[0.0] * 28] * 27}], "instances.0.image"),
        ("cnn", [{"image": [[0.0] * 28] * 28, "extra": 1}], "instances.0.extra"),
        ("linear", [{"age": 50, "bmx": 1.0}], "instances.0.bmx"),
        ("linear", [{"age": 50}, {"bmi": "heavy"}], "instances.1.bmi"),
        ("lstm", [{"text": ""}], "instances.0.text"),
        ("mf", [{"user": 10_000}], "instances.0.user"),
        ("mf", [], "instances"),
    ]
    with httpx.Client(timeout=60) as c:
        for model, instances, field in cases:
            r = _predict(c, served, model, instances)
            assert r.status_code == 422, (model, field, r.status_code, r.text)
            err = r.json()["error"]
            assert err["param"] == field and err["message"].startswith(field), (model, err)
        r = c.post(f"{served}/v1/models/cnn/predict", json={"inputs": []})
        assert r.status_code == 422 and r.json()["error"]["param"] == "inputs"
        r = _predict(c, served, "nope", [{"user": 1}])
        assert r.status_code == 404 and "mf" in r.json()["error"]["message"]
        assert _predict(c, served, "mf", [{"user": 1}]).status_code == 200  # the replica still answers


def test_non_finite_huge_and_edge_inputs_are_4xx_and_the_replicas_survive(runs, served):
    """inf/NaN/huge numbers, k at and past the catalogue size, a deeply nested body and a text
    route addressed to a predict model: each a 4xx naming what was wrong (or, for k equal to the
    catalogue, finite scores), never a 500; the same replicas answer afterwards."""
    mf_cfg, _ = runs("mf")
    n_items = json.loads(Path(mf_cfg.data.path, "transform.json").read_text())["num_items"]
    raw = {"content-type": "application/json"}
    with httpx.Client(timeout=60) as c:
        pids = {
            m: _predict(c, served, m, body).headers["x-modelfleet-replica-pid"]
            for m, body in (("linear", [{"age": 50}]), ("mf", [{"user": 1}]))
        }
        cases = [
            ("linear", b'{"instances": [{"age": 1e400}]}', 422, "instances.0.age"),
            ("linear", b'{"instances": [{"age": NaN}]}', 422, "instances.0.age"),
            ("linear", b'{"instances": [{"bmi": -Infinity}]}', 422, "instances.0.bmi"),
            ("linear", b'{"instances": [{"age": 1e300}]}', 422, "instances.0.age"),
            ("cnn", b'{"instances": [{"image": [[1e400]]}]}', 422, "instances.0.image"),
            ("mf", f'{{"instances": [{{"user": 1, "k": {n_items + 1}}}]}}'.encode(), 422, "instances.0.k"),
            ("mf", b'{"instances": ' + b"[" * 300 + b"]" * 300 + b"}", 422, "instances"),
        ]
        for model, body, status, param in cases:
            r = c.post(f"{served}/v1/models/{model}/predict", content=body, headers=raw)
            assert r.status_code == status, (model, body[:60], r.status_code, r.text[:300])
            assert r.json()["error"]["param"] == param, (model, r.json())
        full = _predict(c, served, "mf", [{"user": 7, "k": n_items}])  # the whole catalogue
        assert full.status_code == 200, full.text
        scores = full.json()["predictions"][0]["scores"]
        assert scores and all(np.isfinite(scores)) and len(scores) < n_items  # seen items left out
        for route, body in (
            ("/v1/completions", {"model": "mf", "prompt": "x"}),
            ("/v1/chat/completions", {"model": "cnn", "messages": [{"role": "user", "content": "x"}]}),
        ):
            r = c.post(f"{served}{route}", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint", r.text
        for m, body in (("linear", [{"age": 50}]), ("mf", [{"user": 1}])):
            after = _predict(c, served, m, body)
            assert after.status_code == 200 and after.headers["x-modelfleet-replica-pid"] == pids[m]


def _bytes_waiting_from(receiver: int, sender: int) -> int:
    """Bytes the (frozen) process ``receiver`` has not read on its TCP connections from ``sender``
    (Recv-Q in ``ss``): nonzero once a request was dispatched to it."""
    import re
    import subprocess

    rows = subprocess.run(
        ["ss", "-tnpH", "state", "established"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines()
    socks = []  # (recv_q, local, peer, pid)
    for row in rows:
        f, pid = row.split(), re.search(r"pid=(\d+)", row)
        if len(f) >= 4 and pid:
            socks.append((int(f[0]), f[2], f[3], int(pid.group(1))))
    from_sender = {local for _, local, _, pid in socks if pid == sender}
    return sum(q for q, _, peer, pid in socks if pid == receiver and peer in from_sender)


def test_predict_replica_death_is_never_a_500(runs, served, storage):
    """A predict replica that dies holding a request answers like the LM path: 503, Retry-After,
    code replica_unavailable, or (when Serve re-routes a request the replica had not yet accepted)
    the replacement's answer; never a 500. Its own two-model app (the Python ingress), the linear
    replica with a 10 s batching window, so an accepted request waits inside it: the replica is
    frozen (SIGSTOP), the request sent, resumed once the request's bytes wait in its socket, and
    killed once it has read them (both by condition). The other model's replica is untouched."""
    import os
    import signal
    import threading

    from helpers import pid_alive, wait_until
    from modelfleet.serve.operations import deploy

    models = [
        {
            "name": f,
            "artifact": f"{runs(f)[1].artifact.name}@{runs(f)[1].artifact.version}",
            "ray_actor_options": {"num_cpus": 0.25},
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 10 if f == "linear" else 0.01},
        }
        for f in ("linear", "mf")
    ]
    deploy(
        {
            "app_name": "death",
            "route_prefix": "/death",
            "port": PORT,
            "storage_path": str(storage),
            "ingress": {"num_cpus": 0.05},
            "models": models,
        }
    )
    url = f"{BASE}/death"
    try:
        with httpx.Client(timeout=90) as c:
            warm = _predict(c, url, "linear", [{"age": 50}])  # also refreshes the router's queue-length cache
            victim, ingress = (int(warm.headers[h]) for h in ("x-modelfleet-replica-pid", "x-modelfleet-ingress-pid"))
            other = _predict(c, url, "mf", [{"user": 1}]).headers["x-modelfleet-replica-pid"]
            out: dict = {}
            os.kill(victim, signal.SIGSTOP)
            try:
                th = threading.Thread(target=lambda: out.update(r=_predict(c, url, "linear", [{"age": 60}])))
                th.start()
                wait_until(
                    lambda: _bytes_waiting_from(victim, ingress) > 0,
                    30,
                    "the request's bytes waiting at the frozen replica",
                    0.05,
                )
                os.kill(victim, signal.SIGCONT)
                wait_until(lambda: _bytes_waiting_from(victim, ingress) == 0, 30, "the replica reading them", 0.02)
            finally:
                os.kill(victim, signal.SIGKILL)
            th.join(timeout=90)
            r = out["r"]
            assert r.status_code in (200, 503), (r.status_code, r.text)
            assert "x-modelfleet-ingress-pid" in r.headers  # our answer, not the proxy's
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "replica_unavailable", r.text
            else:
                assert int(r.headers["x-modelfleet-replica-pid"]) != victim
            wait_until(lambda: not pid_alive(victim), 30, "the killed replica gone")
            after = wait_until(
                lambda: (x := _predict(c, url, "linear", [{"age": 60}])).status_code == 200 and x,
                120,
                "the replacement replica answering",
                0.5,
            )
            assert int(after.headers["x-modelfleet-replica-pid"]) != victim
            assert _predict(c, url, "mf", [{"user": 1}]).headers["x-modelfleet-replica-pid"] == other
    finally:
        from ray import serve

        serve.delete("death")
    print(
        f"\n[predict-death] request held by the killed replica: {r.status_code} "
        f"{r.headers.get('retry-after', '')}; replacement pid {after.headers['x-modelfleet-replica-pid']}"
    )


def test_concurrent_predicts_share_a_batch(served):
    import asyncio

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        f"{served}/v1/models/lstm/predict", json={"instances": [{"text": f"vote in the election {i}"}]}
                    )
                    for i in range(8)
                )
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert all(r.json()["predictions"][0]["label"] == "politics" for r in responses)
    assert max(int(r.headers["x-modelfleet-batch-size"]) for r in responses) > 1


# ---------------------------------------------------------------- evaluate CLI, k-fold, quality gate


def test_evaluate_command_writes_json_and_png(runs, storage, tmp_path, capsys):
    from modelfleet.cli import main

    cfg, res = runs("cnn")
    out = tmp_path / "report"
    assert (
        main(["evaluate", res.artifact.uri, "--data", cfg.data.path, "--out", str(out), "--storage", str(storage)]) == 0
    )
    assert "accuracy:" in capsys.readouterr().out
    report = json.loads((out / "evaluation.json").read_text())
    assert report["metrics"]["accuracy"] >= 0.95 and report["task"] == "classification"
    assert report["loss_curve"]["step"][-1] == 160
    for png in ("confusion_matrix.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # K full training runs
def test_kfold_returns_k_scores(runs, storage):
    from modelfleet import registry
    from modelfleet.config import Config
    from modelfleet.evaluate.kfold import kfold

    cfg, res = runs("linear")
    kcfg = Config.from_dict(registry.read_json(res.artifact.uri, "manifest.json")["config"])
    kcfg.train.max_steps = 40
    kcfg.train.lr = 0.08
    kcfg.train.micro_batch_size = 8  # a fold's validation split has 18 rows
    out = kfold(kcfg, 2, cfg.data.path)
    print("kfold", json.dumps(out["summary"]["r2"]))
    assert out["k"] == 2 and len(out["scores"]) == 2 and out["primary_metric"] == "r2"
    assert len({f["rows_held_out"] for f in out["folds"]}) <= 2
    assert sum(f["rows_held_out"] for f in out["folds"]) == 310 + 44  # train + val, each row held out once
    assert all(np.isfinite(s) and s > 0 for s in out["scores"]), out["scores"]
    assert out["summary"]["r2"]["mean"] == pytest.approx(np.mean(out["scores"]))


def test_quality_gate_refuses_a_worse_artifact_and_promotes_a_better_one(runs, served, storage, capsys):
    import torch

    from modelfleet import registry
    from modelfleet.cli import main
    from modelfleet.families import build_model
    from modelfleet.train.export import write_artifact_dir

    cfg, res = runs("linear")
    manifest = registry.read_json(res.artifact.uri, "manifest.json")
    from modelfleet.config import Config

    trained_cfg = Config.from_dict(manifest["config"])
    torch.manual_seed(0)
    untrained = build_model(trained_cfg.model).eval()  # same shape and transform, no training
    worse = registry.publish(
        str(storage),
        res.artifact.name,
        write_artifact_dir(
            untrained, trained_cfg, {}, transform=registry.read_json(res.artifact.uri, "transform.json")
        ),
        consume=True,
    )
    assert main(["deploy", "linear", "--artifact", worse.version, "--app", "families", "--if-better", "r2"]) == 1
    out = capsys.readouterr().out
    assert "refuse" in out and f"@{worse.version} r2=" in out and f"@{res.artifact.version} r2=" in out
    with httpx.Client(timeout=60) as c:
        models = {m["id"]: m["artifact"] for m in c.get(f"{served}/v1/models").json()["data"]}
    assert models["linear"] == f"{res.artifact.name}@{res.artifact.version}"  # still the trained one
    assert main(["deploy", "linear", "--artifact", worse.version, "--app", "families", "--if-better", "nope"]) == 2
    assert "valid metrics" in capsys.readouterr().err
    # The accept path: with the untrained artifact served (a plain deploy, no gate), the trained
    # one passes the gate and is promoted; the app serves it again afterwards.
    assert main(["deploy", "linear", "--artifact", worse.version, "--app", "families"]) == 0
    with httpx.Client(timeout=60) as c:
        models = {m["id"]: m["artifact"] for m in c.get(f"{served}/v1/models").json()["data"]}
        assert models["linear"] == f"{res.artifact.name}@{worse.version}"
        capsys.readouterr()
        assert (
            main(["deploy", "linear", "--artifact", res.artifact.version, "--app", "families", "--if-better", "r2"])
            == 0
        )
        out = capsys.readouterr().out
        assert f"promote: candidate {res.artifact.name}@{res.artifact.version} r2=" in out, out
        assert f"served {res.artifact.name}@{worse.version} r2=" in out, out
        models = {m["id"]: m["artifact"] for m in c.get(f"{served}/v1/models").json()["data"]}
    assert models["linear"] == f"{res.artifact.name}@{res.artifact.version}"


def test_breast_cancer_table_is_imputed_and_encoded_for_classification(ray_session):
    from modelfleet.families import get_family
    from modelfleet.presets import load_config

    cfg = load_config(preset="breast-cancer-linear")
    fam = get_family("linear")
    raw = fam.load_raw("sklearn:breast_cancer", seed=0)
    assert raw["mean_radius"].isna().mean() > 0.05  # missing values were injected
    splits = fam.split(raw, cfg.data)
    t = fam.fit_transform(splits["train"], cfg.model)
    assert fam.task_of(t) == "classification" and t.class_names == ["0", "1"]
    ready = t.apply({k: v.to_numpy() for k, v in splits["test"].items()})
    assert ready["x"].shape == (len(splits["test"]), 30) and np.isfinite(ready["x"]).all()
    assert set(ready["y"].tolist()) == {0, 1}
    # Standard scaling was fitted on the training rows: their scaled columns have mean ~0.
    train_x = t.apply({k: v.to_numpy() for k, v in splits["train"].items()})["x"]
    assert np.abs(train_x.mean(axis=0)).max() < 0.05


def test_storage_tree_holds_only_what_the_layout_names(runs, storage):
    """Every path the commands above wrote under storage.path is one StorageLayout names."""
    import re

    from modelfleet.storage import StorageLayout

    for family in PRESETS:
        runs(family)
    layout = StorageLayout(str(storage))
    roots = {layout.runs(), layout.models(), layout.evaluations(), layout.kfold(), str(Path(layout.data("x")).parent)}
    seen = set()
    for p in sorted(storage.rglob("*")):
        rel = p.relative_to(storage).parts
        top = str(storage / rel[0])
        assert top in roots, f"{p} is outside the storage layout"
        if len(rel) == 2 and top == layout.runs():
            assert str(p) == layout.run(rel[1])
        if top == layout.models() and len(rel) >= 3:
            assert str(p) in (layout.latest(rel[1]), layout.model(rel[1], rel[2])) or len(rel) > 3, p
            assert rel[2] == "LATEST" or re.fullmatch(r"v\d+", rel[2]), p
        if top == layout.evaluations() and len(rel) == 2:
            assert str(p) == layout.evaluation(rel[1])
        if len(rel) == 2 and rel[0] == "data":
            assert str(p) == layout.data(rel[1])
        seen.add(top)
    assert {layout.runs(), layout.models(), layout.evaluations(), str(Path(layout.data("x")).parent)} <= seen
