"""Layers and heads the backbones and objectives share."""
