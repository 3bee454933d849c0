"""On MySQL and MariaDB, compare the key columns byte for byte; a no-op on other databases.

Their default collations (utf8mb4_general_ci, utf8mb4_0900_ai_ci) ignore case, and the PAD SPACE
ones ignore trailing spaces too (utf8mb4_bin among them), so the unique constraint would merge
"/About/", "/about/" and "/about/ " into one row. The NO PAD binary collations do not. The
collation is not in the model (Field.db_collation would name it on every backend): a later
AlterField of these columns on MySQL must put it back.
"""

from django.db import migrations

# Columns of the unique constraints that hold text: table, [(column, max_length), ...].
KEY_COLUMNS = [
    ("django_leakguard_growth", [("kind", 16), ("key", 255)]),
    ("django_leakguard_worker", [("host", 255)]),
]


def binary_collation(connection):
    # MySQL 8's utf8mb4_bin is PAD SPACE; utf8mb4_0900_bin is its NO PAD binary collation.
    return "utf8mb4_nopad_bin" if connection.mysql_is_mariadb else "utf8mb4_0900_bin"


def alter_key_columns(schema_editor, collate):
    qn = schema_editor.quote_name
    for table, columns in KEY_COLUMNS:
        changes = ", ".join(
            f"MODIFY {qn(column)} varchar({length}){collate} NOT NULL"
            for column, length in columns
        )
        schema_editor.execute(f"ALTER TABLE {qn(table)} {changes}")


def use_binary_collation(apps, schema_editor):
    if schema_editor.connection.vendor == "mysql":
        collation = binary_collation(schema_editor.connection)
        alter_key_columns(schema_editor, f" CHARACTER SET utf8mb4 COLLATE {collation}")


def use_table_collation(apps, schema_editor):
    # Back to the table's default, as Django created the columns. This fails on rows whose keys
    # differ only in case or trailing spaces, which that collation cannot keep apart.
    if schema_editor.connection.vendor == "mysql":
        alter_key_columns(schema_editor, "")


class Migration(migrations.Migration):

    dependencies = [
        ("django_leakguard", "0002_traced"),
    ]

    operations = [
        # Not atomic: MySQL's DDL commits, and Django refuses it inside a transaction.
        migrations.RunPython(use_binary_collation, use_table_collation, atomic=False),
    ]
