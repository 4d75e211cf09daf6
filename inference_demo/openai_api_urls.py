"""Routes of the OpenAI API on the portal (inference_demo.openai_api), under /api/v1/.

Paths as OpenAI's, without a trailing slash (the openai client appends `/completions` to
its base URL); anything else under /api/v1/ is OpenAI's 404, not the portal API's."""

from django.urls import re_path

from inference_demo import openai_api

app_name = "openai_api"

urlpatterns = [
    re_path(r"^models\Z", openai_api.models_list, name="models"),
    re_path(r"^models/(?P<model>[^/]+)\Z", openai_api.model_retrieve, name="model"),
    re_path(r"^completions\Z", openai_api.completions, name="completions"),
    re_path(r"^chat/completions\Z", openai_api.chat_completions, name="chat-completions"),
    re_path(r"^(?P<path>[\s\S]*)\Z", openai_api.unknown_url, name="unknown"),
]
