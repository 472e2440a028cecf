from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from chatproject.metrics import metrics_view

urlpatterns = [
    # The web client (webclient/): what a person opens after `make run`.
    path("", include("webclient.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", include("accounts.urls")),
    path("api/v1/", include("chat.urls")),
    path("api/v1/", include("notifications.urls")),
    path("api/v1/", include("chatproject.api_root")),
    path("api/auth/", include("rest_framework.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    # django_prometheus' exporter, behind CHAT_METRICS_ALLOWED_IPS / CHAT_METRICS_TOKEN.
    path("metrics", metrics_view, name="prometheus-django-metrics"),
]
