"""Target descriptions (one JSON file per target) shipped as package data."""
