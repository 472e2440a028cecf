"""Prometheus series of push notifications (the enqueue error counter lives with the send path,
in chat/metrics.py). Most are updated by `run_notifications` workers: with
PROMETHEUS_MULTIPROC_DIR shared by the web and worker processes they appear on the web /metrics;
otherwise each worker serves its own with --metrics-port."""
from prometheus_client import Counter, Gauge, Histogram

sent = Counter("chat_notification_sent_total", "Notifications accepted by the push backend.", ["backend"])
# queue: "delivery" (an attempt at the push backend) or "outbox" (expanding a message into deliveries).
failed = Counter("chat_notification_failed_total", "Failed attempts, each one counted.", ["queue"])
retried = Counter("chat_notification_retried_total", "Failed attempts scheduled to be tried again.", ["queue"])
dead_lettered = Counter(
    "chat_notification_dead_lettered_total", "Jobs that used up their attempts.", ["queue"]
)
skipped = Counter(
    "chat_notification_skipped_total",
    "Deliveries dropped on purpose (read, muted, left, message deleted, device gone).",
    ["reason"],
)
requeued = Counter("chat_notification_requeued_total", "Jobs re-queued by an operator.", ["queue"])
released = Counter(
    "chat_notification_released_total", "Claimed jobs handed back unattempted (shutdown, lease running out)."
)
# Queue-wide figures computed from the database by every worker: identical across workers, so in
# multiprocess mode the most recent value of a live process is the answer.
queue_depth = Gauge(
    "chat_notification_queue_depth",
    "Pending jobs (due or scheduled for retry).",
    ["queue"],
    multiprocess_mode="livemostrecent",
)
dead_letters = Gauge(
    "chat_notification_dead_letters", "Jobs in the dead letters.", ["queue"], multiprocess_mode="livemostrecent"
)
oldest_pending_age = Gauge(
    "chat_notification_oldest_pending_age_seconds",
    "Age of the oldest pending job; grows when workers are down or behind.",
    ["queue"],
    multiprocess_mode="livemostrecent",
)
delivery_latency = Histogram(
    "chat_notification_delivery_latency_seconds",
    "From the message's send to its notification being accepted by the push backend.",
    ["backend"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600),
)
attempt_duration = Histogram(
    "chat_notification_attempt_duration_seconds",
    "Time spent in the push backend per attempt, failed or not.",
    ["backend"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
deferred = Counter(
    "chat_notification_deferred_total",
    "Claimed deliveries handed back unattempted because their host's circuit breaker was open.",
)
breaker_opened = Counter(
    "chat_notification_breaker_opened_total",
    "Times a host's circuit breaker opened after consecutive failed attempts.",
)
