from django.urls import path

from accounts import views

urlpatterns = [
    path("auth/register/", views.RegisterView.as_view(), name="register"),
    path("auth/token/", views.TokenView.as_view(), name="token"),
    path("auth/logout/", views.LogoutView.as_view(), name="logout"),
    path("auth/password/", views.PasswordChangeView.as_view(), name="password-change"),
    path("auth/ws-ticket/", views.WebSocketTicketView.as_view(), name="ws-ticket"),
    path("users/me/", views.MeView.as_view(), name="me"),
    path("users/", views.UserSearchView.as_view(), name="user-search"),
]
