from django.urls import path
from django.views.generic import RedirectView

from access import token_views, views

app_name = "access"

urlpatterns = [
    path("apply/", views.apply, name="apply"),
    path("applications/", views.application_list, name="application_list"),
    path("applications/<int:pk>/", views.application_detail, name="application_detail"),
    path(
        "applications/<int:pk>/withdraw/", views.application_withdraw, name="application_withdraw"
    ),
    path("applications/<int:pk>/answer/", views.application_answer, name="application_answer"),
    path("license/", views.license_current, name="license"),
    path("license/accept/", views.license_accept, name="license_accept"),
    path("account/api-tokens/", token_views.api_tokens, name="api_tokens"),
    path(
        "account/api-tokens/<str:token_key>/revoke/",
        token_views.api_token_revoke,
        name="api_token_revoke",
    ),
    path(
        "account/api-tokens/revoke-all/",
        token_views.api_token_revoke_all,
        name="api_token_revoke_all",
    ),
    path("account/api-token/", RedirectView.as_view(pattern_name="access:api_tokens")),
]
