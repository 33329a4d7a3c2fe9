"""Counts in the words printed to a user: "1 token", "2 tokens"."""


def count(n: int, noun: str, fmt: str = "") -> str:
    """n (formatted with fmt, e.g. "," for thousands separators) and the noun, plural unless n is 1."""
    return f"{n:{fmt}} {noun}{'' if n == 1 else 's'}"
