"""The project's URLs plus the notifications API, mounted where chatproject/urls.py mounts it."""
from django.urls import include, path

from chatproject.urls import urlpatterns as project_urlpatterns

urlpatterns = [path("api/v1/", include("notifications.urls")), *project_urlpatterns]
