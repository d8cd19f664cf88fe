"""Downstream evaluation of trained models with lm-evaluation-harness."""
