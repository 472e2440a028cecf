"""The web client's one page. Everything else it needs is a static file (webclient/static/) or the
public API: the page holds no data and no inline script, so a strict Content-Security-Policy fits."""
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from django.shortcuts import render

# Only this origin: scripts, styles, API calls and the WebSocket ('self' covers ws:/wss: of the same
# host in CSP Level 3); images also from blob: URLs (attachment previews are fetched with the token
# and shown from memory). No inline script or style anywhere, no third-party request, no framing.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",
    "connect-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])


@require_GET
@never_cache  # the page names the current static files; it must never be served stale
def index(request):
    response = render(request, "webclient/index.html")
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response["Referrer-Policy"] = "no-referrer"
    return response
