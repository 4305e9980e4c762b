import pytest

from corral.core.errors import key_path
from corral.core.paths import escape_path
from corral.core.units import parse_duration, parse_size


@pytest.mark.parametrize("raw,value", [("64M", 64 << 20), ("1G", 1 << 30), (4096, 4096),
                                       ("512k", 512 << 10), ("10", 10)])
def test_sizes(raw, value):
    assert parse_size(raw) == value


@pytest.mark.parametrize("raw", ["", "M", "-1M", "1.5G", True, 0, "0", "12X", None])
def test_bad_sizes(raw):
    with pytest.raises(ValueError):
        parse_size(raw)


@pytest.mark.parametrize("raw,value", [("10m", 600), ("24h", 86400), ("90s", 90), ("7d", 604800)])
def test_durations(raw, value):
    assert parse_duration(raw) == value


@pytest.mark.parametrize("raw", ["10", "0s", "1w", 5, "h"])
def test_bad_durations(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)


def test_key_path_quotes_keys_that_are_not_bare():
    assert key_path(("process", "app", "connect", 1)) == "process.app.connect[1]"
    assert key_path(("image", "add", "/opt/x")) == 'image.add."/opt/x"'


def test_escape_path_is_unambiguous():
    assert escape_path("/srv/data") == "srv-data"
    assert escape_path("/srv-data") != escape_path("/srv/data")
    assert escape_path("/a/.hidden") == "a-.hidden"


def test_sandbox_doc_lists_every_denied_call():
    from pathlib import Path

    from corral.plan.sandbox import default_deny

    doc = (Path(__file__).parent.parent / "docs" / "sandbox.md").read_text()
    assert [name for name in default_deny() if f"`{name}`" not in doc] == []


def test_manifest_doc_mentions_every_key():
    from pathlib import Path

    from corral.manifest.model import Image, Limits, Manifest, Process, Volume, Watch

    doc = (Path(__file__).parent.parent / "docs" / "manifest.md").read_text()
    for model in (Manifest, Image, Volume, Process, Limits, Watch):
        for name, field in model.model_fields.items():
            key = field.alias or name
            assert f"`{key}`" in doc, f"{model.__name__}.{key} is not documented"
