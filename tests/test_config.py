"""YAML configs: errors name the file, the key and the allowed values."""

from __future__ import annotations

import pytest

from conceptsmith.config import ConfigError, EditConfig, ModelConfig, load_config


def test_valid_model_config(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("spec: builtin:shapes\ndtype: float16\n")
    config = load_config(path, ModelConfig)
    assert config.spec == "builtin:shapes" and config.dtype == "float16"


def test_bad_literal_names_file_key_and_allowed_values(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("spec: builtin:shapes\ndtype: float8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ModelConfig)
    message = str(err.value)
    assert str(path) in message
    assert "key 'dtype'" in message
    assert "'float32'" in message and "'bfloat16'" in message


def test_unknown_key_lists_allowed_keys(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("method: uce\nparms: {}\n")
    with pytest.raises(ConfigError, match=r"key 'parms': unknown key \(allowed keys: method, params\)"):
        load_config(path, EditConfig)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: uce\nparams:\n  lam: [0.5\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML at line \d+"):
        load_config(path, EditConfig)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml", EditConfig)
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path, EditConfig)


def test_yaml_cannot_execute_code(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path, EditConfig)


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted((root / "models").glob("*.yaml")):
        load_config(path, ModelConfig)
    for kind in ("erase", "customize"):
        for path in sorted((root / kind).glob("*.yaml")):
            load_config(path, EditConfig)
