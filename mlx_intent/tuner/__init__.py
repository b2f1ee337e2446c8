"""Fitting to data: LoRA training of the LLM tiers and calibration of every tier's confidence."""
