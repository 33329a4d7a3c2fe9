"""Ops: each has a plain-mx reference and, where it pays, fast paths chosen in one place."""
