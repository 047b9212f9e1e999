"""Safe defaults and early failure: bad or contradictory values fail with a message naming the
key; Ray's dashboard/client ports never leave the cluster; token auth, NetworkPolicy, non-root
pods and Secret references are on by default; toggles remove exactly their objects."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from chart_objects import CHART, CI_VALUES, ROOT, cluster_specs, containers, of_kind, one, services

from modelfleet.config.serve import parse_serve_config
from modelfleet.serve.auth import check_exposure

RAY_PRIVATE_PORTS = {8265, 10001}


@pytest.mark.parametrize(
    "values, sets, named",
    [
        ("gpu-values.yaml", ["workerGroups.gpu.replicas=one"], "workerGroups.gpu.replicas"),
        (None, ["replicaCount=2"], "replicaCount"),
        (None, ["workerGroups.cpu.gpus=-1"], "workerGroups.cpu.gpus"),
        (None, ["serving.service.type=Public"], "serving.service.type"),
        (None, ["training.config.storage.path=/elsewhere"], "path"),
        (None, ["workerGroups.Bad_Name.cpu=1"], "Bad_Name"),
    ],
)
def test_unknown_or_mistyped_values_fail_naming_the_key(render_error, values, sets, named):
    err = render_error(values, *sets)
    assert "schema" in err and named in err, err


@pytest.mark.parametrize(
    "values, sets, named",
    [
        (None, ["fullnameOverride=My_Release"], "fullnameOverride"),
        (None, ["nameOverride=UPPER"], "nameOverride"),
        (None, ["head.memory=512mi"], "head.memory"),  # "mi" is no Kubernetes suffix (Mi is); KubeRay refuses it
        (None, ["workerGroups.cpu.cpu=2cores"], "workerGroups.cpu.cpu"),
        (None, ["storage.pvc.storageClassName=fast_ssd"], "storageClassName"),
        (None, ["serving.ingress.host=API.example.com"], "serving.ingress.host"),
        (None, ["monitoring.podMonitor.labels.release=kube prometheus"], "monitoring.podMonitor.labels"),
        ({"monitoring": {"podMonitor": {"labels": {"bad key": "x"}}}}, [], "monitoring.podMonitor.labels"),
        # Accepted by the API server, but KubeRay could never schedule the pods: the chart refuses it.
        (
            {"head": {"tolerations": [{"key": "gpu", "operator": "Exist", "effect": "NoSchedule"}]}},
            [],
            "head.tolerations",
        ),
        ({"workerGroups": {"cpu": {"tolerations": [{"key": "gpu", "effect": "NoSchedul"}]}}}, [], "tolerations"),
    ],
)
def test_values_only_the_api_server_or_nobody_would_refuse_fail_naming_the_key(render_error, values, sets, named):
    err = render_error(values, *sets)
    assert "schema" in err and named in err, err


def test_unknown_model_key_fails_like_serve_config_would(render_error):
    err = render_error({"serving": {"models": [{"name": "m", "artifact": "m", "replicas": 2}]}})
    assert "replicas" in err and "serving.models" in err, err


@pytest.mark.parametrize(
    "values, sets, message",
    [
        (
            None,
            ["workerGroups.cpu.minReplicas=5", "workerGroups.cpu.replicas=5"],
            "workerGroups.cpu.minReplicas (5) is greater than workerGroups.cpu.maxReplicas (4)",
        ),
        (None, ["workerGroups.cpu.replicas=9"], "workerGroups.cpu.replicas (9) must be between"),
        (None, ["storage.objectStore.uri=s3://bucket/prefix"], "storage.pvc.enabled=true and storage.objectStore.uri"),
        (None, ["storage.pvc.enabled=false"], "Ray workers need shared storage"),
        (
            None,
            ["serving.enabled=false", "training.enabled=false"],
            "serving.enabled and training.enabled are both false",
        ),
        (
            {"serving": {"models": [{"name": "m", "artifact": "m", "ray_actor_options": {"num_gpus": 1}}]}},
            [],
            "serving.models need 1 GPUs at their minimum replicas",
        ),
        (
            {
                "serving": {
                    "models": [{"name": "m", "artifact": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]
                }
            },
            [],
            "serving.models[0].autoscaling.min_replicas (3) is greater than serving.models[0].autoscaling.max_replicas (2)",
        ),
        (None, ["training.shutdownAfterJobFinishes=false"], "training.ttlSecondsAfterFinished=600 needs"),
        (None, ["training.config.train.use_gpu=true"], "use_gpu=true needs 2 GPUs at least"),
        (
            {"training": {"config": {"train": {"use_gpu": True, "num_workers": [9, 16]}}}},
            [],
            "num_workers=[9 16] with use_gpu=true needs 9 GPUs at least",
        ),
        (
            {"training": {"config": {"train": {"num_workers": [4, 2]}}}},
            [],
            "num_workers=[4 2]: min is greater than max",
        ),
        ({"training": {"config": {"train": {"num_workers": [1, 2, 3]}}}}, [], "must be a worker count or [min, max]"),
        # Fail closed: what opens the release up needs an explicit acknowledgement.
        (None, ["rayAuth.enabled=false"], "rayAuth.enabled=false leaves Ray's dashboard"),
        (None, ["networkPolicy.enabled=false"], "networkPolicy.enabled=false lets every pod"),
        (None, ["serving.ingress.enabled=true"], "serving.ingress.enabled=true without serving.ingress.tlsSecretName"),
        (
            None,
            ["serving.ingress.enabled=true", "serving.ingress.host=a.example.com"],
            "insecure.allowIngressWithoutTls",
        ),
        (None, ["networkPolicy.egress.objectStore.cidrs={10.0.0.1}"], "networkPolicy.egress.objectStore.cidrs"),
        (None, ["serving.apiKey.required=false"], "set insecure.allowNoApiKey=true to accept that"),
        (
            None,
            [
                "storage.pvc.enabled=false",
                "storage.objectStore.uri=s3://b/p",
                "storage.objectStore.env.AWS_SECRET_ACCESS_KEY=x",
            ],
            "storage.objectStore.env.AWS_SECRET_ACCESS_KEY looks like a secret",
        ),
        (
            None,
            ["storage.pvc.enabled=false", "storage.objectStore.uri=s3://b/p", "storage.objectStore.env.HF_TOKEN=x"],
            "storage.objectStore.env.HF_TOKEN looks like a secret",
        ),
        (None, ["networkPolicy.egress.kubernetesApi.ports={70000}"], "networkPolicy.egress.kubernetesApi.ports"),
    ],
)
def test_contradictory_values_fail_with_a_message(render_error, values, sets, message):
    err = render_error(values, *sets)
    assert message in err, err


@pytest.mark.parametrize("values", CI_VALUES)
def test_dashboard_and_client_ports_stay_inside_the_cluster(ci_renders, values):
    docs = ci_renders[values]
    for svc in services(docs):
        ports = {p.get("port") for p in svc["spec"]["ports"]} | {p.get("targetPort") for p in svc["spec"]["ports"]}
        if ports & RAY_PRIVATE_PORTS:
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    for rs in of_kind(docs, "RayService"):
        serve_ports = rs["spec"]["serveService"]["spec"]["ports"]
        assert not {p["port"] for p in serve_ports} & RAY_PRIVATE_PORTS
        assert not {p["targetPort"] for p in serve_ports} & RAY_PRIVATE_PORTS
    # KubeRay's head Service carries 8265/10001: it must stay ClusterIP with no KubeRay ingress.
    for _, spec in cluster_specs(docs):
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert not spec["headGroupSpec"].get("enableIngress")
    serve_names = {s["metadata"]["name"] for s in services(docs)}
    for ing in of_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in serve_names and backend["port"]["number"] not in RAY_PRIVATE_PORTS


def test_a_load_balancer_carries_only_the_serve_port(ci_renders):
    svc = one(ci_renders["serve-only-values.yaml"], "RayService")["spec"]["serveService"]
    assert svc["spec"]["type"] == "LoadBalancer"
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [8000]


def test_secure_defaults(ci_renders):
    docs = ci_renders["defaults-values.yaml"]
    specs = list(cluster_specs(docs))
    assert {d["kind"] for d, _ in specs} == {"RayService", "RayJob"}
    for owner, spec in specs:
        assert spec["authOptions"]["mode"] == "token", f"{owner['kind']} without Ray token auth"
    policy = one(docs, "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for owner, spec in specs:
        for group, tpl in [("head", spec["headGroupSpec"]["template"])] + [
            (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]
        ]:
            labels = tpl["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"NetworkPolicy misses {owner['kind']} {group} pods"
            assert tpl["spec"]["securityContext"]["runAsNonRoot"] is True
            for c in tpl["spec"]["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # The dashboard/client ports are opened only to in-namespace pods and the operator.
    private_rules = [
        r for r in policy["spec"]["ingress"] if {p["port"] for p in r.get("ports", [])} & RAY_PRIVATE_PORTS
    ]
    assert private_rules and all(r.get("from") for r in private_rules)
    for peer in (p for r in private_rules for p in r["from"]):
        assert "ipBlock" not in peer
    # Serving replicas get the API key from a Secret, by reference.
    serving_env = [e for d, _, c in containers(docs) if d["kind"] == "RayService" for e in c["env"]]
    key = [e for e in serving_env if e["name"] == "MODELFLEET_API_KEY"]
    assert key and all("secretKeyRef" in e["valueFrom"] for e in key)


def test_token_auth_can_use_an_existing_secret(ci_renders):
    for _, spec in cluster_specs(ci_renders["gpu-values.yaml"]):
        assert spec["authOptions"] == {"mode": "token", "secretName": "modelfleet-ray-token"}


SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)


@pytest.mark.parametrize("values", CI_VALUES)
def test_no_secret_values_in_manifests(ci_renders, values):
    docs = ci_renders[values]
    assert not of_kind(docs, "Secret"), "the chart must reference Secrets, never create them with values"
    for d, group, c in containers(docs):
        for e in c["env"]:
            if SECRETISH.search(e["name"]):
                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), (
                    f"{d['kind']}/{group} env {e['name']} must come from a secretKeyRef"
                )


def test_object_store_credentials_come_from_the_secret(ci_renders):
    docs = ci_renders["serve-only-values.yaml"]
    env = {e["name"]: e for _, _, c in containers(docs) for e in c["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "modelfleet-s3"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert not of_kind(docs, "PersistentVolumeClaim")


def _identities(docs):
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def test_turning_serving_or_training_off_removes_exactly_their_objects(render):
    ing = ("serving.ingress.enabled=true", "serving.ingress.host=a.example.com", "serving.ingress.tlsSecretName=a-tls")
    on = _identities(render(None, *ing))
    no_serving = _identities(render(None, *ing, "serving.enabled=false"))
    no_training = _identities(render(None, *ing, "training.enabled=false"))
    assert {k for k, _ in on - no_serving} == {"RayService", "Ingress"} and no_serving < on
    assert {k for k, _ in on - no_training} == {"RayJob", "ConfigMap"} and no_training < on
    # The serving Service lives inside the RayService (KubeRay keeps it on the active cluster).
    assert not {k for k, _ in on} & {"Service"}


def test_ci_serve_only_and_train_only_have_only_their_workload(ci_renders):
    serve_only = {d["kind"] for d in ci_renders["serve-only-values.yaml"]}
    train_only = {d["kind"] for d in ci_renders["train-only-values.yaml"]}
    assert "RayService" in serve_only and "RayJob" not in serve_only
    assert "RayJob" in train_only and not train_only & {"RayService", "Ingress"}


def test_monitoring_objects_are_optional(ci_renders):
    defaults = {d["kind"] for d in ci_renders["defaults-values.yaml"]}
    assert "PodMonitor" not in defaults
    docs = ci_renders["gpu-values.yaml"]
    monitor = one(docs, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for _, _, c in containers(docs):
        assert "metrics" in {p["name"] for p in c["ports"]}
    dash = next(c for c in of_kind(docs, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1")
    shipped = (CHART / "dashboards" / "modelfleet.json").read_text()
    assert dash["data"]["modelfleet.json"] == shipped
    assert json.loads(shipped)["panels"]
    assert "helm/modelfleet/dashboards/modelfleet.json" in (ROOT / "deploy" / "grafana" / "README.md").read_text()


def test_schema_mirrors_serve_and_training_configs():
    """values.schema.json rejects unknown keys early, so it must track the pydantic ServeConfig
    (its model section is generated: test_schema_generated.py) and the presets (else valid
    configs would be refused)."""
    from modelfleet.presets import PRESETS

    schema = json.loads((CHART / "values.schema.json").read_text())
    presets = schema["properties"]["training"]["properties"]["config"]["properties"]["preset"]["enum"]
    assert presets == list(PRESETS)


def test_every_value_is_documented():
    """values.yaml is commented key by key with `# --` (a key documented as a block, such as
    podSecurityContext, covers what is inside it)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).split("#")[0].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        documented = j >= 0 and lines[j].strip().startswith("# --")
        covered = documented or any(doc for _, doc in stack)
        if rest and not covered:
            missing.append(key)
        stack.append((indent, covered))
    assert not missing, f"values.yaml keys without a `# --` comment: {missing}"


def test_dashboard_panels_read_metrics_the_replicas_export():
    """Every modelfleet metric a panel queries is one the code defines (a renamed metric would
    leave an empty panel), and the streaming-era metrics of the LM engine have panels."""
    import re

    shipped = (CHART / "dashboards" / "modelfleet.json").read_text()
    queried = set(re.findall(r"ray_(modelfleet_[a-z_]+?)(?:_bucket|_total)?\{", shipped))
    source = "".join(p.read_text() for d in ("serve", "train") for p in (ROOT / "src" / "modelfleet" / d).glob("*.py"))
    defined = set(re.findall(r'"(modelfleet_[a-z_]+)"', source))
    assert queried and queried <= defined, queried - defined
    assert {
        "modelfleet_time_to_first_token_seconds",
        "modelfleet_time_per_output_token_seconds",
        "modelfleet_running_sequences",
        "modelfleet_waiting_sequences",
        "modelfleet_kv_cache_usage",
        "modelfleet_train_tokens_per_second",
        "modelfleet_train_mfu",
        "modelfleet_train_loss",
        "modelfleet_train_step_time_seconds",
        "modelfleet_route_decisions",
        "modelfleet_route_seconds",
        "modelfleet_prefix_cache_hit_tokens",
    } <= queried


@pytest.mark.parametrize(
    "sets, kinds",
    [
        (["rayAuth.enabled=false", "insecure.allowNoRayAuth=true"], {"RayService", "RayJob"}),
        (["networkPolicy.enabled=false", "insecure.allowNoNetworkPolicy=true"], {"RayService", "RayJob"}),
        (["serving.ingress.enabled=true", "insecure.allowIngressWithoutTls=true"], {"RayService", "RayJob", "Ingress"}),
        (["serving.apiKey.required=false", "insecure.allowNoApiKey=true"], {"RayService", "RayJob"}),
    ],
)
def test_acknowledged_insecure_settings_render(render, sets, kinds):
    docs = render(None, *sets)
    assert kinds <= {d["kind"] for d in docs}
    (app,) = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"]
    cfg = parse_serve_config(app["args"])
    if "serving.apiKey.required=false" in sets:
        # The acknowledgement reaches the app: it starts on the pods' 0.0.0.0 with no key.
        assert cfg.host == "0.0.0.0" and cfg.insecure_no_auth and not cfg.require_api_key
        check_exposure(cfg, None)
    else:
        assert not cfg.insecure_no_auth
    if "rayAuth.enabled=false" in sets:
        assert all("authOptions" not in spec for _, spec in cluster_specs(docs))
    if "networkPolicy.enabled=false" in sets:
        assert not of_kind(docs, "NetworkPolicy")
    for ing in of_kind(docs, "Ingress"):
        assert "tls" not in ing["spec"]


def _egress(docs):
    return one(docs, "NetworkPolicy")["spec"]["egress"]


def _ports(rule):
    return {(p["port"], p.get("protocol", "TCP")) for p in rule.get("ports", [])}


def test_egress_allows_only_release_pods_dns_api_server_and_object_store(render, ci_renders):
    policy = one(ci_renders["defaults-values.yaml"], "NetworkPolicy")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    rules = policy["spec"]["egress"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    # No rule is open to every destination on every port.
    assert all(r.get("to") or r.get("ports") for r in rules), rules
    release = [r for r in rules if not r.get("ports")]
    assert release == [{"to": [{"podSelector": {"matchLabels": selector}}]}]
    dns = [r for r in rules if _ports(r) == {(53, "UDP"), (53, "TCP")}]
    assert dns and dns[0]["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    # Autoscaler on (the default): the API server's ports; PVC storage: no object-store rule.
    assert {r2 for r in rules for r2 in _ports(r)} == {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")}

    no_autoscaler = _egress(render(None, "autoscaling.enabled=false"))
    assert {p for r in no_autoscaler for p in _ports(r)} == {(53, "UDP"), (53, "TCP")}

    # Object store with CIDRs: 443 to those addresses only.
    store = _egress(
        render(
            "serve-only-values.yaml",
            "autoscaling.enabled=false",
            "networkPolicy.egress.objectStore.cidrs={10.1.2.0/24}",
        )
    )
    s3 = [r for r in store if _ports(r) == {(443, "TCP")}]
    assert s3 == [{"ports": [{"port": 443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.1.2.0/24"}}]}]


def test_service_account_tokens_only_where_the_autoscaler_runs(render, ci_renders):
    for autoscaling, docs in (
        (True, ci_renders["defaults-values.yaml"]),
        (False, render(None, "autoscaling.enabled=false")),
    ):
        for owner, spec in cluster_specs(docs):
            assert spec["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is autoscaling
            for g in spec["workerGroupSpecs"]:
                assert g["template"]["spec"]["automountServiceAccountToken"] is False, (owner["kind"], g["groupName"])
