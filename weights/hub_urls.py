"""Routes of the Hugging Face Hub protocol (weights.hub). Any namespace routes here, so
that a repo outside WEIGHTS_HUB_NAMESPACE gets the RepoNotFound the client understands."""

from django.urls import re_path

from weights import hub

app_name = "hub"

REPO = r"(?P<namespace>[-\w.]+)/(?P<name>[-\w.]+)"
REV = r"(?P<revision>[^/]+)"

urlpatterns = [
    re_path(r"^api/whoami-v2\Z", hub.whoami, name="whoami"),
    re_path(rf"^api/models/{REPO}\Z", hub.model_info, name="model-info"),
    re_path(rf"^api/models/{REPO}/revision/{REV}\Z", hub.model_info, name="model-revision"),
    re_path(rf"^api/models/{REPO}/tree/{REV}\Z", hub.tree, name="tree"),
    re_path(rf"^api/models/{REPO}/tree/{REV}/(?P<path>[\s\S]+)\Z", hub.tree, name="tree-path"),
    re_path(rf"^{REPO}/resolve/{REV}/(?P<path>[\s\S]+)\Z", hub.resolve, name="resolve"),
]
