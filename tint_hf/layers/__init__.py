"""Layers shared by the mesa model folders (each folder links these files, so each uploads as remote code)."""
