"""Glue shared by the encode and language sides: tiny checkpoint, parity helpers."""
