"""The configuration reference documents every setting."""

from pathlib import Path

from mesh.settings import MeshSettings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_setting_is_in_the_configuration_reference():
    text = (DOCS / "configuration.md").read_text()
    missing = [f"MESH_{name.upper()}" for name in MeshSettings.model_fields if f"`MESH_{name.upper()}`" not in text]
    assert not missing, f"document these in docs/configuration.md: {missing}"
