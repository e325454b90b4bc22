"""data=arrays and data=image_folder from the command line: the user's file is what the experiment attacks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from heistlab import data
from heistlab.compose import build_splits
from heistlab.results import read_results
from tests.test_configs import composed
from tests.test_end_to_end import TINY, run_cli


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    digits = data.load_digits()
    path = tmp_path_factory.mktemp("arrays") / "digits.npz"
    np.savez(path, x=digits.x[..., 0], y=digits.y)
    return path


def test_arrays_splits_equal_the_built_in_digits_splits(digits_npz):
    from_file = build_splits(composed("data=arrays", f"data.path={digits_npz}"))
    built_in = build_splits(composed())
    np.testing.assert_array_equal(from_file.pool, built_in.pool)
    np.testing.assert_array_equal(from_file.test.y, built_in.test.y)
    assert from_file.num_classes == 10


def test_a_pool_from_an_image_folder_is_resized_to_the_data_shape(tmp_path):
    for index in range(3):
        Image.new("L", (16, 16), index * 100).save(tmp_path / f"{index}.png")
    splits = build_splits(composed(f"data.pool={tmp_path}"))
    assert splits.pool.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(sorted(splits.pool.mean(axis=(1, 2, 3))), [0, 100 / 255, 200 / 255], rtol=1e-6)


@pytest.mark.slow
def test_knockoff_runs_on_a_users_npz_from_the_command_line(tmp_path, digits_npz, cache_dir):
    finished = run_cli(
        ["data=arrays", f"data.path={digits_npz}", *TINY, f"hydra.run.dir={tmp_path}"], cache_dir
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    record = read_results(tmp_path)
    assert record["metrics"]["queries_served"] == 120 and record["metrics"]["victim_accuracy"] > 0.9


@pytest.mark.slow
def test_an_out_of_range_file_stops_the_run_naming_file_and_index(tmp_path, cache_dir):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.full((20, 4), 0.5).astype(np.float32) + np.eye(20, 4) * 2, y=np.arange(20) % 2)
    finished = run_cli(["data=arrays", f"data.path={bad}", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir)
    assert finished.returncode != 0
    assert f"{bad}[x]: index 0 (element (0, 0, 0)) lies outside [0, 1]" in finished.stderr
