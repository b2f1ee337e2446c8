"""Corrections and confirmations of the chain's answers, and what is learned from them: the SQLite store
(``store``), per-user thresholds (``users``), training and calibration rows and the active-learning queue
(``data``), and the store's Prometheus gauges (``collector``)."""
