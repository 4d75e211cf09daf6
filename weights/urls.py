from django.urls import path, re_path

from weights import serving, views

app_name = "weights"

TOKEN = r"(?P<token>[^/]+)"

urlpatterns = [
    path("releases/", views.catalogue, name="catalogue"),
    path("downloads/", views.my_downloads, name="my_downloads"),
    path("downloads/<int:grant_id>/fresh-link/", views.fresh_link, name="fresh_link"),
    re_path(rf"^d/{TOKEN}/$", serving.landing, name="landing"),
    re_path(rf"^d/{TOKEN}/manifest\.json$", serving.manifest, name="manifest"),
    re_path(rf"^d/{TOKEN}/download\.sh$", serving.download_script, name="download_script"),
    re_path(
        rf"^d/{TOKEN}/llama-stack\.json$",
        serving.llama_stack_manifest,
        name="llama_stack_manifest",
    ),
    re_path(rf"^d/{TOKEN}/(?P<path>[\s\S]+)$", serving.file, name="file"),
]
