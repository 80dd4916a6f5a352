"""What a user installs from the package index: typed, described, with a README that renders there, and an sdist
whose tests run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """Build the wheel and the sdist with the project's own backend (setuptools, which torch already requires), from
    a copy of the project so that no build folder lands in the checkout."""
    source, out = tmp_path_factory.mktemp("source") / "sinkcache", tmp_path_factory.mktemp("dist")
    skip = shutil.ignore_patterns(".git", ".venv", ".compat", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, source, ignore=skip)
    code = ("import sys, setuptools.build_meta as backend; out = sys.argv[1]; "  # the backend rewrites sys.argv
            "names = [backend.build_wheel(out), backend.build_sdist(out)]; print('BUILT', *names)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, check=True, capture_output=True,
                          text=True)
    names = done.stdout.rsplit("BUILT", 1)[1].split()
    return out / names[0], out / names[1]


def test_wheel_is_typed_and_described(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        metadata = archive.read(next(name for name in files if name.endswith(".dist-info/METADATA"))).decode()
    assert {"sinkcache/py.typed", "sinkcache/compat.py", "sinkcache/cache/__init__.py",
            "sinkcache/cache/sink_cache.py"} <= files
    assert "Classifier: Typing :: Typed" in metadata
    assert re.search(r"^Project-URL: Source, https://", metadata, re.M)
    # no upper bound: a release that ships tomorrow installs (the self-check guards it, tests/test_selfcheck.py)
    assert re.search(r"^Requires-Dist: transformers>=5\.0$", metadata, re.M)
    assert not re.search(r"^Requires-Dist: accelerate[^;\n]*$", metadata, re.M)  # an extra only
    assert re.search(r"^Provides-Extra: accelerate$", metadata, re.M)
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read(next(name for name in files if name.endswith(".dist-info/entry_points.txt")))
    assert "[console_scripts]\nsinkcache = sinkcache.__main__:main" in entry_points.decode()


def test_the_console_command_runs_every_subcommand():
    """The installed ``sinkcache`` command (next to this Python) dispatches like ``python -m sinkcache``."""
    command = Path(sys.executable).parent / "sinkcache"
    done = subprocess.run([str(command), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: sinkcache {sinks,perplexity,recall,doctor,serve}")
    for subcommand in ("sinks", "perplexity", "recall", "doctor", "serve"):
        done = subprocess.run([str(command), subcommand, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "--model" in done.stdout, subcommand
        assert done.stdout.startswith(f"usage: sinkcache {subcommand} "), subcommand
    done = subprocess.run([str(command), "doctor", "--threads", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("sinkcache doctor: error: --threads")


def test_readme_images_and_links_work_on_the_package_index():
    """The index shows README.md on its own: every image and link must be absolute (or an anchor)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    assert targets
    relative = [t for t in targets if not t.startswith(("https://", "#"))]
    assert not relative, f"relative links in README.md break on the package index: {relative}"


def test_sdist_tests_run(built, tmp_path):
    _, sdist = built
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    unpacked = next(tmp_path.iterdir())
    for helper in ("conftest.py", "oracle.py", "zoo.py", "test_compat.py"):
        assert (unpacked / "tests" / helper).is_file(), helper
    env = {**os.environ, "PYTHONPATH": str(unpacked / "src")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_compat.py"],
                          cwd=unpacked, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    assert re.search(r"\d+ passed", done.stdout)


def test_verified_release_is_the_newest_row_of_the_compatibility_matrix():
    """The release the self-check's error names as verified is the newest that passed the matrix (a fact about this
    repository, not about the installed release: so it sits here, outside the matrix's core tests)."""
    from sinkcache import compat

    results = json.loads((ROOT / "docs" / "compat" / "results.json").read_text())["results"]
    passing = [row["version"] for row in results if row["result"] == "pass"]
    newest = max(passing, key=lambda version: tuple(int(part) for part in version.split(".")))
    assert compat.VERIFIED_TRANSFORMERS == newest
