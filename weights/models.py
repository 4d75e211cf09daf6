from __future__ import annotations

from django.db import models


class Release(models.Model):
    """A downloadable model release. The weights issue extends it with files."""

    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    sort_order = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["sort_order", "name"]

    def __str__(self) -> str:
        return self.name
