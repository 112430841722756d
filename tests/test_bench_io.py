"""The benchmark helpers: device names that say what ran, JSON that is never half-written."""

import json
import os

import pytest

from avatarv_jax.tools import bench_io


def test_host_info_names_the_device_and_keeps_extras():
    info = bench_io.host_info(probe="v1")
    assert info["device"].startswith("cpu (") and f"{os.cpu_count()} cores" in info["device"]
    assert info["probe"] == "v1" and info["cpu_count"] == os.cpu_count()
    assert bench_io.device_tag() == "cpu"


def test_write_json_round_trip_and_no_partial_file(tmp_path):
    path = bench_io.write_json({"a": [1, 2.5]}, str(tmp_path / "sub" / "r.json"))
    assert json.loads(open(path).read()) == {"a": [1, 2.5]}
    with pytest.raises(TypeError):
        bench_io.write_json({"bad": object()}, str(tmp_path / "x.json"))
    # a failed write leaves neither the target nor its temporary name behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
