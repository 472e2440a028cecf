from django.urls import path

from webclient import views

urlpatterns = [path("", views.index, name="webclient")]
