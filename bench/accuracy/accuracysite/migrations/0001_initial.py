from __future__ import annotations

from django.db import migrations, models


def add_items(apps, schema_editor):  # type: ignore[no-untyped-def]
    Item = apps.get_model("accuracysite", "Item")
    Item.objects.bulk_create(
        Item(name=f"Item {n}", price=n * 7 % 100, description=f"The item number {n}. " * 8)
        for n in range(1, 201)
    )


class Migration(migrations.Migration):
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="Item",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("name", models.CharField(max_length=100)),
                ("price", models.IntegerField()),
                ("description", models.TextField()),
            ],
        ),
        migrations.RunPython(add_items, migrations.RunPython.noop),
    ]
