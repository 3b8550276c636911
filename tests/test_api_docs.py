"""The API reference covers the public surface, factories first, every page in the grouped index.

Static checks of ``docs/api`` against the package (the docs build itself runs in ``make docs``): a name
exported by ``pyro_nf.transforms`` or ``pyro_nf.infer`` is documented on the page of the module that
defines it, and each of those modules lists its factories before its classes in ``__all__``, the order
autodoc shows its members in.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import pyro_nf.infer
import pyro_nf.transforms

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"
PACKAGES = (pyro_nf.transforms, pyro_nf.infer)


def modules(package: ModuleType) -> list[ModuleType]:
    return [
        importlib.import_module(f"{package.__name__}.{info.name}") for info in pkgutil.iter_modules(package.__path__)
    ]


def page_of(module_name: str) -> Path:
    return API / f"{module_name.removeprefix('pyro_nf.')}.rst"


def index_entries() -> list[str]:
    """The toctree entries (names or glob patterns) of docs/api/index.md."""
    text = (API / "index.md").read_text(encoding="utf-8")
    entries = []
    for block in re.findall(r"```\{toctree\}\n(.*?)```", text, flags=re.S):
        entries += [line.strip() for line in block.splitlines() if line.strip() and not line.startswith(":")]
    return entries


def defined_here(module: ModuleType) -> list[str]:
    """Public functions and classes defined in ``module`` (not imported into it)."""
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]


def test_every_api_page_is_in_the_grouped_index() -> None:
    entries = index_entries()
    pages = sorted(p.stem for p in API.glob("*.rst"))
    assert pages, "no API pages"
    orphans = [p for p in pages if not any(fnmatch.fnmatchcase(p, entry) for entry in entries)]
    assert not orphans, f"API pages missing from docs/api/index.md: {orphans}"
    assert "api/index" in (ROOT / "docs" / "index.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_exported_name_is_documented_on_its_modules_page(package: ModuleType) -> None:
    missing = []
    for name in package.__all__:
        obj = getattr(package, name)
        module_name = getattr(obj, "__module__", None)
        assert module_name is not None and module_name.startswith("pyro_nf."), (name, module_name)
        page = page_of(module_name)
        if not page.is_file():
            missing.append(f"{name}: no page {page.relative_to(ROOT)} for {module_name}")
            continue
        text = page.read_text(encoding="utf-8")
        if f".. automodule:: {module_name}" not in text or ":no-members:" in text:
            missing.append(f"{name}: {page.name} does not list the members of {module_name}")
            continue
        module = importlib.import_module(module_name)
        listed = getattr(module, "__all__", None)
        if listed is not None and name not in listed:
            missing.append(f"{name}: not in {module_name}.__all__, so autodoc leaves it out")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize(
    "module", [m for package in PACKAGES for m in modules(package)], ids=lambda m: m.__name__.removeprefix("pyro_nf.")
)
def test_each_module_lists_its_factories_first_and_hides_nothing(module: ModuleType) -> None:
    listed = getattr(module, "__all__", None)
    assert listed is not None, f"{module.__name__} has no __all__ (autodoc then shows members in source order)"
    hidden = sorted(set(defined_here(module)) - set(listed))
    assert not hidden, f"{module.__name__}: public names missing from __all__, so from the docs: {hidden}"
    factories = {name for package in PACKAGES for name in package.__all__ if inspect.isfunction(getattr(package, name))}
    kinds = ["factory" if name in factories else "class" if inspect.isclass(getattr(module, name)) else "other"
             for name in listed]  # fmt: skip
    if "factory" in kinds and "class" in kinds:
        last_factory = max(i for i, kind in enumerate(kinds) if kind == "factory")
        first_class = kinds.index("class")
        assert last_factory < first_class, (
            f"{module.__name__}.__all__: a class comes before the factory {listed[last_factory]}"
        )
