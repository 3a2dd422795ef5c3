"""Small helpers shared across stages."""
