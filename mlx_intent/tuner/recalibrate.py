"""Live recalibration (``serve --recalibrate-every N``): refit a serving tier's calibration on the feedback
store's calibration part, without a restart.  It lives in the tuner because refitting is tuning: the feedback
store only holds the rows."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace

from mlx_intent.feedback import data
from mlx_intent.feedback.data import calibration_part
from mlx_intent.feedback.store import Store, StoreError, written

log = logging.getLogger("mlx_intent.tuner.recalibrate")
POLL_S = 1.0  # seconds between looks at the feedback store


def refit_classifier(clf, rows: list[dict], batch_size: int = 8) -> dict | None:
    """Fit a loaded tier's calibration on ``rows`` and swap it in (None: a tier with nothing to refit here).
    The e5-small tier gets a new frozen HeadConfig in one reference swap; an LLM tier a new temperature and
    threshold.  Call it where no classification runs beside it (``Recalibrator`` does)."""
    from mlx_intent.classifier import IntentClassifier
    from mlx_intent.encoder import EncoderClassifier

    if isinstance(clf, EncoderClassifier):
        from mlx_intent.tuner.encoder import calibrate_head

        fitted = calibrate_head(clf, rows, report=log.info)
        cal, combo = fitted["calibration"], fitted["combination"]
        clf.config = replace(
            clf.config,
            temperature=float(cal["temperature"]),
            threshold=float(cal["threshold"]),
            calibrated_on="feedback",
            combination=(float(combo["a"]), float(combo["b"]), float(combo["b_general"])),
            keyword_platt=tuple(combo["keyword_platt"]) if combo.get("keyword_platt") else None,
        )
        return fitted
    if isinstance(clf, IntentClassifier):
        from mlx_intent.tuner.calibrate import fit_scoring

        fit = fit_scoring(clf, rows, batch_size)
        clf.temperature, clf.threshold = fit["temperature"], fit["threshold"]
        return {"temperature": fit["temperature"], "threshold": fit["threshold"], "n": len(rows)}
    return None


class Recalibrator:
    """``serve --recalibrate-every N``: after every N new feedback records, refit the calibration of the
    serving tier (the first model tier of ``chain`` that loads) on the calibration part, without a restart.

    A background thread watches the store (other processes may write to it) and readies the rows; the fit
    itself runs when the chain next readies that tier, in its ``load`` step: in the thread that classifies,
    so a model never runs in two threads at once (MLX must not), outside any latency budget, and the swap
    lands between two batches.  The chain is built with its model tiers' loads wrapped by ``loading``
    (``build_chain(wrap_load=recalibrator.loading)``)."""

    def __init__(
        self,
        store: Store,
        every: int,
        *,
        minimum: int | None = None,
        poll_s: float | None = None,
        refit: Callable[[object, list[dict]], dict | None] = refit_classifier,
    ) -> None:
        """``minimum`` records in the calibration part (default data.MIN_CALIBRATION_RECORDS, read when built)
        before a refit; the store is looked at every ``poll_s`` seconds (default POLL_S)."""
        if store is None:
            raise ValueError("recalibration needs the answers recorded (a store)")
        self.store, self.every, self.refit = store, every, refit
        self.minimum = data.MIN_CALIBRATION_RECORDS if minimum is None else minimum
        self.poll_s = POLL_S if poll_s is None else poll_s
        self.seen = written(self.store)
        self.pending: list[dict] | None = None
        self.refits: list[dict] = []  # what each refit fitted, in order
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def loading(self, load: Callable[[], object]) -> Callable[[], object]:
        """A model tier's ``load`` that, once it has loaded, refits the classifier on the rows readied, if any."""

        def wrapped():
            clf = load()
            with self._lock:
                rows, self.pending = self.pending, None
            if rows is not None:
                try:
                    fitted = self.refit(clf, rows)
                except Exception as e:  # a failed refit keeps the calibration that was serving
                    log.warning("recalibration on %d feedback records failed: %s: %s", len(rows), type(e).__name__, e)
                    fitted = {}
                if fitted is None:  # nothing to refit in this tier: the next one that loads gets the rows
                    with self._lock:
                        self.pending = self.pending or rows
                elif fitted:
                    self.refits.append(fitted)
                    log.info("recalibrated on %d feedback records", len(rows))
            return clf

        return wrapped

    def check(self) -> bool:
        """One look at the store: with N new records since the last refit, ready the next one; whether it did."""
        count = written(self.store)
        if count - self.seen < self.every:
            return False
        self.seen = count
        rows = calibration_part(self.store)
        if len(rows) < self.minimum:
            log.info("recalibration waits: %d records in the calibration part, %d needed", len(rows), self.minimum)
            return False
        with self._lock:
            self.pending = rows
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except StoreError as e:
                log.warning("recalibration: cannot read the feedback store: %s", e)

    def start(self) -> Recalibrator:
        self._thread = threading.Thread(target=self._watch, name="recalibrator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
