"""values.schema.json's served-model section is generated from the pydantic ServeConfig by
scripts/gen_helm_schema.py: these tests fail when the two drift, and check that the generated
schema accepts and refuses the same models as ServeConfig (no helm binary needed)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import yaml
from chart_objects import CHART, ROOT

SCHEMA = CHART / "values.schema.json"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_helm_schema", ROOT / "scripts" / "gen_helm_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_values_schema_is_generated_from_serve_config(gen, capsys):
    rc = gen.main(["--check"])
    assert rc == 0, (
        f"values.schema.json drifted from ServeConfig; run `python scripts/gen_helm_schema.py`:\n"
        f"{capsys.readouterr().out}"
    )


def test_check_mode_reports_a_stale_schema_and_regeneration_fixes_it(gen, tmp_path, capsys):
    stale = tmp_path / "values.schema.json"
    shutil.copy(SCHEMA, stale)
    schema = json.loads(stale.read_text())
    model = schema["definitions"]["model"]["properties"]
    del model["max_surge_percent"]  # a ServeConfig key the chart would refuse
    model["replicas"] = {"type": "integer"}  # a key ServeConfig would refuse
    stale.write_text(json.dumps(schema, indent=2) + "\n")
    before = stale.read_text()

    assert gen.main(["--check", "--schema", str(stale)]) == 1
    diff = capsys.readouterr().out
    lines = diff.splitlines()
    assert any(ln.startswith("+") and '"max_surge_percent": {' in ln for ln in lines), diff
    assert any(ln.startswith("-") and '"replicas": {' in ln for ln in lines), diff
    assert "is stale" in diff
    assert stale.read_text() == before, "--check must not write"

    assert gen.main(["--schema", str(stale)]) == 0
    assert stale.read_text() == SCHEMA.read_text()
    assert gen.main(["--check", "--schema", str(stale)]) == 0


def test_generated_schema_is_self_contained_draft7():
    text = SCHEMA.read_text()
    schema = json.loads(text)
    generated = json.dumps([schema["definitions"]["model"], schema["properties"]["serving"]["properties"]["models"]])
    assert "$defs" not in text and '"title"' not in generated
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    refs = {line.split('"$ref":')[1].strip().strip('",') for line in text.splitlines() if '"$ref":' in line}
    assert all(r.startswith("#/definitions/") for r in refs), refs


def _model_validator():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    # draft-07 ignores keywords beside a root $ref: this validates one item of serving.models.
    return jsonschema.Draft7Validator({"definitions": schema["definitions"], "$ref": "#/definitions/model"})


def test_the_repo_s_models_pass_the_chart_schema():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    serve_config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    validator = _model_validator()
    for model in serve_config["applications"][0]["args"]["models"]:
        validator.validate(model)


OK = {"name": "m", "artifact": "m"}


@pytest.mark.parametrize(
    "model",
    [
        OK,
        {**OK, "autoscaling": {"min_replicas": 0, "max_replicas": 3, "initial_replicas": None}},
        {**OK, "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25, "memory": 1 << 30}},
        {**OK, "overload_status": 429, "batching": {"max_batch_size": 4}},
        {**OK, "replicas": 2},  # unknown key
        {**OK, "name": "has space"},  # name pattern
        {"name": "m"},  # artifact missing
        {**OK, "overload_status": 500},  # literal
        {**OK, "autoscaling": {"min_replicas": -1}},  # bound in a nested model
        {**OK, "autoscaling": {"max_replicas": 2, "target": 1}},  # unknown nested key
        {**OK, "ray_actor_options": {"memory": 0}},  # gt=0
        {**OK, "batching": {"max_batch_size": 257}},  # le=256
        {**OK, "max_surge_percent": 101},
    ],
)
def test_chart_schema_and_serve_config_agree_on_a_model(model):
    """Field by field (cross-field checks such as min <= max are the templates' and pydantic's)."""
    from pydantic import ValidationError

    from modelfleet.config.serve import ModelSpec

    try:
        ModelSpec.model_validate(model)
        pydantic_ok = True
    except ValidationError:
        pydantic_ok = False
    schema_ok = _model_validator().is_valid(model)
    assert schema_ok == pydantic_ok, (
        f"{model}: ServeConfig {'accepts' if pydantic_ok else 'refuses'} it, "
        f"the chart schema {'accepts' if schema_ok else 'refuses'} it"
    )
