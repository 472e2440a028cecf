"""Idempotency records move into the send's relational transaction, for every message store
(SPEC v2): they name the message by (conversation, seq) and carry no completion flag, since they
commit with the message or not at all. Records of the earlier table are dropped: a retry of a send
made before this migration, within its 48 hours, is taken as a new send."""
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("chat", "0002_report")]

    operations = [
        migrations.DeleteModel(name="SqlIdempotencyKey"),
        migrations.CreateModel(
            name="IdempotencyKey",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("sender_id", models.UUIDField()),
                ("key", models.CharField(max_length=255)),
                ("request_hash", models.CharField(max_length=64)),
                ("conversation_id", models.UUIDField()),
                ("seq", models.BigIntegerField()),
                ("message_id", models.UUIDField()),
                ("created_at", models.DateTimeField(db_index=True)),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(fields=("sender_id", "key"), name="idempotency_sender_key")
                ]
            },
        ),
    ]
