"""Run sinkcache's core tests on every transformers 5.x minor release and write the compatibility table.

    python scripts/compat_matrix.py --jobs 2             # every 5.x minor (its newest patch), from PyPI
    python scripts/compat_matrix.py --versions 5.0.0,5.25.0

Run it from an environment that has torch and the test tools but no ``kernels`` package, such as ``.venv-oldest``
(``pip install -e ".[test]" transformers==5.0.0``, as ``.ci/run`` builds it). Each release gets a virtual
environment of its own under ``--venvs`` (kept between runs) in which pip installs that transformers with the
dependencies it asks for; torch, pytest and the rest come from the running environment through a ``.pth`` file
placed after the venv's own packages, so torch is not installed 25 times. The releases see those packages after
their own, and the ``kernels`` package that recent releases depend on breaks older ones at import (they read an API
it has since changed): the script refuses an environment that has it. The tests import sinkcache from ``src/``.

Writes ``docs/compat/results.json`` (with the commit it ran on), the table between the ``compat-matrix`` markers of
``docs/compatibility.md``, and ``compat.VERIFIED_TRANSFORMERS``: the newest release that passed, which the
self-check's error names.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_TESTS = ["tests/test_compat.py", "tests/test_selfcheck.py", "tests/test_positions.py", "tests/test_generate.py",
              "tests/test_custom_generate.py"]
PAGE = ROOT / "docs" / "compatibility.md"
COMPAT = ROOT / "src" / "sinkcache" / "compat.py"
START, END = "<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->"


def newest_patch_of_each_minor() -> list[str]:
    """Every released transformers 5.x, one per minor release (its newest patch), oldest first, from the index."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], check=True,
                         capture_output=True, text=True).stdout
    listed = re.search(r"Available versions: (.*)", out)
    if listed is None:
        raise SystemExit(f"pip index versions transformers printed no versions:\n{out}")
    newest: dict[tuple[int, int], tuple[int, ...]] = {}
    for text in listed.group(1).split(", "):
        if re.fullmatch(r"5\.\d+\.\d+", text):
            numbers = release(text)
            newest[numbers[:2]] = max(newest.get(numbers[:2], numbers), numbers)
    return [".".join(map(str, newest[minor])) for minor in sorted(newest)]


def prepare_venv(version: str, venvs: Path) -> Path:
    """A venv with ``transformers==version`` and its dependencies; the running environment's packages after them."""
    venv = venvs / f"transformers-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        Path(purelib, "zz_sinkcache_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    f"transformers=={version}"], check=True)
    return python


def summary(output: str) -> dict[str, int]:
    """pytest's closing counts (passed, failed, skipped, errors...) from its last line."""
    last = output.strip().splitlines()[-1] if output.strip() else ""
    return {word: int(count) for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", last)}


def run_release(version: str, venvs: Path, tests: list[str]) -> dict:
    started = time.time()
    try:
        python = prepare_venv(version, venvs)
    except subprocess.CalledProcessError as error:
        return {"version": version, "result": "install failed", "detail": str(error), "counts": {}}
    # custom_generate copies its module into HF_MODULES_CACHE: one per release, so that parallel runs do not race
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_MODULES_CACHE": str(python.parent.parent / "modules")}
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    failed = [line.split(" ", 1)[1] for line in lines if line.startswith("FAILED ")]
    # "SKIPPED [n] file:line: reason (details)": the reasons, without their details
    skipped = sorted({re.sub(r"\s*\(.*", "", line.split(": ", 1)[1]) for line in lines if line.startswith("SKIPPED ")})
    result = "pass" if done.returncode == 0 else "fail"
    return {"version": version, "result": result, "counts": summary(done.stdout), "failed": failed[:20],
            "skipped": skipped, "seconds": round(time.time() - started, 1)}


def table(results: list[dict], tests: list[str]) -> str:
    rows = ["| transformers | result | passed | skipped | failed | why skipped |", "|---|---|---:|---:|---:|---|"]
    for r in results:
        c = r["counts"]
        mark = {"pass": "✓ pass", "fail": "✗ fail"}.get(r["result"], r["result"])
        failed = c.get("failed", 0) + c.get("error", 0) + c.get("errors", 0)
        why = "; ".join(r.get("skipped", []))
        rows.append(f"| {r['version']} | {mark} | {c.get('passed', 0)} | {c.get('skipped', 0)} | {failed} | {why} |")
    names = ", ".join(f"`{Path(t).name}`" for t in tests)
    commits = ", ".join(sorted({r.get("commit", "unrecorded") for r in results}))
    return "\n".join(rows) + f"\n\nTests run on each release: {names}; on commit {commits}."


def write_page(text: str) -> None:
    """Put ``text`` between the markers of the compatibility page."""
    content = PAGE.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{PAGE} has no {START} ... {END} markers")
    head, rest = content.split(START, 1)
    PAGE.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])


def newest_passing(results: list[dict]) -> str:
    return max((r["version"] for r in results if r["result"] == "pass"), key=release)


def write_verified(version: str) -> None:
    """Set ``compat.VERIFIED_TRANSFORMERS``, the newest release the matrix passed on."""
    content = COMPAT.read_text()
    COMPAT.write_text(re.sub(r'^VERIFIED_TRANSFORMERS = ".*"$', f'VERIFIED_TRANSFORMERS = "{version}"', content,
                             count=1, flags=re.M))


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def commit() -> str:
    """The commit the tests ran on, marked ``+changes`` where the work tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src", "tests"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", help="comma-separated releases (default: newest patch of every 5.x minor)")
    parser.add_argument("--venvs", type=Path, default=ROOT / ".compat", help="where the per-release venvs live")
    parser.add_argument("--tests", nargs="+", default=CORE_TESTS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "compat" / "results.json")
    parser.add_argument("--no-page", action="store_true", help="do not rewrite the page's table nor compat.py")
    parser.add_argument("--render", action="store_true", help="only rewrite the page's table from --out")
    parser.add_argument("--jobs", type=int, default=1, help="releases tested at once")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(args.out.read_text())
        write_page(table(saved["results"], saved["tests"]))
        return 0
    if find_spec("kernels") is not None:
        raise SystemExit("compat_matrix.py: this environment has the `kernels` package (a dependency of recent "
                         "transformers), which every release's venv would see and which breaks older releases at "
                         "import. Run it from .venv-oldest (transformers 5.0.0), or an environment without kernels.")
    versions = args.versions.split(",") if args.versions else newest_patch_of_each_minor()
    args.venvs.mkdir(parents=True, exist_ok=True)
    # a run of some releases replaces their rows in an earlier run's file (same tests) and keeps the others
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {}
    by_version = {r["version"]: r for r in earlier.get("results", [])} if earlier.get("tests") == args.tests else {}
    started, lock, tested_on = time.time(), threading.Lock(), commit()

    def one(version: str) -> None:
        r = run_release(version, args.venvs, args.tests)
        with lock:  # the file is written after every release: a long run is resumable
            by_version[version] = {**r, "commit": tested_on}
            print(f"transformers {version}: {r['result']} {r['counts']} ({r.get('seconds', '-')} s)", flush=True)
            results = sorted(by_version.values(), key=lambda r: release(r["version"]))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"python": sys.version.split()[0], "tests": args.tests,
                                            "results": results}, indent=1) + "\n")

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, versions))
    print(f"{len(versions)} releases in {time.time() - started:.0f} s on {tested_on}")
    results = sorted(by_version.values(), key=lambda r: release(r["version"]))
    if not args.no_page:
        write_page(table(results, args.tests))
        write_verified(newest_passing(results))
    return 0 if all(by_version[v]["result"] == "pass" for v in versions) else 1


if __name__ == "__main__":
    sys.exit(main())
