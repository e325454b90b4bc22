"""The wheel: what it installs, and the default experiment run from it outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = (
    "heistlab-run",
    "heistlab-report",
    "heistlab-audit",
    "heistlab-serve",
    "heistlab-keys",
    "heistlab-protect",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from this checkout without build isolation (no download: setuptools comes from the dev extra)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            out,
            REPO,
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("heistlab-*.whl")
    return built


@pytest.mark.slow
def test_wheel_installs_only_the_heistlab_package_without_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"heistlab", wheel.name.split("-py")[0] + ".dist-info"}
    assert not [name for name in names if name.endswith("_test.py") or name.endswith("conftest.py")]
    for module in (
        "heistlab/attacks/knockoff.py",
        "heistlab/defenses/dawn.py",
        "heistlab/experiments/run.py",
    ):
        assert module in names
    assert "heistlab/configs/config.yaml" in names
    assert "heistlab/configs/defense/rounding.yaml" in names
    assert "heistlab/configs/hydra/launcher/parallel.yaml" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/entry_points.txt")
    for script in SCRIPTS:
        assert script.encode() in entry_points


@pytest.mark.slow
def test_default_experiment_runs_from_the_installed_wheel_in_another_directory(wheel, tmp_path, cache_dir):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, wheel],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(site), "HEISTLAB_CACHE_DIR": str(cache_dir), "CI": "true"}
    probe = subprocess.run(
        [sys.executable, "-c", "import heistlab.attacks, heistlab.configs; print(heistlab.attacks.__file__)"],
        cwd=elsewhere,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.startswith(str(site))
    finished = subprocess.run(
        [site / "bin" / "heistlab-run", "attack.budget=100"],
        cwd=elsewhere,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    (results,) = elsewhere.glob("outputs/*/*/results.json")
    assert '"queries_served": 100' in results.read_text()


def test_a_missing_server_package_names_the_extra_to_install():
    from heistlab.serving import require_server_packages

    require_server_packages()  # the dev extra installs the serve extra
    with pytest.raises(SystemExit, match=r"needs no_such_server_package \(the serve extra\): pip install"):
        require_server_packages(("fastapi", "no_such_server_package"))
