"""`scripts/launch.py status` (and `make status`) on a machine where nothing runs, after an `up` of
several receivers and Redis left its port map behind."""
from __future__ import annotations

import json

from scripts import launch


def test_status_with_nothing_running_says_so_and_lists_no_stale_services(monkeypatch, tmp_path, capsys) -> None:
    ports_file = tmp_path / "ports.json"
    ports_file.write_text(json.dumps({"host": "127.0.0.1", "sender": 8000, "receiver_http": 8001,
                                      "receiver_grpc": 50052, "channel": 50051, "receivers": 3, "redis": 6380}))
    monkeypatch.setattr(launch, "RUN_DIR", tmp_path)
    monkeypatch.setattr(launch, "PORTS_FILE", ports_file)
    args = launch.build_parser().parse_args(["status"])
    assert launch.cmd_status(args) == 3  # not everything runs: `make status` takes it as an answer
    assert capsys.readouterr().out.splitlines() == [
        "nothing is running: `make up` (python scripts/launch.py up) starts the services"]
