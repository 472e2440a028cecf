"""System checks of the configuration: a bad environment variable stops the process before it serves.

`manage.py` commands run them (`check`, `migrate`, `runserver`, `run_notifications`, ...), and so does
chatproject/application.py before daphne takes a connection. Registered by chat.apps.ChatConfig.ready.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from chatproject.environment import Problem

TAG = "configuration"


def problem_errors(problems: Iterable[Problem]) -> list[checks.Error]:
    """One error per environment variable whose value the settings could not use."""
    return [
        checks.Error(
            str(problem), hint=f"Fix or unset {problem.name}; docs/configuration.md lists every variable.", id="chat.E001"
        )
        for problem in problems
    ]


@checks.register(TAG)
def check_environment(app_configs: Any = None, **kwargs: Any) -> list[checks.Error]:
    return problem_errors(settings.ENVIRONMENT_PROBLEMS)


@checks.register(TAG)
def check_notifications(app_configs: Any = None, **kwargs: Any) -> list[checks.Error]:
    """Values that are each valid but do not fit together (e.g. a lease shorter than a delivery)."""
    from notifications import conf

    try:
        conf.load()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="chat.E002")]
    return []


def refuse_to_start_on_errors() -> None:
    """For servers that do not go through manage.py (daphne): exit with the errors, no traceback."""
    errors = [message for message in checks.run_checks(tags=[TAG]) if message.is_serious()]
    if errors:
        lines = "\n".join(f"  {message}" for message in errors)
        raise SystemExit(f"The configuration has {len(errors)} error(s); not starting:\n{lines}")
