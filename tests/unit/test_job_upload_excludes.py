"""``modelfleet submit``'s working-directory upload leaves secrets behind: the package Ray builds
from it (Ray's own zip, with the project's excludes) holds no .env, *.pem or *.key file."""

from __future__ import annotations

import zipfile

from ray._private.runtime_env.packaging import create_package

from modelfleet.cluster.jobs import EXCLUDES


def test_upload_package_excludes_env_pem_and_key_files(tmp_path):
    work = tmp_path / "work"
    (work / "conf").mkdir(parents=True)
    for name in ("train.py", ".env", ".env.prod", "tls.pem", "conf/id.key", "conf/keep.yaml"):
        (work / name).write_text("x")
    out = tmp_path / "pkg.zip"
    create_package(str(work), out, include_gitignore=False, excludes=EXCLUDES)
    names = {n.rstrip("/") for n in zipfile.ZipFile(out).namelist()}
    assert {"train.py", "conf/keep.yaml"} <= names, names
    assert not names & {".env", ".env.prod", "tls.pem", "conf/id.key"}, names
