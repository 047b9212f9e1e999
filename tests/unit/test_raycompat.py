"""Ray's private API, used only through modelfleet.raycompat: each name we rely on still exists,
takes the arguments we pass and returns what we read. A Ray upgrade that moves one fails here,
by name, instead of in a deploy or a cluster start. No cluster: each check is cheap."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pandas as pd
import pytest
from ray import serve

from modelfleet import raycompat

SRC = Path(__file__).resolve().parents[2] / "src" / "modelfleet"
# Ray's private modules, its private names (one leading underscore after a dot or an import), and
# the internal keyword of Deployment.options: what only raycompat.py may spell.
PRIVATE = [
    r"\bray(\.\w+)*\._[a-z]\w*",
    r"\bfrom ray(\.\w+)* import .*\b_[a-z]\w*",
    r"\b_get_global_client\b",
    r"\b_internal\s*=",
]


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Source lines without comments and docstrings (which may name private API to explain it)."""
    tree = ast.parse(path.read_text())
    docs = {
        n.body[0].value.lineno
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [(i, line.split("#")[0]) for i, line in enumerate(path.read_text().splitlines(), 1) if i not in docs]


def test_only_raycompat_touches_rays_private_api():
    offenders = [
        f"{p.relative_to(SRC)}:{i}: {line.strip()}"
        for p in sorted(SRC.rglob("*.py"))
        if p.name != "raycompat.py"
        for i, line in _code_lines(p)
        if any(re.search(pat, line) for pat in PRIVATE)
    ]
    assert not offenders, "Ray private API outside modelfleet/raycompat.py:\n" + "\n".join(offenders)


def test_the_private_api_scan_sees_each_form(tmp_path):
    """The scan above cannot be fooled by spelling: module paths, imported names and the keyword."""
    lines = [
        "from ray._private.services import get_node_ip_address",
        "x = ray._private.state.available_resources_per_node()",
        "from ray.serve.context import _get_global_client",
        "d.options(_internal=True)",
        "from ray.data.preprocessors.version_support import _lookup_class",
    ]
    assert all(any(re.search(p, line) for p in PRIVATE) for line in lines)
    assert not any(re.search(p, "from ray.serve.handle import DeploymentHandle") for p in PRIVATE)


def test_raycompat_is_a_leaf():
    tree = ast.parse((SRC / "raycompat.py").read_text())
    ours = [
        n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("modelfleet")
    ]
    assert not ours, f"raycompat.py imports {ours}"


class _Model:
    def __call__(self) -> str:
        return "ok"


def test_pinned_version_options_still_set_the_version():
    d = serve.deployment(_Model).options(num_replicas=1, **raycompat.pinned_version_options("v-123"))
    assert d.version == "v-123"
    # Why the internal flag is needed at all: the public path refuses a version.
    with pytest.raises(ValueError, match="version"):
        serve.deployment(_Model).options(version="v-123")


def test_serve_details_call_still_exists_with_our_arguments():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.context import _get_global_client

    assert "raise_if_no_controller_running" in inspect.signature(_get_global_client).parameters
    assert callable(ServeControllerClient.get_serve_details)
    assert not [p for p in inspect.signature(ServeControllerClient.get_serve_details).parameters if p != "self"]


def test_node_ip_address_is_a_string_without_a_cluster():
    ip = raycompat.node_ip_address()
    assert isinstance(ip, str) and re.fullmatch(r"[0-9a-fA-F.:]+", ip), ip


def test_available_resources_per_node_still_takes_no_arguments():
    from ray._private import state

    assert callable(state.available_resources_per_node)
    assert not inspect.signature(state.available_resources_per_node).parameters


def test_preprocessor_state_round_trips_a_fitted_preprocessor():
    from ray.data.preprocessors import StandardScaler

    scaler = StandardScaler(columns=["a"])
    scaler._set_stats(stats={"mean(a)": 2.0, "std(a)": 1.0})  # as fit() leaves it, without a Ray Data run
    spec = raycompat.preprocessor_state(scaler)
    assert spec["type"] == "io.ray.preprocessors.standard_scaler" and spec["stats"] == {"mean(a)": 2.0, "std(a)": 1.0}
    back = raycompat.preprocessor_from_state(spec)
    assert type(back) is StandardScaler
    assert back.transform_batch(pd.DataFrame({"a": [3.0]}))["a"].tolist() == [1.0]


def test_the_parquet_planner_still_logs_under_the_name_we_quiet():
    import importlib
    import logging

    module = importlib.import_module(raycompat.PARQUET_PLANNER_LOGGER)
    assert module.logger.name == raycompat.PARQUET_PLANNER_LOGGER
    raycompat.quiet_parquet_planner()
    assert not module.logger.isEnabledFor(logging.INFO) and module.logger.isEnabledFor(logging.WARNING)


def test_the_ingress_request_router_hooks_still_exist():
    """HAProxy's ingress request router: attached through Application's internal hook, the
    builder's import-time HAProxy flag, and the pick-only ``choose_replica``."""
    from ray.serve._private import build_app, router

    app, other = serve.deployment(_Model).bind(), serve.deployment(_Model).options(name="r").bind()
    assert raycompat.with_ingress_request_router(app, other) is app and app._ingress_request_router is other
    before = raycompat.serve_builds_for_haproxy()
    try:
        assert raycompat.serve_builds_for_haproxy(True) is True and build_app.RAY_SERVE_ENABLE_HA_PROXY is True
    finally:
        raycompat.serve_builds_for_haproxy(before)
    assert '"_reserve"' in inspect.getsource(router.AsyncioRouter.choose_replica)
    from ray.serve.request_router import ReplicaID

    assert callable(ReplicaID.to_full_id_str)
    assert "choose_replica" in dir(serve.handle.DeploymentHandle)


def test_the_train_storage_context_still_has_the_fields_async_checkpoints_read():
    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2.api.context import TrainContext

    assert "get_storage" in vars(TrainContext)
    storage = StorageContext(storage_path="/tmp", experiment_dir_name="run")
    assert storage.experiment_fs_path.endswith("/run") and storage.storage_filesystem is not None


def test_ray_logs_dir_is_none_without_a_driver_and_a_log_directory_with_one(ray_session):
    """connect() names this directory when it keeps Ray's process logs off the terminal."""
    import os
    import subprocess
    import sys

    from modelfleet.raycompat import ray_logs_dir

    where = ray_logs_dir()
    assert where is not None and os.path.isdir(where) and where.endswith("logs"), where
    assert any(name.startswith("raylet") for name in os.listdir(where)), os.listdir(where)
    alone = "from modelfleet.raycompat import ray_logs_dir; print(ray_logs_dir())"
    r = subprocess.run([sys.executable, "-c", alone], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stdout + r.stderr
