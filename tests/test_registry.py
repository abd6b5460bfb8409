"""Plugin registry: built-in registration, third-party entry points, clear errors."""

from __future__ import annotations

import textwrap

import pytest

from conceptsmith.registry import (
    Editor,
    EditorConfig,
    RegistryError,
    get_editor,
    get_metric,
    list_editors,
    list_metrics,
    register_editor,
)


def _install_fake_distribution(root, module: str, group: str, entry: str, body: str) -> None:
    """Write a module plus a .dist-info with entry points, the way pip installs a plugin package."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry} = {module}\n")


def test_third_party_editor_is_discovered_through_entry_points(tmp_path, monkeypatch):
    _install_fake_distribution(
        tmp_path,
        "cs_thirdparty_editor",
        "conceptsmith.editors",
        "noop-eraser",
        '''
        from conceptsmith.registry import Editor, register_editor

        @register_editor("noop-eraser", description="third-party test editor")
        class NoopEraser(Editor):
            def fit(self, pipe, request):
                return None
        ''',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    editor_cls = get_editor("noop-eraser")
    assert editor_cls.__name__ == "NoopEraser"
    assert list_editors()["noop-eraser"] == "third-party test editor"


def test_third_party_metric_is_discovered_through_entry_points(tmp_path, monkeypatch):
    _install_fake_distribution(
        tmp_path,
        "cs_thirdparty_metric",
        "conceptsmith.metrics",
        "always-one",
        '''
        from conceptsmith.registry import register_metric

        @register_metric("always-one", description="third-party test metric", higher_is_better=True)
        def always_one(ctx):
            return 1.0
        ''',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_metric("always-one").compute(None) == 1.0 and get_metric("always-one").higher_is_better
    assert "always-one" in list_metrics()


def test_unknown_editor_lists_the_available_ones():
    with pytest.raises(RegistryError, match=r"Unknown editor 'no-such-method'\. Available:"):
        get_editor("no-such-method")


def test_config_validation_and_duplicate_names():
    class StrengthConfig(EditorConfig):
        strength: float = 1.0

    @register_editor("test-strength", description="test")
    class Strength(Editor):
        Config = StrengthConfig

        def fit(self, pipe, request):
            return None

    assert Strength({"strength": 2.0}).config.strength == 2.0
    with pytest.raises(ValueError, match="stregth"):
        Strength({"stregth": 2.0})
    with pytest.raises(RegistryError, match="already registered"):

        @register_editor("test-strength", description="other")
        class Other(Editor):
            def fit(self, pipe, request):
                return None


def test_register_editor_rejects_non_editors():
    with pytest.raises(TypeError, match="Editor subclasses"):
        register_editor("bad", description="x")(object)
