"""The Ray cluster-launcher configs in cluster/ validate against the schema inside the installed
ray package, and keep the properties the project relies on (CPU-only head, GPU worker types,
dashboard on loopback, shared storage on every node). Nothing here starts Ray or a cloud VM."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# Hardware of the instance types the shipped configs use: (vCPUs, GPUs). A type not listed here
# is checked only for declaring GPUs; one listed must declare exactly its hardware, or the
# autoscaler plans with wrong numbers (GCP does not auto-detect them).
KNOWN_HARDWARE = {
    "g5.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8),
    "g2-standard-48": (48, 4),
    "a2-highgpu-4g": (48, 4),
    "n1-standard-32": (32, 0),  # N1 GPUs come from guestAccelerators
}


def launcher_configs() -> list[Path]:
    """Every YAML file in cluster/ with a `provider` key (local.yaml, the simulated cluster's
    defaults, has none)."""
    found = []
    for path in sorted((ROOT / "cluster").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "provider" in data:
            found.append(path)
    return found


CONFIGS = launcher_configs()


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it touches a cloud: merge the provider's defaults, then
    validate (validate_config alone rejects a raw file: it expects the filled-in fields)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def schema_errors(config: dict[str, Any]) -> list[jsonschema.ValidationError]:
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return list(cls(schema).iter_errors(config))


def _flag(command: str, name: str) -> str | None:
    """Value of --name=value or --name value in a shell command line, else None."""
    tokens = shlex.split(command.replace(";", " ; "))
    for i, tok in enumerate(tokens):
        if tok.startswith(f"--{name}="):
            return tok.split("=", 1)[1]
        if tok == f"--{name}" and i + 1 < len(tokens):
            return tokens[i + 1]
    return None


def _ray_start(commands: list[str]) -> str:
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, f"expected one `ray start` command, got {starts}"
    return starts[0]


def _volumes(config: dict[str, Any]) -> list[str]:
    """Host paths the docker section bind-mounts into the container at the same path."""
    paths = []
    for opt in config.get("docker", {}).get("run_options", []):
        m = re.match(r"^(?:-v|--volume)[ =](\S+):(\S+?)(?::\w+)?$", opt.strip())
        if m and m.group(1) == m.group(2):
            paths.append(m.group(1))
    return paths


def problems(config: dict[str, Any]) -> list[str]:
    """The project's own rules on top of Ray's schema; each problem names the key."""
    out: list[str] = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    head_start = _ray_start(config.get("head_start_ray_commands", []))
    worker_start = _ray_start(config.get("worker_start_ray_commands", []))

    # A CPU-only head: no GPUs and no CPUs for work, advertised and actually started.
    head_res = types.get(head, {}).get("resources", {})
    if head_res.get("GPU", 0) != 0:
        out.append(f"available_node_types.{head}.resources.GPU: the head must have no GPUs")
    if head_res.get("CPU", 0) != 0:
        out.append(f"available_node_types.{head}.resources.CPU: the head must take no work")
    if _flag(head_start, "num-gpus") != "0":
        out.append("head_start_ray_commands: `ray start --head` needs --num-gpus=0")
    if _flag(head_start, "num-cpus") != "0":
        out.append("head_start_ray_commands: `ray start --head` needs --num-cpus=0")

    # Autoscaling GPU workers.
    workers = {name: t for name, t in types.items() if name != head}
    if not workers:
        out.append("available_node_types: no worker node types")
    global_max = config.get("max_workers", 0)
    for name, t in workers.items():
        key = f"available_node_types.{name}"
        res = t.get("resources", {})
        lo, hi = t.get("min_workers", 0), t.get("max_workers", global_max)
        if res.get("GPU", 0) < 1:
            out.append(f"{key}.resources.GPU: a worker type must declare its GPUs")
        if not (0 <= lo <= hi):
            out.append(f"{key}.max_workers: must be >= min_workers ({lo}), got {hi}")
        if hi > global_max:
            out.append(f"{key}.max_workers: {hi} exceeds the global max_workers {global_max}")
        node = t.get("node_config", {})
        machine = node.get("InstanceType") or node.get("machineType")
        accel = sum(a.get("acceleratorCount", 0) for a in node.get("guestAccelerators", []))
        if machine in KNOWN_HARDWARE:
            cpus, gpus = KNOWN_HARDWARE[machine]
            if res.get("CPU") != cpus or res.get("GPU") != gpus + accel:
                out.append(f"{key}.resources: {machine} has {cpus} CPUs and {gpus + accel} GPUs, got {res}")
        if config["provider"]["type"] == "gcp" and res.get("GPU", 0) > 0:
            if node.get("scheduling", {}).get("onHostMaintenance") != "TERMINATE":
                out.append(f"{key}.node_config.scheduling.onHostMaintenance: GPU VMs need TERMINATE")

    # The dashboard and Jobs API (remote code execution) on loopback only.
    if _flag(head_start, "dashboard-host") != "127.0.0.1":
        out.append("head_start_ray_commands: --dashboard-host must be 127.0.0.1")
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        if any("0.0.0.0" in c for c in config.get(section, [])):
            out.append(f"{section}: nothing may bind 0.0.0.0")

    # One auth mode cluster-wide (Ray expects the same on every node), the token on every node.
    for section, start in (("head_start_ray_commands", head_start), ("worker_start_ray_commands", worker_start)):
        mode = re.search(r"RAY_AUTH_MODE=(\w+)", start)
        if mode is None or mode.group(1) != "token":
            out.append(f"{section}: head and workers must both start with RAY_AUTH_MODE=token")
    if not any(r.endswith(".ray/auth_token") for r in config.get("file_mounts", {})):
        out.append("file_mounts: the auth token must be mounted on every node")

    # Shared storage (the shipped layouts use NFS): mounted on each host, handed to the
    # container, on every node type.
    volumes = _volumes(config)
    if not volumes:
        out.append("docker.run_options: no shared storage volume")
    for vol in volumes:
        if not any("mount" in c and vol in c for c in config.get("initialization_commands", [])):
            out.append(f"initialization_commands: nothing mounts {vol} on the head")
        for name, t in types.items():
            # A node type's own initialization_commands replace the global list.
            cmds = t.get("initialization_commands")
            if cmds is not None and not any("mount" in c and vol in c for c in cmds):
                out.append(
                    f"available_node_types.{name}.initialization_commands: "
                    f"replaces the global list but does not mount {vol}"
                )
    return out


def shell_commands(config: dict[str, Any]) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    cmds = [c for k in keys for c in config.get(k, [])]
    for t in config.get("available_node_types", {}).values():
        cmds += t.get("initialization_commands", []) + t.get("worker_setup_commands", [])
    return cmds


# --- the configs that ship --------------------------------------------------------------------


def test_launcher_configs_found() -> None:
    names = [p.name for p in CONFIGS]
    assert len(CONFIGS) >= 2, f"expected at least 2 launcher configs in cluster/, found {names}"
    providers = {load(p)["provider"]["type"] for p in CONFIGS}
    assert {"aws", "gcp"} <= providers, f"need an AWS and a GCP layout, found {providers}"
    gpu_files = sorted(p.name for p in (ROOT / "cluster").glob("*-gpu.yaml"))
    assert set(gpu_files) <= set(names), f"{gpu_files} must all be launcher configs"


def test_schema_file_ships_with_ray() -> None:
    assert SCHEMA_PATH.is_file(), f"{SCHEMA_PATH} missing from the installed ray {ray.__version__}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_matches_rays_schema(path: Path) -> None:
    errors = schema_errors(load(path))
    assert not errors, "\n".join(f"{path.name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_passes_rays_validate_config(path: Path) -> None:
    prepared = ray_validate(load(path))
    # Ray fills in only what the file leaves out; every field that matters is stated here.
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_project_rules(path: Path) -> None:
    assert problems(load(path)) == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_image_matches_installed_ray(path: Path) -> None:
    image = load(path)["docker"]["image"]
    if image.startswith("rayproject/ray:"):  # else: the project's image (deploy/Dockerfile)
        tag = image.split(":", 1)[1]
        assert tag.startswith(f"{ray.__version__}-"), (
            f"docker.image {image}: the cluster must run ray {ray.__version__}, like the laptop"
        )
        assert "gpu" in tag or "-cu" in tag, f"docker.image {image}: GPU workers need a CUDA image"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shell_commands_parse(path: Path) -> None:
    """Folded YAML scalars join lines with spaces; a slip shows up as a bash syntax error."""
    for cmd in shell_commands(load(path)):
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == 0, f"{path.name}: {cmd!r}: {r.stderr}"


# --- broken copies fail, naming the key ---------------------------------------------------------


def _first_worker(c: dict[str, Any]) -> dict[str, Any]:
    return next(t for n, t in c["available_node_types"].items() if n != c["head_node_type"])


def _set(key: str, value: Any):
    def mutate(c: dict[str, Any]) -> None:
        c[key] = value

    return mutate


def _worker_set(key: str, value: Any):
    def mutate(c: dict[str, Any]) -> None:
        _first_worker(c)[key] = value

    return mutate


def _worker_resources(**res: Any):
    def mutate(c: dict[str, Any]) -> None:
        _first_worker(c)["resources"].update(res)

    return mutate


RAY_BREAKS = [
    ("unknown-top-level-key", _set("max_worker", 3), "max_worker"),
    ("max-workers-not-int", _set("max_workers", "many"), "max_workers"),
    ("negative-gpus", _worker_resources(GPU=-1), "GPU"),
    ("unknown-node-type-key", _worker_set("gpus", 4), "gpus"),
    ("head-type-missing", _set("head_node_type", "no-such-type"), "head_node_type"),
    (
        "min-over-global-max",
        lambda c: (c.update(max_workers=0), _first_worker(c).update(min_workers=1, max_workers=1)),
        "max_workers",
    ),
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("name,mutate,key", RAY_BREAKS, ids=[b[0] for b in RAY_BREAKS])
def test_broken_copy_fails_rays_validation(path: Path, name: str, mutate, key: str) -> None:
    broken = load(path)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)) as excinfo:
        ray_validate(broken)
    assert key in str(excinfo.value), f"{name}: the message does not name {key!r}: {excinfo.value}"


def test_broken_copy_fails_schema_directly() -> None:
    broken = load(CONFIGS[0])
    broken["max_workers"] = "many"
    broken["max_worker"] = 3
    errors = schema_errors(broken)
    named = {".".join(map(str, e.absolute_path)) or e.message for e in errors}
    assert "max_workers" in named and any("max_worker'" in n for n in named), named


def _head(c: dict[str, Any]) -> dict[str, Any]:
    return c["available_node_types"][c["head_node_type"]]


def _replace_in(section: str, old: str, new: str):
    def mutate(c: dict[str, Any]) -> None:
        c[section] = [cmd.replace(old, new) for cmd in c[section]]

    return mutate


def _worker_init_without_mount(c: dict[str, Any]) -> None:
    _first_worker(c)["initialization_commands"] = ["nvidia-smi"]


RULE_BREAKS = [
    ("head-with-gpus", lambda c: _head(c)["resources"].update(GPU=4), "resources.GPU"),
    ("head-starts-with-gpus", _replace_in("head_start_ray_commands", "--num-gpus=0", "--num-gpus=4"), "--num-gpus=0"),
    ("worker-without-gpus", lambda c: _first_worker(c)["resources"].pop("GPU"), "resources.GPU"),
    ("max-below-min", _worker_set("min_workers", 99), "max_workers"),
    ("wrong-gpu-count", _worker_resources(GPU=3), "resources"),
    ("dashboard-on-all-interfaces", _replace_in("head_start_ray_commands", "127.0.0.1", "0.0.0.0"), "dashboard-host"),
    ("auth-mode-only-on-head", _replace_in("worker_start_ray_commands", "RAY_AUTH_MODE=token ", ""), "RAY_AUTH_MODE"),
    ("worker-type-drops-shared-mount", _worker_init_without_mount, "initialization_commands"),
    ("no-shared-volume", lambda c: c["docker"].update(run_options=[]), "docker.run_options"),
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("name,mutate,key", RULE_BREAKS, ids=[b[0] for b in RULE_BREAKS])
def test_broken_copy_fails_project_rules(path: Path, name: str, mutate, key: str) -> None:
    broken = load(path)
    mutate(broken)
    found = problems(broken)
    assert any(key in p for p in found), f"{name}: expected a problem naming {key!r}, got {found}"
