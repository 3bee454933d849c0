"""A small project with known memory behaviour, for the accuracy benchmark (bench/accuracy)."""
