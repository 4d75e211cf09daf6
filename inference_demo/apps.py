from django.apps import AppConfig


class InferenceDemoConfig(AppConfig):
    name = "inference_demo"
    verbose_name = "Inference demo"
