"""Settings for the chat service.

Every knob is an environment variable with a documented default (docs/configuration.md);
the defaults run the whole service in one process on SQLite, the in-process channel layer
and the SQL message store.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import tempfile
from datetime import timedelta
from pathlib import Path

import dj_database_url

from chatproject.environment import EnvReader

BASE_DIR = Path(__file__).resolve().parent.parent


# The only place the service reads its environment: one typed reader per kind of value, each recording
# the variable (docs/configuration.md lists them all; tests/test_configuration.py holds the two
# together) and any bad value, which chatproject/checks.py reports before the server starts.
env = EnvReader(os.environ)
env_str, env_int, env_float, env_bool, env_list, env_rate = env.str, env.int, env.float, env.bool, env.list, env.rate
# Every variable read, with its default, and every bad value; the same objects the readers fill in,
# so variables read further down are in them too.
ENVIRONMENT_VARIABLES = env.defaults
ENVIRONMENT_PROBLEMS = env.problems


def _secret_key() -> str:
    # Production passes DJANGO_SECRET_KEY; a local install keeps a generated key next to the
    # code so sessions and tokens survive restarts without any secret living in the repository.
    key = env_str("DJANGO_SECRET_KEY", secret=True, strip=False)
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

# Production behind TLS (docs/configuration.md "Production"); `manage.py check --deploy` is clean
# with all of them set. Off by default: `make run` serves plain http on loopback.
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^metrics$"]  # a scrape over loopback is plain http
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", False)
_proxy_ssl_header = env_list("DJANGO_SECURE_PROXY_SSL_HEADER", "")
SECURE_PROXY_SSL_HEADER = None
if len(_proxy_ssl_header) == 2 and _proxy_ssl_header[0].startswith("HTTP_"):
    SECURE_PROXY_SSL_HEADER = (_proxy_ssl_header[0], _proxy_ssl_header[1])
elif _proxy_ssl_header:
    env.invalid("DJANGO_SECURE_PROXY_SSL_HEADER", ",".join(_proxy_ssl_header), "HTTP_<HEADER>,<value>, e.g. HTTP_X_FORWARDED_PROTO,https")

INSTALLED_APPS = [
    "chatproject.apps.DaphneRunserverConfig",  # daphne's `runserver`, not its AppConfig (see there)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_prometheus",
    "channels",
    "accounts",
    "chat",
    "notifications",
    "webclient",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "core.middleware.RefuseNulInQueryMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "accounts.middleware.LoginThrottleMiddleware",
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
# DATABASE_URL may hold a password: a bad value is reported without it.
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}", secret=True)
DATABASE_CONN_MAX_AGE = env_int("DATABASE_CONN_MAX_AGE", 0, minimum=0)
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=DATABASE_CONN_MAX_AGE)}
except ValueError:
    env.invalid("DATABASE_URL", DATABASE_URL, "a database URL such as postgres://user:pass@host/chat", secret=True)
    # Nothing can use the database until the checks have stopped the process.
    DATABASES = {"default": {"ENGINE": "django.db.backends.dummy"}}
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
# Django's model backend behind the login throttles (accounts/auth.py): every login path uses it.
AUTHENTICATION_BACKENDS = ["accounts.auth.ThrottledModelBackend"]
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
# Attachments (docs/attachments.md): their bytes and thumbnails live in the "attachments" storage,
# local files by default, S3-compatible object storage with CHAT_ATTACHMENT_STORAGE=s3
# (django-storages; downloads then redirect to a signed URL that expires within a minute).
CHAT_ATTACHMENT_STORAGE = env_str("CHAT_ATTACHMENT_STORAGE", "local", choices=("local", "s3"))
CHAT_ATTACHMENT_ROOT = env_str("CHAT_ATTACHMENT_ROOT", str(BASE_DIR / "media" / "attachments"))
CHAT_S3_BUCKET = env_str("CHAT_S3_BUCKET", "chat-attachments")
CHAT_S3_ENDPOINT_URL = env_str("CHAT_S3_ENDPOINT_URL")
CHAT_S3_REGION = env_str("CHAT_S3_REGION", "us-east-1")
# Empty: boto3's own credential chain (instance role, AWS_* variables, ~/.aws).
CHAT_S3_ACCESS_KEY_ID = env_str("CHAT_S3_ACCESS_KEY_ID", secret=True)
CHAT_S3_SECRET_ACCESS_KEY = env_str("CHAT_S3_SECRET_ACCESS_KEY", secret=True)
# How long a signed download URL works (seconds).
CHAT_ATTACHMENT_URL_SECONDS = 60


def attachment_storage(kind: str) -> dict[str, object]:
    """The STORAGES entry for attachments on `kind` ("local" or "s3"); tests switch with it."""
    if kind == "local":
        return {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            # No base_url: local files are served only through the download endpoint's access check.
            "OPTIONS": {"location": CHAT_ATTACHMENT_ROOT, "base_url": None},
        }
    options: dict[str, object] = {
        "bucket_name": CHAT_S3_BUCKET,
        "region_name": CHAT_S3_REGION,
        "querystring_auth": True,
        "querystring_expire": CHAT_ATTACHMENT_URL_SECONDS,
        "file_overwrite": True,  # object names are attachment ids: never a clash to avoid
        "default_acl": None,  # private objects: readable through signed URLs only
        "signature_version": "s3v4",
        "addressing_style": "path",
    }
    if CHAT_S3_ENDPOINT_URL:
        options["endpoint_url"] = CHAT_S3_ENDPOINT_URL
    if CHAT_S3_ACCESS_KEY_ID:
        options["access_key"] = CHAT_S3_ACCESS_KEY_ID
        options["secret_key"] = CHAT_S3_SECRET_ACCESS_KEY
    return {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": options}


STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    "attachments": attachment_storage(CHAT_ATTACHMENT_STORAGE),
}
# Largest attachment (SPEC 4.1) and what one user's uploads may add up to.
CHAT_MAX_ATTACHMENT_BYTES = env_int("CHAT_MAX_ATTACHMENT_BYTES", 25 * 1024 * 1024, minimum=1)
CHAT_ATTACHMENT_QUOTA_BYTES = env_int("CHAT_ATTACHMENT_QUOTA_BYTES", 1024 * 1024 * 1024, minimum=1)
# Uploads per user (each one is checked, measured and maybe decoded: CPU and disk, however small).
CHAT_UPLOAD_RATE = env_rate("CHAT_UPLOAD_RATE", "60/min")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Inbound request bodies (core/bodylimit.py): over the cap, a JSON 413 before the body is buffered.
# The default fits the largest JSON body, a 10 MiB message content plus its envelope and metadata.
CHAT_MAX_REQUEST_BYTES = env_int("CHAT_MAX_REQUEST_BYTES", 11 * 1024 * 1024, minimum=64 * 1024)
# Paths whose bodies have a cap of their own (exact path -> bytes): the attachment upload takes
# the largest attachment plus its multipart envelope (the file's own limit is exact, chat/uploads.py).
ATTACHMENT_UPLOAD_PATH = "/api/v1/attachments/"
MULTIPART_ENVELOPE_BYTES = 64 * 1024
CHAT_REQUEST_BODY_CAPS: dict[str, int] = {ATTACHMENT_UPLOAD_PATH: CHAT_MAX_ATTACHMENT_BYTES + MULTIPART_ENVELOPE_BYTES}
DATA_UPLOAD_MAX_MEMORY_SIZE = CHAT_MAX_REQUEST_BYTES

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.auth.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "chat.api_errors.exception_handler",
    # DRF's three, with JSON nesting bounded (a 400, never a RecursionError's 500).
    "DEFAULT_PARSER_CLASSES": [
        "core.parsers.BoundedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
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

# Auth (SPEC 4.1, docs/api.md#authentication): per-device tokens, hashed at rest (django-rest-knox),
# sliding expiry; failed-login and registration throttles, counted in Redis when REDIS_URL is set.
CHAT_TOKEN_TTL = env_int("CHAT_TOKEN_TTL", 30 * 86400, minimum=60)
CHAT_MAX_TOKENS_PER_USER = 100  # a login past it revokes the user's oldest token
CHAT_LOGIN_FAIL_RATE_USER = env_rate("CHAT_LOGIN_FAIL_RATE_USER", "10/15min")
CHAT_LOGIN_FAIL_RATE_ADDR = env_rate("CHAT_LOGIN_FAIL_RATE_ADDR", "30/15min")
CHAT_REGISTER_RATE = env_rate("CHAT_REGISTER_RATE", "10/hour")
CHAT_CONVERSATION_CREATE_RATE = env_rate("CHAT_CONVERSATION_CREATE_RATE", "30/hour")
REST_KNOX = {
    "TOKEN_TTL": timedelta(seconds=CHAT_TOKEN_TTL),
    "AUTO_REFRESH": True,  # sliding: each use moves the expiry...
    # ...written at most once an hour per token: a reconnect storm of thousands of sockets would
    # otherwise write every token again (knox's default is a minute), one SQLite writer at a time.
    "MIN_REFRESH_INTERVAL": 3600,
    "AUTH_HEADER_PREFIX": "Token",
}

# Channel layer: in-process for one process, Redis for several.
REDIS_URL = env_str("REDIS_URL")
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
CHAT_MESSAGE_STORE = env_str("CHAT_MESSAGE_STORE", "sql", choices=("sql", "cassandra"))
CHAT_SEND_RATE = env_rate("CHAT_SEND_RATE", "100/min")
CHAT_MAX_CONNECTIONS = env_int("CHAT_MAX_CONNECTIONS", 10000, minimum=1)
CHAT_MAX_CONNECTIONS_PER_USER = env_int("CHAT_MAX_CONNECTIONS_PER_USER", 20, minimum=1)
# WebSocket handshakes a process works on at once (chat.ws_auth.HandshakeAdmission): at the cap it
# stops accepting connections until half are done, so a reconnect storm waits in the listen queue
# instead of starting handshakes that daphne's connect timeout drops after their work was done.
# At most 400: the handshakes that come together are read in one statement each (two bound
# values per handshake; older SQLite builds take 999 in all).
CHAT_MAX_PENDING_HANDSHAKES = env_int("CHAT_MAX_PENDING_HANDSHAKES", 64, minimum=1, maximum=400)
CHAT_ALLOW_REGISTRATION = env_bool("CHAT_ALLOW_REGISTRATION", True)
CHAT_PUSH_BACKEND = env_str("CHAT_PUSH_BACKEND", "log", choices=("log", "webhook", "webpush"))
CHAT_MAX_REPLAY = env_int("CHAT_MAX_REPLAY", 1000, minimum=0)
# The user stream (SPEC section 5): a resume frame names at most this many conversations, and a
# stream carries at most CHAT_STREAM_MAX_CONVERSATIONS of the user's conversations live (the most
# recently active at the handshake; `ready` says `truncated` and the rest are read over REST), so a
# user in thousands of conversations cannot make a handshake slow or a ready frame huge.
CHAT_MAX_RESUME_CONVERSATIONS = env_int("CHAT_MAX_RESUME_CONVERSATIONS", 1000, minimum=1)
CHAT_STREAM_MAX_CONVERSATIONS = env_int("CHAT_STREAM_MAX_CONVERSATIONS", 500, minimum=1)
# Unread bytes a client may leave on the server before it is closed with 4008. Above the largest
# frame (a 10 MiB message) so a healthy client on a slow link is not cut off by one big message.
CHAT_MAX_OUTBOUND_BYTES = env_int("CHAT_MAX_OUTBOUND_BYTES", 16 * 1024 * 1024, minimum=1)
# Frames and history pages (SPEC sections 5 and 10). Content over CHAT_INLINE_CONTENT_BYTES (UTF-8)
# travels as `content: null, content_omitted: true`; the client reads it from
# GET conversations/{id}/messages/{seq}/. CHAT_MAX_FRAME_BYTES is the transport's cap on one frame,
# in and out (daphne's --websocket-max-message-size: the Makefile and tests/live.py pass this
# value): a frame over it is not sent (it costs that frame, never the connection). A history page
# or replay page stops early once its messages add up to CHAT_MAX_PAGE_BYTES (at least one message).
CHAT_INLINE_CONTENT_BYTES = env_int("CHAT_INLINE_CONTENT_BYTES", 256 * 1024, minimum=0)
CHAT_MAX_FRAME_BYTES = env_int("CHAT_MAX_FRAME_BYTES", 2 * 1024 * 1024, minimum=64 * 1024)
CHAT_MAX_PAGE_BYTES = env_int("CHAT_MAX_PAGE_BYTES", 4 * 1024 * 1024, minimum=1)
# Seconds between re-checks of every open conversation socket's membership (one task per process):
# a revocation whose publish was lost (a ban from `manage.py shell`, Redis down) still closes the
# socket with 4403 within this long.
CHAT_MEMBERSHIP_RECHECK = env_float("CHAT_MEMBERSHIP_RECHECK", 30.0, positive=True)
CHAT_WS_TICKET_TTL = 60
CHAT_MAX_GROUP_PARTICIPANTS = env_int("CHAT_MAX_GROUP_PARTICIPANTS", 1000, minimum=1)
# Threads per process for the WebSocket path's blocking work (each holds a database connection).
CHAT_WORKER_THREADS = env_int("CHAT_WORKER_THREADS", 16, minimum=1)
# Load shedding (chat/overload.py): new WebSocket sends get an `unavailable` error frame while this
# many sends of the process are in flight, or while its event loop runs this many seconds late
# (smoothed; 0 turns that check off).
CHAT_MAX_SENDS_IN_FLIGHT = env_int("CHAT_MAX_SENDS_IN_FLIGHT", 64, minimum=1)
CHAT_MAX_LOOP_LAG = env_float("CHAT_MAX_LOOP_LAG", 0.5, minimum=0)
# Seconds; the server process's sys.setswitchinterval (chatproject/application.py).
CHAT_GIL_SWITCH_INTERVAL = env_float("CHAT_GIL_SWITCH_INTERVAL", 0.0005, positive=True)

# Push notifications (docs/notifications.md); notifications.conf.load() gathers and cross-checks them.
CHAT_NOTIFICATION_MAX_ATTEMPTS = env_int("CHAT_NOTIFICATION_MAX_ATTEMPTS", 10, minimum=1)
CHAT_NOTIFICATION_BACKOFF_BASE = env_float("CHAT_NOTIFICATION_BACKOFF_BASE", 5.0, positive=True)
CHAT_NOTIFICATION_BACKOFF_MAX = env_float("CHAT_NOTIFICATION_BACKOFF_MAX", 3600.0, positive=True)
CHAT_NOTIFICATION_BACKOFF_JITTER = env_float("CHAT_NOTIFICATION_BACKOFF_JITTER", 0.5, minimum=0)
CHAT_NOTIFICATION_TIMEOUT = env_float("CHAT_NOTIFICATION_TIMEOUT", 5.0, positive=True)
CHAT_NOTIFICATION_LEASE_SECONDS = env_float("CHAT_NOTIFICATION_LEASE_SECONDS", 60.0, positive=True)
CHAT_NOTIFICATION_BATCH_SIZE = env_int("CHAT_NOTIFICATION_BATCH_SIZE", 20, minimum=1)
CHAT_NOTIFICATION_POLL_INTERVAL = env_float("CHAT_NOTIFICATION_POLL_INTERVAL", 1.0, positive=True)
CHAT_NOTIFICATION_RETENTION_DAYS = env_int("CHAT_NOTIFICATION_RETENTION_DAYS", 7, minimum=0)
# Defaults of run_notifications' --metrics-port (0: off) and --metrics-addr.
CHAT_NOTIFICATION_METRICS_PORT = env_int("CHAT_NOTIFICATION_METRICS_PORT", 0, minimum=0, maximum=65535)
CHAT_NOTIFICATION_METRICS_ADDR = env_str("CHAT_NOTIFICATION_METRICS_ADDR", "127.0.0.1")
CHAT_MAX_DEVICES_PER_USER = env_int("CHAT_MAX_DEVICES_PER_USER", 20, minimum=1)
CHAT_WEBHOOK_URL = env_str("CHAT_WEBHOOK_URL")
CHAT_WEBHOOK_SECRET = env_str("CHAT_WEBHOOK_SECRET", secret=True)
CHAT_VAPID_PRIVATE_KEY = env_str("CHAT_VAPID_PRIVATE_KEY", secret=True)
CHAT_VAPID_SUBJECT = env_str("CHAT_VAPID_SUBJECT")
CHAT_WEBPUSH_TTL = env_int("CHAT_WEBPUSH_TTL", 86400, minimum=0)
# Development only: also plain http, any port and loopback Web Push endpoints.
CHAT_WEBPUSH_ALLOW_HTTP = env_bool("CHAT_WEBPUSH_ALLOW_HTTP", False)
# Web Push endpoints only on these host suffixes (e.g. fcm.googleapis.com,*.notify.windows.com); empty: any public host.
CHAT_PUSH_ALLOWED_HOSTS = env_list("CHAT_PUSH_ALLOWED_HOSTS", "")
CHAT_NOTIFICATION_CONCURRENCY = env_int("CHAT_NOTIFICATION_CONCURRENCY", 16, minimum=1)
CHAT_NOTIFICATION_PER_HOST_CONCURRENCY = env_int("CHAT_NOTIFICATION_PER_HOST_CONCURRENCY", 4, minimum=1)
CHAT_NOTIFICATION_BREAKER_THRESHOLD = env_int("CHAT_NOTIFICATION_BREAKER_THRESHOLD", 5, minimum=1)
CHAT_NOTIFICATION_BREAKER_COOLDOWN = env_float("CHAT_NOTIFICATION_BREAKER_COOLDOWN", 60.0, positive=True)

# Metrics: set when several processes share one Prometheus directory (prometheus_client reads it
# too); each process then marks its live gauges dead as it exits.
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR")
# Who may read /metrics (chatproject/metrics.py): these addresses or networks, or a bearer token.
CHAT_METRICS_ALLOWED_IPS = []
for _network in env_list("CHAT_METRICS_ALLOWED_IPS", "127.0.0.1,::1"):
    try:
        CHAT_METRICS_ALLOWED_IPS.append(str(ipaddress.ip_network(_network, strict=False)))
    except ValueError:
        env.invalid("CHAT_METRICS_ALLOWED_IPS", _network, "IP addresses or networks, e.g. 127.0.0.1,::1,10.0.0.0/8")
CHAT_METRICS_TOKEN = env_str("CHAT_METRICS_TOKEN", secret=True)

LOG_LEVEL = env_str("LOG_LEVEL", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}

# ============================== Cassandra message store (docs/cassandra.md) ==============================
# Plain values and a factory, always defined: `manage.py cassandra_schema` and the tests use them. The
# database alias and django-cassandra-engine are registered only when CHAT_MESSAGE_STORE=cassandra,
# so the default run (SQLite, sql store) never opens a connection to Cassandra.

from typing import Any  # noqa: E402

from cassandra.cluster import EXEC_PROFILE_DEFAULT, ExecutionProfile  # noqa: E402
from cassandra.policies import (  # noqa: E402
    ConstantSpeculativeExecutionPolicy,
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    TokenAwarePolicy,
)

CASSANDRA_CONSISTENCY_LEVELS = ("ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE")


def _cassandra_replication(value: str) -> dict[str, str | int]:
    """CASSANDRA_REPLICATION as a CQL replication map (ValueError if it is none). Formats:
    `SimpleStrategy:<rf>` (one data centre) or `NetworkTopologyStrategy:<dc>=<rf>[,<dc>=<rf>...]`,
    e.g. `NetworkTopologyStrategy:dc1=3`."""
    strategy, _, factors = value.strip().partition(":")
    try:
        if strategy == "SimpleStrategy":
            return {"class": strategy, "replication_factor": int(factors)}
        if strategy == "NetworkTopologyStrategy" and factors:
            per_dc = (item.split("=", 1) for item in factors.split(","))
            return {"class": strategy, **{dc.strip(): int(rf) for dc, rf in per_dc}}
    except ValueError:
        pass
    raise ValueError(value)


CASSANDRA_HOSTS = env_list("CASSANDRA_HOSTS", "127.0.0.1")
CASSANDRA_PORT = env_int("CASSANDRA_PORT", 9042, minimum=1, maximum=65535)
CASSANDRA_KEYSPACE = env_str("CASSANDRA_KEYSPACE", "chat")
_replication = env_str("CASSANDRA_REPLICATION", "SimpleStrategy:1")
try:
    CASSANDRA_REPLICATION = _cassandra_replication(_replication)
except ValueError:
    env.invalid("CASSANDRA_REPLICATION", _replication, "SimpleStrategy:<rf> or NetworkTopologyStrategy:<dc>=<rf>[,...]")
    CASSANDRA_REPLICATION = _cassandra_replication("SimpleStrategy:1")
# Used for every read and write; lightweight transactions add LOCAL_SERIAL for their Paxos round.
CASSANDRA_CONSISTENCY = env_str("CASSANDRA_CONSISTENCY", "LOCAL_QUORUM", choices=CASSANDRA_CONSISTENCY_LEVELS)
# The data centre this process lives in (LOCAL_QUORUM counts its replicas); empty = the first
# contact point's, which is right when CASSANDRA_HOSTS lists local nodes only.
CASSANDRA_LOCAL_DC = env_str("CASSANDRA_LOCAL_DC")
# Seconds: the longest a store call waits for Cassandra (each request, and each connection attempt)
# before the send fails fast with 503 instead of holding a worker.
CASSANDRA_REQUEST_TIMEOUT = env_float("CASSANDRA_REQUEST_TIMEOUT", 2.0, positive=True)
# Seconds: an idempotent statement (inserts, reads) that has no answer from its replica by then is
# also sent to the next replica, and the first answer wins. A node that crashed, hangs or is paused
# then costs a send this delay instead of a 503 at CASSANDRA_REQUEST_TIMEOUT while a quorum is alive.
CASSANDRA_SPECULATIVE_DELAY = env_float("CASSANDRA_SPECULATIVE_DELAY", 0.25, positive=True)
# Native protocol version. v5 wraps every frame in checksummed segments that the Python driver
# builds and verifies in Python (1.8 % of the server's Python CPU under load, docs/performance.md);
# v4 leaves integrity to TCP, as every release before Cassandra 4.0 did.
CASSANDRA_PROTOCOL_VERSION = env_int("CASSANDRA_PROTOCOL_VERSION", 4, choices=(3, 4, 5))


def _cassandra_database(keyspace: str) -> dict[str, Any]:
    """A django-cassandra-engine DATABASES entry for `keyspace`. A function, because each driver
    Cluster needs its own policy objects (they hold per-cluster state) and the library pops keys
    out of the OPTIONS it is given. lazy_connect + retry_connect: the process starts with Cassandra
    down and connects on first use, retrying on later uses until it succeeds. The reconnection
    policy caps the driver's retry delay for a node that went down at 5 s (the default grows to
    10 min), so the service heals by itself within seconds of Cassandra's return. The default
    execution profile holds the per-request policies (the driver takes speculative execution only
    from a profile) and the request timeout; cqlengine sets its row factory on it."""
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
                "execution_profiles": {
                    EXEC_PROFILE_DEFAULT: ExecutionProfile(
                        # Token aware: each statement goes straight to a replica of its partition.
                        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=CASSANDRA_LOCAL_DC)),
                        # Up to two more replicas (RF 3), for statements marked idempotent only.
                        speculative_execution_policy=ConstantSpeculativeExecutionPolicy(
                            delay=CASSANDRA_SPECULATIVE_DELAY, max_attempts=2
                        ),
                        # Bounds statement preparation too (the store passes the same to each execute).
                        request_timeout=CASSANDRA_REQUEST_TIMEOUT,
                    )
                },
            },
        },
    }


# keyspace -> DATABASES entry; the schema command and the store's tests connect through it.
CASSANDRA_DATABASE_FOR = _cassandra_database
# cqlengine reads this switch from the environment and refuses schema changes without it (a
# warning today, an error in future versions); only chat.cassandra_models.sync_schema changes it.
os.environ.setdefault("CQLENG_ALLOW_SCHEMA_MANAGEMENT", "1")
if CHAT_MESSAGE_STORE == "cassandra":
    DATABASES["cassandra"] = _cassandra_database(CASSANDRA_KEYSPACE)
    # For its `sync_cassandra` command, the library's equivalent of `manage.py cassandra_schema`.
    INSTALLED_APPS.append("django_cassandra_engine")
# ============================ end of Cassandra message store settings ============================
