"""Corrections and confirmations of the chain's answers, and what is learned from them: the SQLite store
(``store``), per-user thresholds (``users``), training and calibration rows and the active-learning queue
(``data``).  The server shows the store's figures as Prometheus gauges (``serve/metrics.py``)."""
