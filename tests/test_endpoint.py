"""The transfer endpoint goes into the run directory, or a private temp dir when that path is too long."""

from __future__ import annotations

import logging
import os
import tempfile

from rollout.refit import new_endpoint_in
from rollout.transfer.channel import ipc_path, remove_endpoint


def test_endpoint_in_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    endpoint = new_endpoint_in(str(run_dir))
    try:
        path = ipc_path(endpoint)
        assert os.path.dirname(os.path.dirname(path)) == str(run_dir) and os.path.isdir(
            os.path.dirname(path)
        )
    finally:
        remove_endpoint(endpoint)
    assert list(run_dir.iterdir()) == [], "the private directory goes with the endpoint"


def test_a_run_directory_too_long_for_a_socket_falls_back_to_the_temp_dir(tmp_path, caplog):
    deep = tmp_path / ("d" * 120)
    with caplog.at_level(logging.WARNING, logger="rollout.engine"):
        endpoint = new_endpoint_in(str(deep))
    try:
        path = ipc_path(endpoint)
        assert path.startswith(tempfile.gettempdir()) and not path.startswith(str(deep))
        assert "rollout.endpoint_dir" in caplog.text and "private temp dir" in caplog.text
    finally:
        remove_endpoint(endpoint)


def test_no_run_directory_means_the_temp_dir():
    endpoint = new_endpoint_in(None)
    try:
        assert ipc_path(endpoint).startswith(tempfile.gettempdir())
    finally:
        remove_endpoint(endpoint)
