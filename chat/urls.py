from django.urls import path

from chat import attachment_views, views

urlpatterns = [
    path("conversations/", views.ConversationListView.as_view(), name="conversation-list"),
    path("conversations/<uuid:conversation_id>/", views.ConversationDetailView.as_view(), name="conversation-detail"),
    path(
        "conversations/<uuid:conversation_id>/participants/",
        views.ParticipantListView.as_view(),
        name="participant-list",
    ),
    path(
        "conversations/<uuid:conversation_id>/participants/<uuid:user_id>/",
        views.ParticipantDetailView.as_view(),
        name="participant-detail",
    ),
    path("conversations/<uuid:conversation_id>/mute/", views.ConversationMuteView.as_view(), name="conversation-mute"),
    path("conversations/<uuid:conversation_id>/read/", views.ReadMarkerView.as_view(), name="read-marker"),
    path("conversations/<uuid:conversation_id>/changes/", views.ChangeListView.as_view(), name="change-list"),
    path("conversations/<uuid:conversation_id>/messages/", views.MessageHistoryView.as_view(), name="message-history"),
    path(
        "conversations/<uuid:conversation_id>/messages/<int:seq>/",
        views.MessageDetailView.as_view(),
        name="message-detail",
    ),
    path(
        "conversations/<uuid:conversation_id>/messages/<int:seq>/report/",
        views.MessageReportView.as_view(),
        name="message-report",
    ),
    path(
        "conversations/<uuid:conversation_id>/messages/<int:seq>/replies/",
        views.MessageRepliesView.as_view(),
        name="message-replies",
    ),
    path(
        "conversations/<uuid:conversation_id>/messages/<int:seq>/edits/",
        views.MessageEditsView.as_view(),
        name="message-edits",
    ),
    path(
        "conversations/<uuid:conversation_id>/messages/<int:seq>/reactions/<str:emoji>/",
        views.ReactionView.as_view(),
        name="message-reaction",
    ),
    path("messages/", views.MessageSendView.as_view(), name="message-send"),
    path("attachments/", attachment_views.AttachmentUploadView.as_view(), name="attachment-upload"),
    # <str:>: a malformed id gets the same 403 as a foreign one, not a 404 that tells them apart.
    path("attachments/<str:attachment_id>/", attachment_views.AttachmentDownloadView.as_view(), name="attachment-download"),
    path(
        "attachments/<str:attachment_id>/thumbnail/",
        attachment_views.AttachmentThumbnailView.as_view(),
        name="attachment-thumbnail",
    ),
]
