from django.apps import AppConfig


class WeightsConfig(AppConfig):
    name = "weights"
    verbose_name = "Weights"

    def ready(self) -> None:
        from weights import receivers  # noqa: F401
