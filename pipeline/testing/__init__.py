"""Test machinery kept out of product code: fault injection for training stages (reached through
pipeline/train/hooks.py). The demo's synthetic shapes are product: pipeline/data/shapes.py."""
