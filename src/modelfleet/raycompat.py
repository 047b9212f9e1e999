"""Every use of Ray's private or internal API, in one place (a leaf: imports nothing of ours).

Ray does not promise these names across releases, so each one is wrapped here in a small typed
function and checked by tests/unit/test_raycompat.py (the name exists, takes the arguments we pass,
returns the type we read). A Ray upgrade that moves one fails that test by name instead of a
deploy or a cluster start. tests/unit/test_layers.py checks no other module touches them.

Ray is imported inside each function: ``modelfleet cluster`` and ``modelfleet --help`` must stay
light, and this module sits below every layer that may need it (serve, train, cluster).
"""

from __future__ import annotations

from typing import Any


def pinned_version_options(version: str) -> dict[str, Any]:
    """``Deployment.options`` keywords that pin a deployment's version ourselves.

    Serve removed the public ``version`` option; it still accepts it from its own callers
    (``_internal=True``). A pool pins it so that adding a variant (a ``user_config`` change) is a
    lightweight in-place reconfigure instead of a rolling restart of every replica."""
    return {"_internal": True, "version": version}


def serve_details() -> dict[str, Any] | None:
    """Serve's instance details (what ``serve status -v`` and the dashboard read), or None when
    no Serve controller runs on the connected cluster. There is no public call for them."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    details = client.get_serve_details()
    if not isinstance(details, dict):
        raise TypeError(f"Serve's instance details are a {type(details).__name__}, expected a dict")
    return details


def ray_logs_dir() -> str | None:
    """This node's Ray session log directory (the actors' and workers' stdout/stderr files), or
    None when this process is not a Ray driver. Ray has no public accessor for the path."""
    import ray
    from ray._private import worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    if not ray.is_initialized() or node is None:
        return None
    path = node.get_logs_dir_path()
    if not isinstance(path, str):
        raise TypeError(f"Ray's log directory is a {type(path).__name__}, expected a str")
    return path


def node_ip_address() -> str:
    """The address Ray advertises for this machine (what ``ray start`` would pick): Ray's own
    choice, so the nodes we start agree with the drivers that join them."""
    from ray._private.services import get_node_ip_address

    return str(get_node_ip_address())


def available_resources_per_node() -> dict[str, dict[str, float]]:
    """Free resources of each live node, keyed by node id (hex). The caller must be a Ray
    driver; the public ``ray.available_resources()`` sums the whole cluster."""
    from ray._private.state import available_resources_per_node as per_node

    return {str(node): {str(k): float(v) for k, v in res.items()} for node, res in per_node().items()}


def preprocessor_state(p: Any) -> dict[str, Any]:
    """A fitted Ray Data preprocessor's state in Ray's own serialization layout (type id, version,
    fields, stats) without its pickle envelope, so an artifact can carry it as JSON. Ray's
    ``serialize`` pickles; the layout's parts are private methods."""
    return {
        "type": p.get_preprocessor_class_id(),
        "version": p.get_version(),
        "fields": p._get_serializable_fields(),
        "stats": p._get_stats(),
    }


def preprocessor_from_state(spec: dict[str, Any]) -> Any:
    """The inverse of ``preprocessor_state``: Ray's ``deserialize`` minus the pickle envelope."""
    from ray.data.preprocessors.utils import StatComputationPlan
    from ray.data.preprocessors.version_support import _lookup_class

    cls = _lookup_class(spec["type"])
    obj = cls.__new__(cls)
    obj._stat_computation_plan = StatComputationPlan()
    obj._set_serializable_fields(fields=spec["fields"], version=spec["version"])
    obj._set_stats(stats=spec["stats"])
    return obj


PARQUET_PLANNER_LOGGER = "ray.data._internal.datasource.parquet_datasource"


def quiet_parquet_planner() -> None:
    """Keep the INFO lines of Ray Data's parquet planner (encoding ratio, reader batch size, one
    pair per dataset) off the user's screen; its warnings still show. The logger is named after
    a private module, so this name is Ray's to move."""
    import logging

    logging.getLogger(PARQUET_PLANNER_LOGGER).setLevel(logging.WARNING)


def with_ingress_request_router(app: Any, router: Any) -> Any:
    """Attach ``router`` (a bound deployment serving ``/internal/route``) to ``app``'s ingress as
    HAProxy's ingress request router. Ray 2.60 marks ``Application._with_ingress_request_router``
    internal and unstable; it returns the application it was called on."""
    attach = app._with_ingress_request_router
    out = attach(router)
    return out if out is not None else app


async def pick_replica(handle: Any, *args: Any) -> str:
    """Run ``handle``'s deployment request router on ``args`` and return the chosen replica's
    actor name, the key HAProxy pins by (its Lua ``REPLICA_TARGETS`` map). ``_reserve=False`` is
    Ray's internal pick-only mode (no slot reserved: the request itself arrives through HAProxy),
    as its own ``LLMRouter`` calls it; the selection's public ``replica_id`` is only the unique
    suffix of the actor name."""
    from ray.serve.request_router import ReplicaID

    async with handle.choose_replica(*args, _reserve=False) as selection:
        rid = ReplicaID(unique_id=selection.replica_id, deployment_id=handle.deployment_id)
        return str(rid.to_full_id_str())


def serve_builds_for_haproxy(enabled: bool | None = None) -> bool:
    """Whether Ray's app builder in this process believes Serve runs HAProxy's ingress; with
    ``enabled``, make it believe so first. Ray reads ``RAY_SERVE_ENABLE_HA_PROXY`` once, when
    ``ray.serve`` is first imported, and refuses to build an app with an ingress request router
    without it; but the ingress mode is the cluster's (its controller's environment), and a
    driver may have imported Serve before it learnt which cluster it drives. The controller
    checks again with its own flag, so this cannot switch HAProxy on where it is off."""
    from ray.serve._private import build_app

    if enabled is not None:
        build_app.RAY_SERVE_ENABLE_HA_PROXY = enabled
    return bool(build_app.RAY_SERVE_ENABLE_HA_PROXY)


def train_storage() -> tuple[Any, str]:
    """Inside a Ray Train worker: (the run's storage filesystem, the run directory's path on it).
    A checkpoint an upload function returns must be on exactly these to be registered by Ray
    Train (``is_managed_checkpoint`` compares the filesystem objects). ``get_storage`` is a
    DeveloperAPI (its StorageContext "may change without notice between minor versions")."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, str(storage.experiment_fs_path)
