"""The CRDs are generated from the models, structural, and committed as generated."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from edgellm.api import KINDS, crd_files, custom_resource_definition
from edgellm.cli import app
from edgellm.cli.resources import DEFAULT_CRD_DIRS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("directory", DEFAULT_CRD_DIRS, ids=str)
def test_committed_crds_match_the_models(directory: Path) -> None:
    for name, text in crd_files().items():
        path = REPO / directory / name
        assert path.read_text() == text, f"{path} is stale: run `edgellm crds`"


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        nodes += _walk(schema["items"], f"{path}[]")
    return nodes


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schemas_are_structural_and_every_field_is_described(kind: Any) -> None:
    root = custom_resource_definition(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        for path, node in _walk(root["properties"][part], part):
            assert "$ref" not in node, path
            assert "title" not in node, path
            assert "anyOf" not in node or node.get("x-kubernetes-int-or-string"), path
            assert not ("properties" in node and "additionalProperties" in node), path
            assert "type" in node or node.get("x-kubernetes-int-or-string"), path
            if path != part and not path.endswith("[]"):
                assert node.get("description"), f"{path} has no description for kubectl explain"


def test_request_columns_and_names_are_as_kubectl_users_expect() -> None:
    crd = custom_resource_definition(next(k for k in KINDS if k.kind == "InferenceRequest"))
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ir"]
    assert names["categories"] == ["edgellm"]
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Phase", "Model", "Peer", "TTFT", "Age"]
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


def test_pool_columns_and_names_are_as_kubectl_users_expect() -> None:
    crd = custom_resource_definition(next(k for k in KINDS if k.kind == "WorkerPool"))
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["wp"]
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Model", "Backend", "Demand", "Desired", "Ready", "Available", "Age"]
    assert version["subresources"] == {"status": {}}
    rules = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    assert {r["rule"] for r in rules} >= {"self.minReplicas <= self.maxReplicas"}


def test_generated_yaml_has_no_anchors() -> None:
    for text in crd_files().values():
        assert "&id" not in text
        assert "*id" not in text
        yaml.safe_load(text)


def test_crds_check_fails_on_a_stale_file_and_names_it(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["crds", "--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["crds", "--check", "--out", str(tmp_path)]).exit_code == 0
    stale = tmp_path / "peernodes.edgellm.io.yaml"
    stale.write_text(stale.read_text().replace("peer\n", "pr\n"))
    result = runner.invoke(app, ["crds", "--check", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert str(stale) in result.output
