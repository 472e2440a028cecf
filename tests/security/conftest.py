# The notification fixtures (fake DNS and the loopback-only connection guard among them).
from tests.notifications.conftest import (  # noqa: F401
    fake_dns,
    make_device,
    make_worker,
    notification_env,
    receiver,
    webhook,
)
