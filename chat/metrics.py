"""Prometheus series. The names in the first block are used by existing dashboards: keep them."""
from prometheus_client import Counter, Gauge, Histogram

message_send_unauthorized = Counter(
    "chat_message_send_unauthorized_total", "Sends refused because the sender may not write the conversation."
)
websocket_handshake_shed = Counter(
    "chat_websocket_handshake_shed_total",
    "WebSocket handshakes refused because the process had CHAT_MAX_PENDING_HANDSHAKES in progress and the queue behind them was full or too slow.",
)
websocket_connection_unauthorized = Counter(
    "chat_websocket_connection_unauthorized_total", "WebSocket handshakes refused (auth, membership, origin, limits)."
)
broadcast_panic = Counter("chat_broadcast_panic_total", "Unexpected exceptions while delivering to a connection.")
redis_subscription_active = Gauge(
    "chat_redis_subscription_active", "Channel-layer group subscriptions held by this process (one per group with local sockets).", multiprocess_mode="livesum"
)
message_created = Counter("chat_message_created_total", "Messages created.", ["message_type", "is_encrypted"])
message_persisted = Counter("chat_message_persisted_total", "Message store writes by outcome.", ["status"])
message_published = Counter("chat_message_published_total", "Channel-layer publishes by outcome.", ["status"])
redis_publish_success = Counter("chat_redis_publish_success_total", "Publishes accepted by the Redis channel layer.")
redis_publish_error = Counter("chat_redis_publish_error_total", "Publishes that failed on the Redis channel layer.")
broadcast_channel_length = Gauge(
    "chat_broadcast_channel_length", "Events buffered for in-order delivery, all connections.", multiprocess_mode="livesum"
)
broadcast_dropped = Counter("chat_broadcast_dropped_total", "Events dropped before delivery (duplicates, stale).")
client_send_channel_length = Gauge(
    "chat_client_send_channel_length",
    "Bytes written for clients that their sockets have not taken yet, all connections.",
    multiprocess_mode="livesum",
)
client_message_dropped = Counter(
    "chat_client_message_dropped_total",
    "Frames not sent to a client: it was too slow or closing, the frame was over the transport's cap, or the write failed.",
)
message_delivery_duration = Histogram(
    "chat_message_delivery_duration_seconds",
    "Time spent per step of a message's lifecycle.",
    ["step"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
idempotency_hit = Counter("chat_message_idempotency_hit_total", "Sends answered from an earlier identical request.")
idempotency_miss = Counter("chat_message_idempotency_miss_total", "Sends with an idempotency key seen for the first time.")

# Beyond the dashboard names: what an operator needs on top.
websocket_connections = Gauge(
    "chat_websocket_connections", "Open WebSocket connections.", multiprocess_mode="livesum"
)
send_batch_size = Histogram(
    "chat_message_send_batch_size",
    "WebSocket sends committed together in one transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
send_rate_limited = Counter("chat_message_rate_limited_total", "Sends refused by the rate limit.", ["transport"])
message_shed = Counter(
    "chat_message_shed_total", "WebSocket sends refused because the process was overloaded (chat.overload)."
)
frame_too_large = Counter(
    "chat_websocket_frame_too_large_total",
    "Frames not sent because they were over CHAT_MAX_FRAME_BYTES (an error frame went instead).",
)
membership_recheck_closed = Counter(
    "chat_membership_recheck_closed_total",
    "Sockets closed (4403) by the membership re-check (periodic, or after resubscribing): their revocation never reached them.",
)
redis_resubscribed = Counter(
    "chat_redis_resubscribed_total",
    "Times the channel layer's subscriptions were made again after Redis went away (events published meanwhile are lost).",
)
replayed_messages = Counter("chat_websocket_replayed_messages_total", "Messages replayed from the store on connect.")
gap_fills = Counter("chat_websocket_gap_fills_total", "Out-of-order arrivals filled from the store.")
notification_enqueue_error = Counter(
    "chat_notification_enqueue_error_total", "Sends whose notification outbox write failed."
)
