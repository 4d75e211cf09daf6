from django.urls import include, path

from access import api, api_grants, claim_api, token_api

app_name = "api"

urlpatterns = [
    path("", include("weights.api_urls")),
    path("tokens/", token_api.TokenListCreate.as_view(), name="token-list"),
    path("tokens/<str:key>/", token_api.TokenDetail.as_view(), name="token-detail"),
    path("license/", api.CurrentLicense.as_view(), name="license-current"),
    path("license/accept/", api.LicenseAccept.as_view(), name="license-accept"),
    path("applications/", api.ApplicationListCreate.as_view(), name="application-list"),
    path("applications/<int:pk>/", api.ApplicationDetail.as_view(), name="application-detail"),
    path(
        "applications/<int:pk>/submit/", api.ApplicationSubmit.as_view(), name="application-submit"
    ),
    path(
        "applications/<int:pk>/withdraw/",
        api.ApplicationWithdraw.as_view(),
        name="application-withdraw",
    ),
    path(
        "applications/<int:pk>/answer/", api.ApplicationAnswer.as_view(), name="application-answer"
    ),
    path("review/applications/", api.ReviewQueue.as_view(), name="review-queue"),
    path("review/applications/<int:pk>/", api.ReviewDetail.as_view(), name="review-detail"),
    path(
        "review/applications/<int:pk>/approve/", api.ReviewApprove.as_view(), name="review-approve"
    ),
    path("review/applications/<int:pk>/reject/", api.ReviewReject.as_view(), name="review-reject"),
    path(
        "review/applications/<int:pk>/request-info/",
        api.ReviewRequestInfo.as_view(),
        name="review-request-info",
    ),
    path("review/applications/<int:pk>/revoke/", api.ReviewRevoke.as_view(), name="review-revoke"),
    path(
        "review/applications/<int:pk>/claim/", claim_api.ReviewClaim.as_view(), name="review-claim"
    ),
    path(
        "review/applications/<int:pk>/release-claim/",
        claim_api.ReviewReleaseClaim.as_view(),
        name="review-release-claim",
    ),
    path("review/grants/", api_grants.ReviewGrantListCreate.as_view(), name="review-grant-list"),
    path(
        "review/grants/<int:pk>/revoke/",
        api_grants.ReviewGrantRevoke.as_view(),
        name="review-grant-revoke",
    ),
]
