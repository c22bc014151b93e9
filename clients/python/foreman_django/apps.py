from django.apps import AppConfig
from django.core.signals import setting_changed


class ForemanConfig(AppConfig):
    name = "foreman_django"
    verbose_name = "foreman"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from foreman_django import _reset_client

        setting_changed.connect(_reset_client)
