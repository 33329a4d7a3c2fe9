"""Every fast-path switch in one list (kimi_mlx/settings.py): read where a path is chosen, checked against its
choices, overridable for a block, and docs/switches.md made from the list."""

from pathlib import Path

import pytest

from kimi_mlx import settings
from kimi_mlx.errors import ConfigError
from kimi_mlx.ops import kda as kda_ops

DOCS = Path(__file__).parent.parent / "docs" / "switches.md"


def test_the_docs_page_is_the_list():
    assert DOCS.read_text() == settings.markdown(), (
        "docs/switches.md is stale: python -c 'from kimi_mlx import settings; print(settings.markdown(), end=\"\")' "
        "> docs/switches.md")


def test_every_switch_the_code_reads_is_listed():
    """Each KIMI_MLX_* fast-path name in kimi_mlx's code is a listed switch (the cache dir and API key are not
    fast paths)."""
    import re

    root = Path(settings.__file__).parent
    named = set()
    for f in root.rglob("*.py"):
        named |= set(re.findall(r'"(KIMI_MLX_[A-Z_]+)"', f.read_text()))
    assert named - {"KIMI_MLX_CACHE", "KIMI_MLX_API_KEY", "KIMI_MLX_COMMIT"} == set(settings.SWITCHES)


def test_defaults_env_and_override(monkeypatch):
    monkeypatch.delenv("KIMI_MLX_KDA", raising=False)
    assert settings.value("KIMI_MLX_KDA") == "auto" == kda_ops.mode()
    monkeypatch.setenv("KIMI_MLX_KDA", " Ref ")
    assert kda_ops.mode() == "ref"
    with settings.override(KIMI_MLX_KDA="chunked"):
        assert kda_ops.mode() == "chunked"
        assert ("KIMI_MLX_KDA", "chunked", True) in settings.rows()
    assert kda_ops.mode() == "ref"


def test_a_bad_value_is_one_line(monkeypatch):
    monkeypatch.setenv("KIMI_MLX_MLA_PAGE", "maybe")
    with pytest.raises(ConfigError, match=r"^KIMI_MLX_MLA_PAGE='maybe' is not one of on, off; unset it or pick one$"):
        settings.value("KIMI_MLX_MLA_PAGE")
    monkeypatch.setenv("KIMI_MLX_MLA_TILE_MB", "0")
    with pytest.raises(ConfigError, match="not a whole number >= 1"):
        settings.value("KIMI_MLX_MLA_TILE_MB")
    with pytest.raises(ConfigError, match="no such switch: KIMI_MLX_NOPE"):
        with settings.override(KIMI_MLX_NOPE="1"):
            pass
