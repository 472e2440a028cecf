"""/metrics for the operator only (SPEC 10): CHAT_METRICS_ALLOWED_IPS, or CHAT_METRICS_TOKEN."""
from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django_prometheus.exports import ExportToDjangoView


def metrics_view(request: HttpRequest) -> HttpResponse:
    if _allowed_address(request.META.get("REMOTE_ADDR", "")) or _valid_token(request.META.get("HTTP_AUTHORIZATION", "")):
        return ExportToDjangoView(request)
    # 403 rather than 404: /metrics is django-prometheus' well-known path, nothing to hide; a scraper
    # set up wrong should read why.
    return JsonResponse(
        {"detail": "Metrics are served to CHAT_METRICS_ALLOWED_IPS or with the metrics token.", "code": "forbidden"},
        status=403,
    )


def _allowed_address(remote: str) -> bool:
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None):
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 from a dual-stack listener
    for network in settings.CHAT_METRICS_ALLOWED_IPS:
        network = ipaddress.ip_network(network, strict=False)
        if address.version == network.version and address in network:
            return True
    return False


def _valid_token(header: str) -> bool:
    token = settings.CHAT_METRICS_TOKEN
    scheme, _, given = header.partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
