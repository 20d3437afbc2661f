"""The installed layout: flows/ and tasks/ install as rlme_flows and rlme_tasks, every package is listed."""

from __future__ import annotations

import tomllib

from tests.conftest import ROOT


def test_every_package_of_the_tree_is_installed():
    """pyproject.toml lists the packages by hand (a mapped folder cannot be found automatically): a new
    subpackage missing from the list would be missing from every wheel, and only this test would notice."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {pkg: folder for pkg, folder in setup["package-dir"].items()}
    assert mapped == {"rlme_flows": "flows", "rlme_tasks": "tasks"}
    tree = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("rlme_pipeline", "flows", "tasks")
        for p in (ROOT / top).rglob("__init__.py")
    }
    tree = {next((pkg + name[len(f) :] for pkg, f in mapped.items() if name.split(".")[0] == f), name) for name in tree}
    assert set(setup["packages"]) == tree


def test_flows_and_tasks_import_under_their_package_names():
    import rlme_flows.train
    import rlme_tasks.steps

    assert rlme_flows.train.__file__ == str(ROOT / "flows" / "train.py")
    assert rlme_tasks.steps.__file__ == str(ROOT / "tasks" / "steps.py")
