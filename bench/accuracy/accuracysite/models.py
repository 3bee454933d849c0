from __future__ import annotations

from django.db import models


class Item(models.Model):
    """A catalogue row that the database views query and render."""

    name = models.CharField(max_length=100)
    price = models.IntegerField()
    description = models.TextField()

    def __str__(self) -> str:
        return self.name
