"""The generic Registry: decorator registration, aliases, lookup errors, entry points."""
import sys
import textwrap

import pytest

import gradproj as gp
from gradproj import registry as registry_module
from gradproj.registry import Registry, UnknownNameError


def make():
    reg = Registry("widget")

    @reg.register("alpha", aliases=("a",))
    class Alpha:
        """First widget.

        More text that is not the description."""

        def __init__(self, size=1):
            self.size = size

    @reg.register("beta")
    class Beta:
        """Second widget."""

    return reg, Alpha, Beta


def test_register_get_alias_create_names():
    reg, alpha, beta = make()
    assert reg.get("alpha") is alpha and reg.get("a") is alpha
    assert reg.create("a", size=3).size == 3
    assert reg.names() == ["alpha", "beta"] and reg.names("b*") == ["beta"]
    assert reg.entry("a").description == "First widget."
    assert "a" in reg and "gamma" not in reg and len(reg) == 2


def test_duplicate_name_or_alias_raises():
    reg, _, _ = make()
    for name, aliases in (("alpha", ()), ("new", ("a",)), ("a", ())):
        with pytest.raises(ValueError, match="already registered"):
            reg.add(name, object, aliases=aliases)


def test_unknown_name_suggests_close_matches_and_lists_all():
    reg, _, _ = make()
    with pytest.raises(KeyError) as info:
        reg.get("alpah")
    message = str(info.value)
    assert message == "unknown widget 'alpah'; did you mean 'alpha'? available: alpha, beta"
    assert isinstance(info.value, UnknownNameError) and isinstance(info.value, ValueError)


def test_builtin_registries_are_populated():
    assert {"svd", "randomized", "int4"} <= set(gp.PROJECTORS.names())
    assert "adamw" in gp.RULES and {"fp32", "bf16"} <= set(gp.STATE_FORMATS.names())
    assert "drop" in gp.RESIDUALS and "galore" in gp.PRESETS
    for reg in registry_module.ALL_REGISTRIES.values():
        for entry in reg:
            assert entry.description, f"{reg.kind} {entry.name!r} has no one-line description"


def test_entry_point_plugins_are_loaded(tmp_path, monkeypatch):
    """A third-party package registers a projector through the gradproj.plugins group."""
    (tmp_path / "thirdparty_proj.py").write_text(textwrap.dedent('''
        from gradproj.projectors.randomized import RandomizedProjector
        from gradproj.registry import PROJECTORS

        @PROJECTORS.register("thirdparty-test")
        class ThirdParty(RandomizedProjector):
            """A projector shipped by another package."""
    '''))
    dist = tmp_path / "thirdparty_proj-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-proj\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[gradproj.plugins]\nthirdparty = thirdparty_proj\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry_module, "_plugins_loaded", False)
    try:
        assert registry_module.load_plugins() == ["thirdparty"]
        assert "thirdparty-test" in gp.PROJECTORS
        assert registry_module.load_plugins() == []  # once only
    finally:
        gp.PROJECTORS._entries.pop("thirdparty-test", None)
        sys.modules.pop("thirdparty_proj", None)
