"""The configuration front door: settings.py is the only reader of the environment, every variable it
reads is in docs/configuration.md (and nothing else is), and a bad value stops the process with a
message naming the variable."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core import checks

from chatproject.checks import check_environment, check_notifications, problem_errors
from chatproject.environment import EnvReader, Problem, parse_rate

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
SETTINGS_SOURCE = ROOT / "chatproject" / "settings.py"
SERVICE_PACKAGES = ("chatproject", "chat", "accounts", "notifications")

# A table row whose first cell is one variable name, in backticks or not.
DOC_ROW = re.compile(r"^\|\s*`?([A-Z][A-Z0-9_]*)`?\s*\|", re.MULTILINE)
# A call of a reader in settings.py: env_int("NAME", ...) or env.int("NAME", ...).
READER_CALL = re.compile(r"\benv[_.](?:str|int|float|bool|list|rate)\(\s*\"([A-Z][A-Z0-9_]*)\"")


def documented_variables() -> set[str]:
    return set(DOC_ROW.findall(DOC.read_text()))


# ------------------------------------------------------------------ the documentation and the code


def test_every_variable_read_is_documented_and_every_documented_one_is_read():
    read = set(settings.ENVIRONMENT_VARIABLES)
    documented = documented_variables()
    assert read - documented == set(), "read in settings.py but missing from docs/configuration.md"
    assert documented - read == set(), "in docs/configuration.md but not read by settings.py"


def test_no_reader_call_in_settings_escapes_the_registry():
    # A read inside a branch that did not run at import would be missing from the registry.
    in_source = set(READER_CALL.findall(SETTINGS_SOURCE.read_text()))
    assert in_source, "the pattern no longer matches the readers' calls"
    assert in_source <= set(settings.ENVIRONMENT_VARIABLES)


def test_only_settings_reads_the_environment():
    allowed = {
        # The readers get the environment here, once.
        ("chatproject/settings.py", "env = EnvReader(os.environ)"),
        # Which settings module to load: before there are settings.
        ("chatproject/application.py", 'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")'),
        # A write, for cqlengine's own check, not a read of our configuration.
        ("chatproject/settings.py", 'os.environ.setdefault("CQLENG_ALLOW_SCHEMA_MANAGEMENT", "1")'),
    }
    found = set()
    for package in SERVICE_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for line in path.read_text().splitlines():
                if re.search(r"os\.environ|getenv|from os import", line):
                    found.add((str(path.relative_to(ROOT)), line.strip()))
    assert found == allowed


# ------------------------------------------------------------------ the readers, as pure functions


def test_a_bad_integer_is_recorded_and_the_default_used():
    env = EnvReader({"CHAT_MAX_REPLAY": "abc"})
    assert env.int("CHAT_MAX_REPLAY", 1000, minimum=0) == 1000
    assert env.problems == [Problem("CHAT_MAX_REPLAY", "abc", "an integer >= 0")]
    assert env.defaults == {"CHAT_MAX_REPLAY": 1000}


@pytest.mark.parametrize(
    "read, value",
    [
        (lambda env: env.int("X", 5, minimum=1), "0"),
        (lambda env: env.int("X", 5, minimum=1, maximum=65535), "70000"),
        (lambda env: env.int("X", 4, choices=(3, 4, 5)), "2"),
        (lambda env: env.int("X", 5), "1.5"),
        (lambda env: env.float("X", 2.0, positive=True), "-1"),
        (lambda env: env.float("X", 2.0, positive=True), "0"),
        (lambda env: env.float("X", 0.5, minimum=0), "nan"),
        (lambda env: env.float("X", 0.5), "soon"),
        (lambda env: env.bool("X", True), "maybe"),
        (lambda env: env.rate("X", "100/min"), "lots"),
        (lambda env: env.rate("X", "100/min"), "0/min"),
        (lambda env: env.rate("X", "100/min"), "100/fortnight"),
        (lambda env: env.str("X", "sql", choices=("sql", "cassandra")), "mongo"),
    ],
)
def test_bad_values_are_recorded_never_raised(read, value):
    env = EnvReader({"X": value})
    assert read(env) == env.defaults["X"]  # the default, recorded with the variable
    [problem] = env.problems
    assert (problem.name, problem.value) == ("X", value)
    assert "X=" in str(problem) and repr(value) in str(problem)


def test_good_values_are_parsed():
    env = EnvReader(
        {
            "INT": " 42 ", "FLOAT": "0.25", "ON": "yes", "OFF": "Off", "LIST": "a, b,,c", "RATE": "5/10s",
            "CHOICE": "local_quorum", "TEXT": "  x  ",
        }
    )
    assert env.int("INT", 1, minimum=1) == 42
    assert env.float("FLOAT", 1.0, positive=True) == 0.25
    assert (env.bool("ON", False), env.bool("OFF", True)) == (True, False)
    assert env.list("LIST", "z") == ["a", "b", "c"]
    assert env.rate("RATE", "100/min") == "5/10s" and parse_rate("5/10s") == (5, 10)
    assert env.str("CHOICE", "ONE", choices=("ONE", "LOCAL_QUORUM")) == "LOCAL_QUORUM"
    assert env.str("TEXT") == "x"
    assert env.problems == []


def test_unset_and_empty_mean_the_default():
    env = EnvReader({"EMPTY": "", "BLANK": "   "})
    assert env.int("EMPTY", 7) == 7
    assert env.list("BLANK", "a,b") == ["a", "b"]
    assert env.str("UNSET", "d") == "d"
    assert env.problems == []
    assert env.defaults == {"EMPTY": 7, "BLANK": ["a", "b"], "UNSET": "d"}


def test_a_secret_s_value_is_never_shown():
    env = EnvReader({"KEY": "hunter2"})
    env.str("KEY", choices=("a", "b"), secret=True)
    [problem] = env.problems
    assert "hunter2" not in str(problem) and "KEY" in str(problem)


# ------------------------------------------------------------------ the system checks


def test_each_recorded_problem_is_a_check_error_naming_the_variable_and_value():
    [error] = problem_errors([Problem("CHAT_SEND_RATE", "lots", "a rate such as 100/min")])
    assert isinstance(error, checks.Error) and error.id == "chat.E001"
    assert "CHAT_SEND_RATE='lots'" in error.msg


def test_the_check_reports_the_problems_the_settings_recorded(settings):
    assert check_environment() == []
    settings.ENVIRONMENT_PROBLEMS = [Problem("CHAT_MAX_REPLAY", "abc", "an integer >= 0")]
    [error] = check_environment()
    assert error.is_serious() and "CHAT_MAX_REPLAY='abc'" in error.msg


def test_notification_settings_that_do_not_fit_together_are_a_check_error(settings):
    assert check_notifications() == []
    settings.CHAT_NOTIFICATION_TIMEOUT, settings.CHAT_NOTIFICATION_LEASE_SECONDS = 10.0, 5.0
    [error] = check_notifications()
    assert error.id == "chat.E002" and "CHAT_NOTIFICATION_LEASE_SECONDS" in error.msg


# ------------------------------------------------------------------ the real settings module


@pytest.fixture
def load_settings(monkeypatch):
    """Run chatproject/settings.py again with the given environment (and no other variable of ours);
    the live Django settings are copies and stay as they were. Re-run as it was afterwards."""
    import chatproject.settings as module

    def load(**environ: str):
        for name in set(module.ENVIRONMENT_VARIABLES) & set(os.environ):
            monkeypatch.delenv(name)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        return importlib.reload(module)

    yield load
    monkeypatch.undo()
    importlib.reload(module)


def test_defaults_are_unchanged(load_settings):
    module = load_settings()
    assert module.ENVIRONMENT_PROBLEMS == []
    assert module.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
    assert (module.DEBUG, module.ALLOWED_HOSTS, module.CSRF_TRUSTED_ORIGINS) == (
        False, ["localhost", "127.0.0.1", "[::1]"], []
    )
    assert module.REDIS_URL == "" and module.CHANNEL_LAYERS["default"]["BACKEND"].endswith("InMemoryChannelLayer")
    assert (module.CHAT_MESSAGE_STORE, module.CHAT_SEND_RATE, module.CHAT_PUSH_BACKEND) == ("sql", "100/min", "log")
    assert (module.CHAT_MAX_CONNECTIONS, module.CHAT_MAX_CONNECTIONS_PER_USER, module.CHAT_ALLOW_REGISTRATION) == (
        10000, 20, True
    )
    assert (module.CHAT_MAX_REPLAY, module.CHAT_MAX_OUTBOUND_BYTES, module.CHAT_MAX_GROUP_PARTICIPANTS) == (
        1000, 16 * 1024 * 1024, 1000
    )
    assert (module.CHAT_WORKER_THREADS, module.CHAT_MAX_SENDS_IN_FLIGHT, module.CHAT_MAX_LOOP_LAG) == (16, 64, 0.5)
    assert module.CHAT_GIL_SWITCH_INTERVAL == 0.0005 and module.LOGGING["root"]["level"] == "INFO"
    assert (module.CASSANDRA_HOSTS, module.CASSANDRA_PORT, module.CASSANDRA_KEYSPACE) == (["127.0.0.1"], 9042, "chat")
    assert module.CASSANDRA_REPLICATION == {"class": "SimpleStrategy", "replication_factor": 1}
    assert (module.CASSANDRA_CONSISTENCY, module.CASSANDRA_LOCAL_DC) == ("LOCAL_QUORUM", "")
    assert (module.CASSANDRA_REQUEST_TIMEOUT, module.CASSANDRA_PROTOCOL_VERSION) == (2.0, 4)
    assert "cassandra" not in module.DATABASES
    assert (module.CHAT_TOKEN_TTL, module.CHAT_LOGIN_FAIL_RATE_USER, module.CHAT_LOGIN_FAIL_RATE_ADDR) == (
        30 * 86400, "10/15min", "30/15min"
    )
    assert module.CHAT_REGISTER_RATE == "10/hour" and module.REST_KNOX["AUTO_REFRESH"] is True


@pytest.mark.parametrize(
    "name, value",
    [
        ("CHAT_MAX_REPLAY", "abc"),
        ("CHAT_SEND_RATE", "lots"),
        ("CHAT_MESSAGE_STORE", "mongo"),
        ("CHAT_PUSH_BACKEND", "carrier-pigeon"),
        ("CASSANDRA_REQUEST_TIMEOUT", "-1"),
        ("CASSANDRA_CONSISTENCY", "most"),
        ("CASSANDRA_REPLICATION", "NetworkTopologyStrategy:dc1"),
        ("CHAT_NOTIFICATION_BATCH_SIZE", "many"),
        ("LOG_LEVEL", "loud"),
        ("CHAT_LOGIN_FAIL_RATE_USER", "10/fortnight"),
        ("CHAT_TOKEN_TTL", "59"),
    ],
)
def test_a_bad_value_in_the_settings_becomes_a_check_error(load_settings, settings, name, value):
    module = load_settings(**{name: value})
    settings.ENVIRONMENT_PROBLEMS = module.ENVIRONMENT_PROBLEMS
    [error] = check_environment()
    assert f"{name}={value!r}" in error.msg


def test_a_bad_database_url_is_reported_without_its_password(load_settings, settings):
    module = load_settings(DATABASE_URL="postgress://chat:hunter2@db/chat")
    settings.ENVIRONMENT_PROBLEMS = module.ENVIRONMENT_PROBLEMS
    [error] = check_environment()
    assert "DATABASE_URL" in error.msg and "hunter2" not in error.msg
    # Nothing opens a database before the checks stop the process.
    assert module.DATABASES["default"]["ENGINE"] == "django.db.backends.dummy"


# ------------------------------------------------------------------ the processes refuse to start


def run_python(*args: str, **environ: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chatproject.settings", **environ}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_manage_py_check_fails_naming_the_variable():
    result = run_python("manage.py", "check", CHAT_MAX_REPLAY="abc")
    assert result.returncode != 0
    assert "chat.E001" in result.stderr and "CHAT_MAX_REPLAY='abc'" in result.stderr


def test_a_worker_leaves_what_it_imported_out_of_the_garbage_collectors_walks():
    """The objects a worker has once the application is imported live as long as it does; frozen,
    a full collection walks only what came after them (chatproject/asgi.py). The collector, off
    while they are imported, is on again afterwards: what sockets and requests create is collected."""
    result = run_python("-c", "import gc, chatproject.asgi; print(gc.get_freeze_count(), len(gc.get_objects()), gc.isenabled())")
    assert result.returncode == 0, result.stderr
    frozen, walked, enabled = result.stdout.split()
    assert int(frozen) > 50_000
    assert int(walked) < int(frozen) / 10
    assert enabled == "True"


def test_a_start_refused_for_a_bad_setting_leaves_the_garbage_collector_on():
    """A process that imports the application and survives its refusal (a test, a shell) keeps
    collecting garbage."""
    script = "import gc\ntry:\n    import chatproject.asgi\nexcept SystemExit:\n    print(gc.isenabled())"
    result = run_python("-c", script, CHAT_SEND_RATE="lots")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]


def test_the_asgi_server_refuses_to_start_without_a_traceback():
    result = run_python("-c", "import chatproject.asgi", CHAT_SEND_RATE="lots", CASSANDRA_CONSISTENCY="most")
    assert result.returncode == 1
    assert "CHAT_SEND_RATE='lots'" in result.stderr and "CASSANDRA_CONSISTENCY='most'" in result.stderr
    assert "Traceback" not in result.stderr
