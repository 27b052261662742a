"""Counterfactual fine-tuning of CLIP image encoders."""
