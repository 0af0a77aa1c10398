"""Scoring beside the yardstick: figures that say how a model reads text, each with its protocol."""
