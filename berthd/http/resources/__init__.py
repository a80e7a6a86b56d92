"""Falcon resources: commands in, projections out."""
