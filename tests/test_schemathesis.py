"""Bad input found by machine: schemathesis fuzzes every operation of the project's own OpenAPI
schema against a real daphne process. No 5xx, and every response matches the schema."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live import LiveServer, migrate, server_env

pytestmark = pytest.mark.live_server_process


def test_no_server_errors_and_no_schema_violations(tmp_path):
    env = server_env(tmp_path / "db.sqlite3")
    migrate(env)
    server = LiveServer(env, tmp_path / "daphne.log").start()
    try:
        _, token = server.signup("fuzzer")
        # A conversation the fuzzer belongs to, so member-only operations are reached too.
        server.request("POST", "/api/v1/conversations/", {"kind": "group", "participant_ids": []}, token=token)
        st = shutil.which("st", path=str(Path(sys.executable).parent))
        result = subprocess.run(
            [
                st, "run", f"{server.http}/api/schema/",
                "--header", f"Authorization: Token {token}",
                # Logging out would revoke the fuzzer's token and leave every later call a 401.
                "--exclude-path", "/api/v1/auth/logout/",
                "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
                "--phases", "coverage,fuzzing",
                "--max-examples", "15",
                "--seed", "20261128",
                "--workers", "1",
                "--warnings", "off",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
