from django.urls import path

from inference_demo import api, views

app_name = "inference_demo"

urlpatterns = [
    path("demo/", views.demo_list, name="list"),
    path("demo/requests/<int:pk>/cancel/", views.cancel, name="cancel"),
    path("demo/<slug:slug>/", views.demo_page, name="page"),
    path("demo/<slug:slug>/generate/", views.generate, name="generate"),
    path("api/demo/<slug:slug>/generate/", api.DemoGenerate.as_view(), name="api_generate"),
    path("api/demo/requests/<int:pk>/cancel/", api.DemoCancel.as_view(), name="api_cancel"),
]
