"""Settings for the chat service.

Every knob is an environment variable with a documented default (docs/configuration.md);
the defaults run the whole service in one process on SQLite, the in-process channel layer
and the SQL message store.
"""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def _secret_key() -> str:
    # Production passes DJANGO_SECRET_KEY; a local install keeps a generated key next to the
    # code so sessions and tokens survive restarts without any secret living in the repository.
    key = os.environ.get("DJANGO_SECRET_KEY")
    if key:
        return key
    path = BASE_DIR / ".secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_prometheus",
    "channels",
    "accounts",
    "chat",
    "notifications",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "chatproject.urls"
ASGI_APPLICATION = "chatproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Relational database: users, conversations, participants, bans, reports, notification outbox.
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Writers queue on SQLite's lock instead of failing with "database is locked"; WAL lets
    # readers (history, WebSocket catch-up) run while a send commits.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Tests use a file too: shared-cache in-memory SQLite fails concurrent writers with "table is
    # locked" instead of queueing them, which is not how the service behaves.
    # One file per test process, so concurrent test runs never share (and corrupt) one database.
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(tempfile.gettempdir(), f"chat-test-{os.getpid()}.sqlite3")}

AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Inbound request bodies: a 10 MiB message content plus its JSON envelope and metadata.
DATA_UPLOAD_MAX_MEMORY_SIZE = 11 * 1024 * 1024

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "chat.api_errors.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Chat service API",
    "DESCRIPTION": "Conversations, participants and messages. Realtime delivery is over the "
    "WebSocket protocol described in docs/websocket.md.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Conversation.kind and Device.kind are different enums that would otherwise share a name.
    "ENUM_NAME_OVERRIDES": {
        "KindEnum": "chat.models.Conversation.Kind",
        "DeviceKindEnum": "notifications.models.Device.Kind",
    },
    # Swagger UI served from our own static files: the docs work without reaching a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Channel layer: in-process for one process, Redis for several.
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    # channels-redis' pub/sub layer: one PUBLISH per message whatever the group size, no
    # per-process capacity that silently drops, and consumers survive a Redis restart
    # (docs/channel-layer.md has the measurements); chat.channel_layer lets a process's publishes
    # run side by side. Short socket timeouts so a hung Redis cannot hold sends behind it.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "chat.channel_layer.ConcurrentPublishChannelLayer",
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "socket_connect_timeout": 1,
                        "socket_timeout": 2,
                        "health_check_interval": 5,
                    }
                ],
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 1000}}}

# Chat knobs (SPEC section 3).
CHAT_MESSAGE_STORE = os.environ.get("CHAT_MESSAGE_STORE", "sql")
CHAT_SEND_RATE = os.environ.get("CHAT_SEND_RATE", "100/min")
CHAT_MAX_CONNECTIONS = env_int("CHAT_MAX_CONNECTIONS", 10000)
CHAT_MAX_CONNECTIONS_PER_USER = env_int("CHAT_MAX_CONNECTIONS_PER_USER", 20)
CHAT_ALLOW_REGISTRATION = env_bool("CHAT_ALLOW_REGISTRATION", True)
CHAT_PUSH_BACKEND = os.environ.get("CHAT_PUSH_BACKEND", "log")
CHAT_MAX_REPLAY = env_int("CHAT_MAX_REPLAY", 1000)
# Unread bytes a client may leave on the server before it is closed with 4008. Above the largest
# frame (a 10 MiB message) so a healthy client on a slow link is not cut off by one big message.
CHAT_MAX_OUTBOUND_BYTES = env_int("CHAT_MAX_OUTBOUND_BYTES", 16 * 1024 * 1024)
CHAT_WS_TICKET_TTL = 60
CHAT_MAX_GROUP_PARTICIPANTS = env_int("CHAT_MAX_GROUP_PARTICIPANTS", 1000)
# Threads per process for the WebSocket path's blocking work (each holds a database connection).
CHAT_WORKER_THREADS = env_int("CHAT_WORKER_THREADS", 16)
# Load shedding (chat/overload.py): new WebSocket sends get an `unavailable` error frame while this
# many sends of the process are in flight, or while its event loop runs this many seconds late
# (smoothed; 0 turns that check off).
CHAT_MAX_SENDS_IN_FLIGHT = env_int("CHAT_MAX_SENDS_IN_FLIGHT", 64)
CHAT_MAX_LOOP_LAG = float(os.environ.get("CHAT_MAX_LOOP_LAG") or 0.5)
# Seconds; the server process's sys.setswitchinterval (chatproject/asgi.py).
CHAT_GIL_SWITCH_INTERVAL = float(os.environ.get("CHAT_GIL_SWITCH_INTERVAL") or 0.0005)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}

# ============================== Cassandra message store (docs/cassandra.md) ==============================
# Plain values and a factory, always defined: `manage.py cassandra_schema` and the tests use them. The
# database alias and django-cassandra-engine are registered only when CHAT_MESSAGE_STORE=cassandra,
# so the default run (SQLite, sql store) never opens a connection to Cassandra.
from typing import Any  # noqa: E402

from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402

CASSANDRA_CONSISTENCY_LEVELS = {"ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE"}


def _cassandra_replication(value: str) -> dict[str, str | int]:
    """CASSANDRA_REPLICATION as a CQL replication map. Formats: `SimpleStrategy:<rf>` (one data
    centre) or `NetworkTopologyStrategy:<dc>=<rf>[,<dc>=<rf>...]`, e.g. `NetworkTopologyStrategy:dc1=3`."""
    strategy, _, factors = value.strip().partition(":")
    try:
        if strategy == "SimpleStrategy":
            return {"class": strategy, "replication_factor": int(factors)}
        if strategy == "NetworkTopologyStrategy" and factors:
            per_dc = (item.split("=", 1) for item in factors.split(","))
            return {"class": strategy, **{dc.strip(): int(rf) for dc, rf in per_dc}}
    except ValueError:
        pass
    raise ImproperlyConfigured(
        f"CASSANDRA_REPLICATION={value!r}: use SimpleStrategy:<rf> or NetworkTopologyStrategy:<dc>=<rf>[,...]"
    )


CASSANDRA_HOSTS = env_list("CASSANDRA_HOSTS", "127.0.0.1")
CASSANDRA_PORT = env_int("CASSANDRA_PORT", 9042)
CASSANDRA_KEYSPACE = os.environ.get("CASSANDRA_KEYSPACE") or "chat"
CASSANDRA_REPLICATION = _cassandra_replication(os.environ.get("CASSANDRA_REPLICATION") or "SimpleStrategy:1")
# Used for every read and write; lightweight transactions add LOCAL_SERIAL for their Paxos round.
CASSANDRA_CONSISTENCY = (os.environ.get("CASSANDRA_CONSISTENCY") or "LOCAL_QUORUM").upper()
if CASSANDRA_CONSISTENCY not in CASSANDRA_CONSISTENCY_LEVELS:
    raise ImproperlyConfigured(f"CASSANDRA_CONSISTENCY must be one of {sorted(CASSANDRA_CONSISTENCY_LEVELS)}")
# The data centre this process lives in (LOCAL_QUORUM counts its replicas); empty = the first
# contact point's, which is right when CASSANDRA_HOSTS lists local nodes only.
CASSANDRA_LOCAL_DC = os.environ.get("CASSANDRA_LOCAL_DC", "")
# Seconds: the longest a store call waits for Cassandra (each request, and each connection attempt)
# before the send fails fast with 503 instead of holding a worker.
CASSANDRA_REQUEST_TIMEOUT = float(os.environ.get("CASSANDRA_REQUEST_TIMEOUT") or 2.0)
# Native protocol version. v5 wraps every frame in checksummed segments that the Python driver
# builds and verifies in Python (1.8 % of the server's Python CPU under load, docs/performance.md);
# v4 leaves integrity to TCP, as every release before Cassandra 4.0 did.
CASSANDRA_PROTOCOL_VERSION = env_int("CASSANDRA_PROTOCOL_VERSION", 4)


def _cassandra_database(keyspace: str) -> dict[str, Any]:
    """A django-cassandra-engine DATABASES entry for `keyspace`. A function, because each driver
    Cluster needs its own policy objects (they hold per-cluster state) and the library pops keys
    out of the OPTIONS it is given. lazy_connect + retry_connect: the process starts with Cassandra
    down and connects on first use, retrying on later uses until it succeeds. The reconnection
    policy caps the driver's retry delay for a node that went down at 5 s (the default grows to
    10 min), so the service heals by itself within seconds of Cassandra's return."""
    replication = (
        {"strategy_class": "SimpleStrategy", "replication_factor": CASSANDRA_REPLICATION["replication_factor"]}
        if CASSANDRA_REPLICATION["class"] == "SimpleStrategy"
        else {"strategy_class": "NetworkTopologyStrategy"}
        | {dc: rf for dc, rf in CASSANDRA_REPLICATION.items() if dc != "class"}
    )
    return {
        "ENGINE": "django_cassandra_engine",
        "NAME": keyspace,
        "HOST": ",".join(CASSANDRA_HOSTS),
        "OPTIONS": {
            "replication": replication,
            "connection": {
                "port": CASSANDRA_PORT,
                "protocol_version": CASSANDRA_PROTOCOL_VERSION,
                "lazy_connect": True,
                "retry_connect": True,
                "connect_timeout": CASSANDRA_REQUEST_TIMEOUT,
                "control_connection_timeout": CASSANDRA_REQUEST_TIMEOUT,
                "reconnection_policy": ExponentialReconnectionPolicy(base_delay=0.5, max_delay=5.0),
                # Token aware: each statement goes straight to a replica of its partition.
                "load_balancing_policy": TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=CASSANDRA_LOCAL_DC)),
            },
            # Applied by django-cassandra-engine to the driver's Session: bounds statement
            # preparation too (the store passes the same timeout to each execute).
            "session": {"default_timeout": CASSANDRA_REQUEST_TIMEOUT},
        },
    }


# keyspace -> DATABASES entry; the schema command and the store's tests connect through it.
CASSANDRA_DATABASE_FOR = _cassandra_database
if CHAT_MESSAGE_STORE == "cassandra":
    DATABASES["cassandra"] = _cassandra_database(CASSANDRA_KEYSPACE)
    # For its `sync_cassandra` command, the library's equivalent of `manage.py cassandra_schema`.
    INSTALLED_APPS.append("django_cassandra_engine")
# ============================ end of Cassandra message store settings ============================
