"""Evaluation: labelled data, running a chain over it, scores, reports, figures and A/B comparison."""
