"""What the chart runs is what modelfleet accepts: serveConfigV2 passes Ray Serve's schema and our
ServeConfig, the RayJob's config loads with load_config and its entrypoint exists in jobs/."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
import yaml
from chart_objects import CHART, CI_VALUES, ROOT, cluster_spec, containers, of_kind, one, pod_templates

from modelfleet.errors import ConfigError
from modelfleet.serve.auth import check_exposure

SERVING = [v for v in CI_VALUES if v != "train-only-values.yaml"]
TRAINING = [v for v in CI_VALUES if v != "serve-only-values.yaml"]


@pytest.mark.parametrize("values", SERVING)
def test_serve_config_passes_ray_serve_and_modelfleet_schemas(ci_renders, values):
    from ray.serve.schema import ServeDeploySchema

    from modelfleet.config.serve import parse_serve_config

    rs = one(ci_renders[values], "RayService")
    raw = yaml.safe_load(rs["spec"]["serveConfigV2"])
    deploy = ServeDeploySchema.model_validate(raw)
    (app,) = deploy.applications
    assert app.import_path == "modelfleet.serve.app:build_app"
    cfg = parse_serve_config(app.args)
    assert cfg.require_api_key and cfg.api_key_env == "MODELFLEET_API_KEY"
    # The app judges exposure by the host the pods really serve on: no key there is refused.
    assert cfg.host == "0.0.0.0" and not cfg.insecure_no_auth
    with pytest.raises(ConfigError, match="reachable from other machines"):
        check_exposure(cfg, None)
    # The proxy must listen beyond loopback inside the pod, on the port the Service targets.
    assert deploy.http_options.host == "0.0.0.0"
    svc = rs["spec"]["serveService"]["spec"]
    assert [p["targetPort"] for p in svc["ports"]] == [deploy.http_options.port]
    # Replicas read artifacts where training writes them.
    mounts = {
        m["mountPath"]
        for c in rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
        for m in c.get("volumeMounts", [])
    }
    assert cfg.storage_path.startswith("s3://") or cfg.storage_path in mounts


def test_serve_models_follow_values(render):
    models = [
        {"name": "a", "artifact": "a@v3", "num_replicas": 2},
        {"name": "b", "artifact": "b", "autoscaling": {"min_replicas": 0, "max_replicas": 3}},
    ]
    rs = one(render({"serving": {"models": models}}), "RayService")
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["models"] == models  # verbatim: the same keys as deploy/serve_config.yaml


@pytest.mark.parametrize("values", TRAINING)
def test_training_config_loads_and_entrypoint_exists(ci_renders, values, tmp_path):
    from modelfleet.presets import load_config

    docs = ci_renders[values]
    job = one(docs, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = argv[1]
    app_dir = yaml.safe_load((CHART / "values.yaml").read_text())["image"]["appDir"]
    assert script.startswith(f"{app_dir}/jobs/"), script
    assert (ROOT / "jobs" / script.rsplit("/", 1)[1]).is_file(), f"{script} is not in jobs/"

    config_path = argv[argv.index("--config") + 1]
    (cm,) = [c for c in of_kind(docs, "ConfigMap") if "config.yaml" in c.get("data", {})]
    local = tmp_path / "config.yaml"
    local.write_text(cm["data"]["config.yaml"])
    cfg = load_config(local)
    assert cfg.storage.path  # set by the chart from `storage`

    # The ConfigMap is mounted where the entrypoint looks, on the head (where the driver runs).
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volume = next(v["name"] for v in head["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume)
    assert config_path == f"{mount['mountPath']}/config.yaml"


def test_training_settings_reach_the_rayjob(render):
    job = one(render("train-only-values.yaml"), "RayJob")["spec"]
    assert job["entrypoint"].endswith("'--resume' 'small-nightly'")
    assert job["shutdownAfterJobFinishes"] is True
    assert job["activeDeadlineSeconds"] == 86400
    assert job["submitterConfig"] == {"backoffLimit": 2}
    assert job["backoffLimit"] == 0
    # A stopped job's driver gets this long to checkpoint before Ray's supervisor SIGKILLs it.
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "300"}}


def test_training_config_gets_the_release_storage(render, tmp_path):
    def config(*sets):
        cm = next(c for c in render(None, *sets) if c["kind"] == "ConfigMap")
        return yaml.safe_load(cm["data"]["config.yaml"])

    assert config()["storage"]["path"] == "/mnt/modelfleet"
    assert config()["data"]["path"] == "/mnt/modelfleet/data/tiny"
    uri = config("storage.pvc.enabled=false", "storage.objectStore.uri=s3://b/p")
    assert uri["storage"]["path"] == "s3://b/p"
    # Object-store mode trains: the job's config reads its prepared data from the same store
    # (tests/integration/test_object_storage.py trains, resumes, serves and evaluates on S3).
    from modelfleet.presets import load_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(uri))
    cfg = load_config(tmp_path / "config.yaml")  # what jobs/train.py reads on the head pod
    assert (cfg.storage.path, cfg.data.path) == ("s3://b/p", "s3://b/p/data/tiny")


def test_one_cluster_spec_for_service_job_and_cluster(render):
    """RayService, RayJob and RayCluster come from one template: they differ only in what their
    role mounts (API key for serving, training config for training)."""
    docs = render(None, "rayCluster.enabled=true")
    specs = {d["kind"]: cluster_spec(d) for d in docs if d["kind"] in ("RayService", "RayJob", "RayCluster")}
    assert set(specs) == {"RayService", "RayJob", "RayCluster"}

    def shape(spec):
        out = json.loads(json.dumps(spec))
        for _, tpl in pod_templates(out):
            tpl["metadata"]["labels"].pop("app.kubernetes.io/component")
            pod = tpl["spec"]
            pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "train-config"]
            for c in pod["containers"]:
                c["env"] = [
                    e
                    for e in c["env"]
                    if e["name"] != "MODELFLEET_API_KEY"
                    and not e["name"].startswith(("RAY_SERVE_", "MODELFLEET_HAPROXY_"))
                ]  # serving's ingress mode
                c["ports"] = [p for p in c["ports"] if p["name"] != "serve"]
                c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "train-config"]
        return out

    assert shape(specs["RayService"]) == shape(specs["RayJob"]) == shape(specs["RayCluster"])


def test_serving_pods_start_serve_in_haproxy_mode_unless_switched_off(render):
    """Serve reads its ingress mode when its processes start, so it is pod env, on every serving
    pod (head and workers: HAProxy runs on every proxy node); training pods do not carry it."""

    def envs(docs, kind):
        return [{e["name"]: e.get("value") for e in c["env"]} for _, _, c in containers([one(docs, kind)])]

    docs = render(None, "rayCluster.enabled=false")
    serving = envs(docs, "RayService")
    assert serving and all(
        e["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        and e["RAY_SERVE_HAPROXY_NBTHREAD"] == "2"
        and e["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure"
        and e["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/home/ray/modelfleet/src/modelfleet/cluster/haproxy_edge.py"
        and e["MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S"] == "10"
        and e["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "310"
        and e["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"] == "310"
        for e in serving
    )
    # The wrapper the env names is the one shipped in the image: the repo file, executable, and
    # the Dockerfile copies src/ to image.appDir and keeps it executable.
    assert os.access(ROOT / "src/modelfleet/cluster/haproxy_edge.py", os.X_OK)
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert (
        "WORKDIR /home/ray/modelfleet" in dockerfile
        and "chmod 0755 src/modelfleet/cluster/haproxy_edge.py" in dockerfile
    )
    assert not any("RAY_SERVE_ENABLE_HA_PROXY" in e for e in envs(docs, "RayJob"))
    off = envs(render(None, "serving.haproxy.enabled=false"), "RayService")
    assert not any("RAY_SERVE_ENABLE_HA_PROXY" in e for e in off)


def test_head_has_no_gpus_and_worker_groups_follow_values(render):
    spec = cluster_spec(one(render("gpu-values.yaml"), "RayService"))
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in head["template"]["spec"]["containers"])
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (1, 1, 4)
    pod = gpu["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["containers"][0]["image"].endswith("-gpu")
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 60


def test_versions_agree_across_image_chart_and_package():
    """The image's Ray, the chart's rayVersion and the package pin must be one version."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert values["rayVersion"] == ray_pin
    assert re.search(rf"^ARG RAY_TAG={re.escape(ray_pin)}-py3\d+$", dockerfile, re.M), "Dockerfile base != ray pin"
    assert "FROM rayproject/ray:${RAY_TAG}" in dockerfile
    assert chart["appVersion"] == version
    assert chart["apiVersion"] == "v2"
    assert f"WORKDIR {values['image']['appDir']}" in dockerfile


def test_object_store_mode_trains_and_serves_from_one_store(ci_renders, tmp_path):
    """RayJob and RayService read and write the same s3:// storage, credentials from one Secret
    by reference, no PVC; the job's config resolves its data to the same store."""
    from modelfleet.presets import load_config

    docs = ci_renders["object-store-values.yaml"]
    assert not of_kind(docs, "PersistentVolumeClaim")
    uri = "s3://modelfleet-runs/prod"
    cm = next(c for c in of_kind(docs, "ConfigMap") if "config.yaml" in c["data"])
    (tmp_path / "config.yaml").write_text(cm["data"]["config.yaml"])
    cfg = load_config(tmp_path / "config.yaml")
    assert (cfg.storage.path, cfg.data.path, cfg.train.num_workers) == (uri, f"{uri}/data/tiny", [1, 2])
    serve_cfg = one(docs, "RayService")["spec"]["serveConfigV2"]
    assert f"storage_path: {uri}" in serve_cfg
    kinds = set()
    for d, _, c in containers(docs):
        env = {e["name"]: e for e in c["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "modelfleet-s3", (d["kind"], name)
        assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.internal.example.com"
        assert not any(m["name"] == "storage" for m in c["volumeMounts"])
        kinds.add(d["kind"])
    assert {"RayJob", "RayService"} <= kinds
    egress = one(docs, "NetworkPolicy")["spec"]["egress"]
    assert {"ports": [{"port": 443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]} in egress
