from django.urls import path

from notifications import views

urlpatterns = [
    path("push/devices/", views.DeviceListView.as_view(), name="push-device-list"),
    path("push/devices/<uuid:device_id>/", views.DeviceDetailView.as_view(), name="push-device-detail"),
    path("push/vapid-public-key/", views.VapidPublicKeyView.as_view(), name="push-vapid-public-key"),
]
