"""The repo's configs and docs name no path of one machine: a user who clones the repo must be able
to run them. Allowed absolute paths are shared mounts (/mnt/...), system paths (/etc, /usr, /var/lib)
and the container paths the image defines (deploy/Dockerfile's WORKDIR, e.g. /home/ray/...).
Refused: a checkout or home directory (/work/, /home/<user>/, /root/, /Users/, C:\\Users\\) and
scratch space (/tmp, /var/tmp, /var/folders, /private/var)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCANNED_DIRS = ["deploy", "cluster", "helm", "jobs", "bench", "docs", "scripts", ".ci"]
SCANNED_FILES = ["README.md", "Makefile", "pyproject.toml"]
SKIP_PARTS = {"__pycache__", ".pytest_cache", "node_modules"}

# An absolute path begins at a '/' that does not continue a word, URL or path (so s3://b/tmp/x,
# http://host/root and ./work/x are not paths of this machine).
_START = r"(?<![\w.$}/~-])"
_TAIL = r"(?:/[^\s\"'`),;:]*)?(?=$|[\s\"'`),;:])"
_MACHINE = re.compile(
    _START
    + r"(?:/(?:work|root|Users|scratch|tmp|var/tmp|var/folders|private/var)"
    + _TAIL
    + r"|/home/(?P<user>[A-Za-z0-9._-]+)"
    + _TAIL
    + ")"
    + r"|\b[A-Za-z]:\\Users\\[^\s\"'`]+"
)


def _container_homes() -> set[str]:
    """Users whose /home the image defines (WORKDIR /home/<user>/... in deploy/Dockerfile)."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    return set(re.findall(r"^WORKDIR\s+/home/([^/\s]+)", text, flags=re.M))


def machine_paths(line: str, container_homes: set[str]) -> list[str]:
    found = []
    for m in _MACHINE.finditer(line):
        if m.group("user") and m.group("user") in container_homes:
            continue
        found.append(m.group(0))
    return found


def _scanned() -> list[Path]:
    files = [ROOT / f for f in SCANNED_FILES if (ROOT / f).is_file()]
    for d in SCANNED_DIRS:
        files += sorted(
            p for p in (ROOT / d).rglob("*") if p.is_file() and not SKIP_PARTS & set(p.relative_to(ROOT).parts)
        )
    return files


def test_configs_name_no_path_of_one_machine():
    homes = _container_homes()
    offenders = []
    for path in _scanned():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary (images)
        for n, line in enumerate(text.splitlines(), 1):
            for p in machine_paths(line, homes):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {p}    ({line.strip()[:100]})")
    assert not offenders, (
        "absolute paths of one machine; use a relative path, ${ENV_VAR}, a /mnt/... "
        "mount or an s3:// URI:\n" + "\n".join(offenders)
    )


@pytest.mark.parametrize(
    "line, flagged",
    [
        ("storage_path: /work/main/storage", ["/work/main/storage"]),
        ("--set storage.path=/home/alice/runs", ["/home/alice/runs"]),
        ("cache: /root/.cache/x", ["/root/.cache/x"]),
        ("open /Users/bob/models", ["/Users/bob/models"]),
        ("logs_dir: /tmp/ray-logs", ["/tmp/ray-logs"]),
        ("--temp-dir /tmp", ["/tmp"]),
        (r"C:\Users\eve\storage", [r"C:\Users\eve\storage"]),
        ("WORKDIR /home/ray/modelfleet", []),  # the image's own user (deploy/Dockerfile)
        ("mountPath: /mnt/modelfleet", []),
        ("storage_path: ${MODELFLEET_STORAGE}", []),
        ("uri: s3://bucket/tmp/run", []),
        ("url: http://127.0.0.1:8265/root", []),
        ("path: storage/work/x", []),
        ("rm -rf /var/lib/apt/lists/*", []),
        ("token: ~/.ray/auth_token", []),
    ],
)
def test_the_rule(line, flagged):
    assert machine_paths(line, {"ray"}) == flagged


def test_the_image_defines_the_allowed_container_home():
    assert _container_homes() == {"ray"}


def test_serve_config_storage_comes_from_its_runtime_env(monkeypatch):
    """deploy/serve_config.yaml names storage through ${MODELFLEET_STORAGE}, set in the application's
    runtime_env.env_vars, which Serve's build task (where build_app runs) is started with."""
    from modelfleet.errors import ConfigError
    from modelfleet.serve.app import resolve_storage_path

    app = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())["applications"][0]
    env = app["runtime_env"]["env_vars"]
    storage = app["args"]["storage_path"]
    assert storage == "${MODELFLEET_STORAGE}" and env["MODELFLEET_STORAGE"].startswith("/mnt/")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert resolve_storage_path(storage) == env["MODELFLEET_STORAGE"]
    monkeypatch.setenv("MODELFLEET_STORAGE", "s3://bucket/prefix")
    assert resolve_storage_path(storage) == "s3://bucket/prefix"
    monkeypatch.delenv("MODELFLEET_STORAGE")
    with pytest.raises(ConfigError, match="MODELFLEET_STORAGE is not set"):
        resolve_storage_path(storage)


def test_a_relative_storage_path_resolves_against_the_build_task_cwd(tmp_path, monkeypatch):
    """With a runtime_env working_dir, Ray starts the build task in it: relative paths land there."""
    from modelfleet.serve.app import resolve_storage_path

    monkeypatch.chdir(tmp_path)
    assert resolve_storage_path("storage") == str(tmp_path / "storage")


def test_test_modules_have_unique_names():
    """pytest imports test modules by basename (no packages under tests/): two files of one name in
    different folders stop the whole run at collection ("import file mismatch")."""
    names: dict[str, list[str]] = {}
    for p in (ROOT / "tests").rglob("test_*.py"):
        if not SKIP_PARTS & set(p.parts):
            names.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    assert not {n: ps for n, ps in names.items() if len(ps) > 1}
