"""Corrections and feedback (mlx_intent/feedback/): result ids, the SQLite store and its durability, the CLI and
the HTTP route with their errors, training and calibration from feedback, real-time recalibration in the
server, the active-learning queue, and the accuracy in stats and /metrics."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import WAIT_S, until

from mlx_intent.chain import Chain, Kind, Tier, build_chain
from mlx_intent.cli.main import main
from mlx_intent.errors import EXIT_CRITICAL, EXIT_INPUT, InputError
from mlx_intent.evaluation.data import DATA_DIR, read_labelled
from mlx_intent.feedback import data as fb_data
from mlx_intent.feedback import store as fb_store
from mlx_intent.results import FeedbackError
from mlx_intent.schema import INTENTS, MAX_INTENTS, validate
from mlx_intent.settings import Settings, settings_home
from mlx_intent.tuner import recalibrate

KEYWORD = Settings(chain=("keyword",))
TEXTS = ["best kebab in Kadikoy", "hello!", "will it rain tomorrow?", "ferry to Uskudar", "Havaist to IST"]


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def chain(home) -> Chain:
    return build_chain(KEYWORD, store=fb_store.open_store(home))


def cli(*args: str, home: Path, input: str | None = None):
    return CliRunner().invoke(main, [*args, "--home", str(home)], input=input)


def labelled(part: str | None = None) -> list[dict]:
    """Rows of the calibration split, of one feedback part (by the hash of their text) or all."""
    rows = read_labelled(DATA_DIR / "calib.jsonl")
    return [r for r in rows if part is None or fb_data.part_of(r["text"]) == part]


def judge(chain: Chain, rows: list[dict], wrong: bool = False) -> list[dict]:
    """Classify the rows through ``chain`` (recording them) and give feedback: their labels, or (``wrong``) a
    label the chain did not answer."""
    results = chain.classify_batch([r["text"] for r in rows])
    for r, res in zip(rows, results):
        label = next(i for i in INTENTS if i != res["primary_intent"]) if wrong else r["primary_intent"]
        fb_store.add_feedback(chain.store, res["id"], label)
    return results


# ---- ids and the store --------------------------------------------------------------------------


def test_every_result_has_its_own_id_a_cache_hit_too_and_the_store_keeps_them(chain):
    first, again = chain.classify(TEXTS[0]), chain.classify(TEXTS[0])
    assert again["cached"] and first["id"] != again["id"]
    assert all(len(r["id"]) == 32 and int(r["id"], 16) >= 0 for r in (first, again))
    rows = chain.store.read("SELECT id, text, primary_intent, result FROM results ORDER BY ts")
    assert {r["id"] for r in rows} == {first["id"], again["id"]}
    assert {r["text"] for r in rows} == {TEXTS[0]} and json.loads(rows[0]["result"])["tier"] == "keyword"


def test_a_derived_chain_records_into_the_same_store(chain):
    result = chain.derive(cache_size=0).classify(TEXTS[1])
    assert chain.store.read("SELECT id FROM results") == [{"id": result["id"]}]


def test_the_log_carries_the_id_to_join_on(home, tmp_path):
    from mlx_intent.metrics import read_log

    chain = build_chain(Settings(chain=("keyword",), log=tmp_path / "log.jsonl"))
    result = chain.classify(TEXTS[2])
    assert [r["id"] for r in read_log(tmp_path / "log.jsonl")] == [result["id"]]


def test_the_python_api_classify_attaches_an_id(monkeypatch):
    from mlx_intent import chain

    class Fake:
        def classify(self, text, mode="score"):
            return {"primary_intent": "general", "confidence": 0.5, "all_intents": ["general"]}

    monkeypatch.setitem(chain._DEFAULT, "fake", Fake())
    a, b = chain.classify("x", model="fake"), chain.classify("x", model="fake")
    assert a["id"] != b["id"] and len(a["id"]) == 32


def test_the_database_is_owner_only_in_wal_mode_with_a_schema_version(chain):
    chain.classify(TEXTS[0])
    folder = chain.store.path.parent
    for name in ("feedback.db", "feedback.db-wal", "feedback.db-shm"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert chain.store.read("PRAGMA journal_mode") == [{"journal_mode": "wal"}]
    assert chain.store.read("SELECT version FROM schema_version") == [{"version": fb_store.SCHEMA_VERSION}]
    columns = {r["name"] for r in chain.store.read("PRAGMA table_info(results)")}
    assert {"user", "context", "context_used", "margin"} <= columns


def test_reopening_keeps_the_records_and_a_newer_schema_is_refused(chain, home):
    result = chain.classify(TEXTS[0])
    again = fb_store.open_store(home)
    assert again.read("SELECT id FROM results") == [{"id": result["id"]}]
    with again.write() as db:
        db.execute("UPDATE schema_version SET version = ?", (fb_store.SCHEMA_VERSION + 1,))
    with pytest.raises(fb_store.StoreError, match="newer"):
        fb_store.open_store(home)


def test_commands_that_read_never_create_a_store(home):
    assert fb_store.open_store(home, create=False) is None and not home.exists()
    result = cli("feedback", "list", home=home)
    assert result.exit_code == EXIT_INPUT and "no feedback store" in result.output and not home.exists()


def test_a_corrupt_store_is_named_in_words(home):
    home.mkdir(parents=True)
    (home / fb_store.DB_NAME).write_bytes(b"not a database, " * 256)
    result = cli("feedback", "list", home=home)
    assert result.exit_code == 1 and "feedback.db" in result.output and "not a database" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# ---- adding feedback ----------------------------------------------------------------------------


def test_confirm_correct_replace_and_accuracy(chain):
    a, b = chain.classify_batch(TEXTS[:2])
    confirmed = fb_store.add_feedback(chain.store, a["id"], correct=True)
    assert confirmed["verdict"] == "confirmed" and confirmed["primary_intent"] == a["primary_intent"]
    other = next(i for i in INTENTS if i != b["primary_intent"])
    corrected = fb_store.add_feedback(chain.store, b["id"], other)
    assert corrected["verdict"] == "corrected" and corrected["answer"] == b["primary_intent"]
    assert fb_data.accuracy(chain.store) == {"count": 2, "confirmed": 1, "corrected": 1, "rate": 0.5}
    with pytest.raises(fb_store.DuplicateFeedback, match="--replace") as dup:
        fb_store.add_feedback(chain.store, b["id"], correct=True)
    assert dup.value.status == 409
    assert fb_store.add_feedback(chain.store, b["id"], correct=True, replace=True)["replaced"]
    assert fb_data.accuracy(chain.store)["rate"] == 1.0 and fb_store.written(chain.store) == 3  # the replacement counts


def test_unknown_ids_and_bad_intents_are_refused_naming_the_intents(chain):
    result = chain.classify(TEXTS[0])
    with pytest.raises(fb_store.UnknownResult) as unknown:
        fb_store.add_feedback(chain.store, "0" * 32, "weather")
    assert unknown.value.status == 404 and unknown.value.exit_code == EXIT_INPUT
    with pytest.raises(FeedbackError, match="the intents are: greeting, restaurant") as bad:
        fb_store.add_feedback(chain.store, result["id"], "wether")
    assert bad.value.status == 422
    with pytest.raises(FeedbackError, match="start with primary_intent"):
        fb_store.add_feedback(chain.store, result["id"], "weather", ["events", "weather"])
    other = next(i for i in INTENTS if i != result["primary_intent"])
    with pytest.raises(FeedbackError, match="confirmation"):
        fb_store.add_feedback(chain.store, result["id"], other, correct=True)
    assert fb_data.accuracy(chain.store)["count"] == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    primary=st.one_of(st.sampled_from(INTENTS), st.text(max_size=12)),
    others=st.one_of(st.none(), st.lists(st.one_of(st.sampled_from(INTENTS), st.text(max_size=8)), max_size=5)),
)
def test_labels_are_taken_exactly_when_the_schema_allows_them(primary, others):
    try:
        got = fb_store.check_labels(primary, others)
    except FeedbackError:
        names = [primary, *(others or [])]
        legal = others is None or (1 <= len(others) <= MAX_INTENTS and len(set(others)) == len(others))
        legal = legal and all(n in INTENTS for n in names) and (others is None or others[0] == primary)
        assert not legal
        return
    validate({"primary_intent": got[0], "confidence": 1.0, "all_intents": got[1]})
    assert got == (primary, others or [primary])


# ---- durability ---------------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from mlx_intent.feedback import store as fb_store
from mlx_intent.results import new_id
store = fb_store.open_store(Path(sys.argv[1]))
for i in range(100_000):
    rid = new_id()
    fb_store.record_results(store, [{"id": rid, "ts": str(i), "text": f"query {i}", "primary_intent": "general",
                               "confidence": 0.5, "all_intents": ["general"], "tier": "keyword"}])
    fb_store.add_feedback(store, rid, "weather" if i % 2 else "general")
    print(rid, flush=True)  # after the commit
"""


def test_a_kill_9_during_writes_loses_nothing_committed(home):
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(home)], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    committed = []
    try:
        while len(committed) < 40:
            line = proc.stdout.readline()
            assert line, f"the writer ended early (exit {proc.poll()})"
            committed.append(line.strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = proc.communicate(timeout=WAIT_S)[0]
    committed += rest.split()
    db = sqlite3.connect(home / fb_store.DB_NAME)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {r[0] for r in db.execute("SELECT id FROM feedback")}
    assert set(committed) <= stored and len(stored) - len(committed) <= 1  # at most one committed, not yet printed
    results = {r[0] for r in db.execute("SELECT id FROM results")}
    assert stored <= results


# ---- the command line ---------------------------------------------------------------------------


def test_classify_record_then_feedback_from_the_command_line(home):
    out = cli("classify", "best kebab in Kadikoy", "--chain", "keyword", "--record", home=home)
    assert out.exit_code == 0, out.output
    answer = json.loads(out.stdout)
    assert list(answer)[0] == "id" and answer["primary_intent"] == "restaurant"
    rid = answer["id"]

    ok = cli("feedback", "add", rid, "restaurant", "nearby_locations", home=home)
    assert ok.exit_code == 0 and ok.output.startswith(f"confirmed {rid}: restaurant, nearby_locations"), ok.output
    again = cli("feedback", "add", rid, "shopping", home=home)
    assert again.exit_code == EXIT_INPUT and "already given" in again.output and "--replace" in again.output
    replaced = cli("feedback", "add", rid, "shopping", "--replace", home=home)
    assert replaced.exit_code == 0 and "corrected" in replaced.output and "(replaced)" in replaced.output
    unknown = cli("feedback", "add", "f" * 32, "shopping", home=home)
    assert unknown.exit_code == EXIT_INPUT and "unknown result id" in unknown.output
    bad = cli("feedback", "add", rid, "food", home=home)
    assert bad.exit_code == EXIT_INPUT and "the intents are:" in bad.output and "Traceback" not in bad.output
    both = cli("feedback", "add", rid, "shopping", "--correct", home=home)
    assert both.exit_code == 2 and "--correct" in both.output

    listed = cli("feedback", "list", home=home)
    assert listed.exit_code == 0 and rid in listed.output and "corrected" in listed.output
    exported = cli("feedback", "export", home=home)
    (row,) = [json.loads(line) for line in exported.stdout.splitlines()]
    assert row["primary_intent"] == "shopping" and row["answer"]["primary_intent"] == "restaurant"
    assert row["text"] == "best kebab in Kadikoy" and row["part"] in ("train", "calib")


def test_export_writes_an_owner_only_file_that_reads_as_labelled_data(chain, home, tmp_path):
    judge(chain, labelled()[:5])
    out = tmp_path / "feedback.jsonl"
    result = cli("feedback", "export", "-o", str(out), home=home)
    assert result.exit_code == 0 and stat.S_IMODE(out.stat().st_mode) == 0o600
    rows = read_labelled(out)
    assert [r["text"] for r in rows] == [r["text"] for r in labelled()[:5]]


def test_classify_input_record_writes_the_result_ids(home, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "out.jsonl"
    result = cli("classify", "--input", str(src), "--output", str(out), "--chain", "keyword", "--record", home=home)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    store = fb_store.open_store(home)
    assert {r["id"] for r in store.read("SELECT id FROM results")} == {line["result_id"] for line in lines}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    args=st.lists(st.one_of(st.sampled_from([*INTENTS, "--correct", "--replace"]), st.text(max_size=10)), max_size=5)
)
def test_any_feedback_arguments_get_an_answer_or_a_usage_error(chain, home, args):
    rid = chain.classify(TEXTS[3])["id"]
    result = cli("feedback", "add", rid, *args, home=home)
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# ---- training and calibration from feedback -----------------------------------------------------


def test_feedback_outweighs_written_rows_of_the_same_text():
    written = [{"text": "Kadikoy?", "primary_intent": "general"}, {"text": "hello", "primary_intent": "greeting"}]
    judged = [{"text": "kadıköy?", "primary_intent": "neighborhood", "all_intents": ["neighborhood"]}]
    rows = fb_data.fold_feedback(written, judged, weight=3)
    assert [r["primary_intent"] for r in rows] == ["greeting"] + ["neighborhood"] * 3


def test_a_correction_replaces_the_same_text_only_after_the_same_earlier_turns():
    written = [
        {"text": "and on Sunday?", "context": ["Where can I shop?"], "primary_intent": "shopping"},
        {"text": "and on Sunday?", "context": ["Is the ferry running?"], "primary_intent": "transportation"},
        {"text": "and on Sunday?", "primary_intent": "general"},
    ]
    judged = [{"text": "And on Sunday?", "context": ["where can I shop?"], "primary_intent": "events"}]
    rows = fb_data.fold_feedback(written, judged, weight=1)
    assert [r["primary_intent"] for r in rows] == ["transportation", "general", "events"]


def test_training_and_calibration_parts_never_share_a_record(chain, home):
    rows = labelled()[:80]
    judge(chain, rows)
    train, calib = fb_data.training_rows(home), fb_data.calibration_rows(home, minimum=1)
    assert len(train) + len(calib) == 80 and train and calib
    assert not {r["text"] for r in train} & {r["text"] for r in calib}
    assert all(fb_data.part_of(r["text"]) == "calib" for r in calib)
    with pytest.raises(InputError, match="at least 1000 needed"):
        fb_data.calibration_rows(home, minimum=1000)


def test_turns_with_earlier_turns_train_as_conversations_but_never_calibrate(chain, home):
    calib, train = labelled("calib")[:6], labelled("train")[:2]
    rows = calib + train
    contexts = [["Will it rain today?"]] * 3 + [None] * 3 + [["Will it rain today?"]] * 2
    for r, res in zip(rows, chain.classify_batch([r["text"] for r in rows], contexts=contexts)):
        fb_store.add_feedback(chain.store, res["id"], r["primary_intent"])
    # a follow-up's label is the intent it continues, which the turn read alone (as calibration reads it) lacks
    assert sorted(r["text"] for r in fb_data.calibration_rows(home, minimum=1)) == sorted(r["text"] for r in calib[3:])
    assert [r["context"] for r in fb_data.training_rows(home)] == [["Will it rain today?"]] * 2


@pytest.fixture
def trainers(monkeypatch):
    import mlx_intent.tuner.encoder as tuner_encoder
    import mlx_intent.tuner.train as tuner_train

    calls = {}

    def fake_adapter(name, *args, **kwargs):
        calls["llm"] = kwargs["feedback"]
        return {"examples": 1, "iters": 1, "train_seconds": 0.0}

    def fake_encoder(train_rows, calib_rows, **kwargs):
        calls["e5"] = (train_rows, calib_rows, kwargs["sources"])
        return {"out_dir": "x", "rows": len(train_rows), "epochs": 1, "train_seconds": 0.0}

    monkeypatch.setattr(tuner_train, "train_adapter", fake_adapter)
    monkeypatch.setattr(tuner_encoder, "train_encoder", fake_encoder)
    return calls


def test_train_with_feedback_hands_the_training_part_to_both_trainers(chain, home, tmp_path, trainers, monkeypatch):
    import mlx_intent.encoder as encoder

    monkeypatch.setattr(encoder, "HEAD_DIR", tmp_path / "no-head")
    none = cli("train", "smollm2-135m", "--with-feedback", home=home)
    assert none.exit_code == EXIT_INPUT and "no feedback records to train on" in none.output
    judge(chain, labelled("train")[:6])
    llm = cli("train", "smollm2-135m", "--with-feedback", home=home)
    assert llm.exit_code == 0, llm.output
    assert [r["text"] for r in trainers["llm"]] == [r["text"] for r in labelled("train")[:6]]
    e5 = cli("train", "e5-small", "--with-feedback", "--data", "dev", "--calib", "calib", home=home)
    assert e5.exit_code == 0, e5.output
    train_rows, calib_rows, sources = trainers["e5"]
    assert sources["feedback"] == 6 and len(train_rows) == len(read_labelled(DATA_DIR / "dev.jsonl")) + 3 * 6
    assert sum(r.get("_source") == "feedback" for r in train_rows) == 3 * 6
    assert not any(r.get("_source") == "feedback" for r in calib_rows)  # never calibrated on what it trains on


def test_a_short_llm_training_run_takes_the_feedback(bundled, models_home, tmp_path):
    from mlx_intent.tuner.train import answers_for, train_adapter

    data = tmp_path / "tiny.jsonl"
    written = labelled()[:4]
    data.write_text("".join(json.dumps(r) + "\n" for r in written))
    judged = [{**written[0], "primary_intent": "general", "all_intents": ["general"]}, labelled()[10]]
    summary = train_adapter(
        "smollm2-135m", data, iters=1, batch_size=2, num_layers=1, rank=2, out_dir=tmp_path / "a", feedback=judged
    , home=settings_home())
    expected = sum(len(answers_for(r)) for r in written[1:]) + 3 * sum(len(answers_for(r)) for r in judged)
    assert summary["examples"] == expected and summary["feedback"] == 2


def test_calibrate_from_feedback_fits_on_the_calibration_part_or_refuses(chain, home, tmp_path, monkeypatch):
    from mlx_intent import calibration, keyword

    judge(chain, labelled("calib")[:10])
    few = cli("calibrate", "keyword", "--from-feedback", home=home)
    assert few.exit_code == EXIT_INPUT and "10 records in the calibration part" in few.output
    judge(chain, labelled("calib")[10:40] + labelled("train")[:20])
    done = cli("calibrate", "keyword", "--from-feedback", home=home)
    assert done.exit_code == 0, done.output
    record = json.loads(calibration.home_file(keyword.FIT_NAME, home).read_text())  # under the home, not the package
    assert record["n"] == 40 and record["fitted_on"].endswith(fb_store.DB_NAME)
    both = cli("calibrate", "keyword", "--from-feedback", "--data", "calib", home=home)
    assert both.exit_code == 2 and "give no --data" in both.output


# ---- real-time calibration ----------------------------------------------------------------------


class Probe:
    """A stand-in model: answers with its ``confidence``, which a refit sets."""

    confidence = 0.9

    def classify_batch(self, texts):
        return [{"primary_intent": "general", "confidence": self.confidence, "all_intents": ["general"]} for _ in texts]


def probe_chain(home, every: int, refit) -> tuple[Chain, Probe, recalibrate.Recalibrator]:
    """A chain of one stand-in model tier whose load the recalibrator wraps, as build_chain(wrap_load=) does."""
    probe, store = Probe(), fb_store.open_store(home)
    recalibrator = recalibrate.Recalibrator(store, every, minimum=1, refit=refit)
    load = recalibrator.loading(lambda: probe)
    tier = Tier("probe", lambda texts: probe.classify_batch(texts), load=load, model="probe", kind=Kind.LLM)
    return Chain([tier], cache_size=0, store=store), probe, recalibrator


def test_the_recalibrator_refits_after_every_n_records_in_the_classifying_thread(home):
    calls = []

    def refit(clf, rows):
        calls.append((threading.get_ident(), len(rows)))
        clf.confidence = 0.4
        return {"n": len(rows)}

    chain, probe, recalibrator = probe_chain(home, 4, refit)
    texts = [r["text"] for r in labelled("calib")[:8]]
    results = chain.classify_batch(texts)
    for res in results[:3]:
        fb_store.add_feedback(chain.store, res["id"], "weather")
    assert not recalibrator.check() and chain.classify("x")["confidence"] == 0.9  # 3 < 4 new records
    fb_store.add_feedback(chain.store, results[3]["id"], "weather")
    assert recalibrator.check() and calls == []  # readied, not run: the fit waits for the classifying thread
    worker = threading.Thread(target=lambda: chain.classify("y"))
    worker.start()
    worker.join()
    assert calls == [(worker.ident, 4)] and chain.classify("z")["confidence"] == 0.4
    for res in results[4:8]:
        fb_store.add_feedback(chain.store, res["id"], "events")
    assert recalibrator.check()
    chain.classify("w")
    assert [n for _, n in calls] == [4, 8] and [r["n"] for r in recalibrator.refits] == [4, 8]


def test_a_failed_refit_keeps_the_serving_calibration(home):
    def broken(clf, rows):
        raise RuntimeError("no")

    chain, probe, recalibrator = probe_chain(home, 1, broken)
    fb_store.add_feedback(chain.store, chain.classify(labelled("calib")[0]["text"])["id"], "weather")
    assert recalibrator.check()
    assert chain.classify("x")["confidence"] == 0.9 and recalibrator.refits == []


def test_the_e5_tier_refit_swaps_in_a_calibration_that_believes_the_feedback():
    from mlx_intent.encoder import EncoderClassifier

    clf = EncoderClassifier(combine=True)
    texts = [r["text"] for r in labelled("calib")[:40]]
    before, config = clf.classify_batch(texts), clf.config
    rng = random.Random(0)
    noisy = [{"text": t, "primary_intent": p, "all_intents": [p]} for t in texts for p in [rng.choice(INTENTS)]]
    fitted = recalibrate.refit_classifier(clf, noisy)
    assert clf.config is not config and clf.config.calibrated_on == "feedback"
    assert clf.config.temperature == fitted["calibration"]["temperature"]
    after = clf.classify_batch(texts)
    mean = lambda results: sum(r["confidence"] for r in results) / len(results)  # noqa: E731
    assert mean(after) < mean(before) - 0.1  # told it is mostly wrong, it is less sure


def served_by(run):
    """A stand-in for uvicorn.Server that hands the app to ``run`` instead of listening on a port."""

    class Server:
        def __init__(self, config) -> None:
            self.app = config.app

        def run(self, sockets=None) -> None:
            run(self.app)

    return Server


def test_serve_recalibrate_every_n_swaps_the_e5_calibration_without_a_restart(home, monkeypatch):
    """`serve --recalibrate-every 8` end to end: answers recorded, feedback over HTTP, the e5-small tier refitted
    by the background watcher and the worker, and the next answers less confident."""
    import uvicorn
    from fastapi.testclient import TestClient

    monkeypatch.setattr(recalibrate, "POLL_S", 0.05)
    monkeypatch.setattr(fb_data, "MIN_CALIBRATION_RECORDS", 8)
    rows = labelled("calib")[:8]
    seen = {}

    def run(app):
        with TestClient(app, base_url="http://127.0.0.1") as client:
            until(lambda: client.get("/healthz").json()["status"] != "warming", "warm-up done")
            answers = [client.post("/v1/classify", json={"text": r["text"]}).json() for r in rows]
            for a in answers:
                wrong = next(i for i in INTENTS if i != a["primary_intent"])
                assert client.post("/v1/feedback", json={"id": a["id"], "primary_intent": wrong}).status_code == 201
            probe = rows[0]["text"]

            def changed() -> bool:
                seen["after"] = client.post("/v1/classify", json={"text": probe}).json()["confidence"]
                return seen["after"] != answers[0]["confidence"]

            until(changed, "a refitted answer")
            seen["before"] = answers[0]["confidence"]

    monkeypatch.setattr(uvicorn, "Server", served_by(run))
    args = ["serve", "--port", "0", "--chain", "e5-small,keyword", "--cache-size", "0", "--latency-budget-ms", "600000"]
    args += ["--recalibrate-every", "8"]
    result = cli(*args, home=home)
    assert result.exit_code == 0, result.output
    assert seen["after"] < seen["before"]


def test_recalibration_needs_recorded_answers(home, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "Server", served_by(lambda app: pytest.fail("should not serve")))
    result = cli("serve", "--port", "0", "--chain", "keyword", "--no-record", "--recalibrate-every", "5", home=home)
    assert result.exit_code == 2 and "--no-record" in result.output


# ---- the active-learning queue ------------------------------------------------------------------


def record(rid: str, confidence: float, top=None, fallbacks=(), context_used=False) -> dict:
    answer = {"id": rid, "ts": rid, "text": f"text {rid}", "primary_intent": "general", "confidence": confidence}
    return {
        **answer,
        "all_intents": ["general"],
        "tier": "t",
        "top": top,
        "fallbacks": list(fallbacks),
        "context_used": context_used,
    }


def test_the_queue_ranks_small_margins_disagreement_and_context_first(home):
    store = fb_store.open_store(home)
    unsure = {"tier": "smollm2-135m", "kind": "low_confidence", "reason": "low confidence: 0.40 < 0.50"}
    absent = {"tier": "llama-3.2-3b", "kind": "not_installed", "reason": "not downloaded"}
    fb_store.record_results(
        store,
        [
            record("a", 0.9, top=[["general", 0.9], ["events", 0.05]]),  # margin 0.85
            record("b", 0.5, top=[["general", 0.5], ["events", 0.4]]),  # margin 0.10
            record("c", 0.9, top=[["general", 0.9], ["events", 0.05]], fallbacks=[unsure]),  # 0.85 - 0.5
            record("d", 0.9, top=[["general", 0.9], ["events", 0.05]], context_used=True),  # 0.85 - 0.25
            record("e", 0.6, fallbacks=[absent]),  # no top: at least 2 * 0.6 - 1 = 0.2; an absent tier is no dispute
            record("f", 0.5, top=[["general", 0.5], ["events", 0.49]]),  # margin 0.01, but judged already
        ],
    )
    fb_store.add_feedback(store, "f", correct=True)
    ranked = fb_data.queue(store)
    assert [r["id"] for r in ranked] == ["b", "e", "c", "d", "a"]
    assert ranked[2]["disagreement"] == 1 and ranked[3]["context_used"] and ranked[1]["margin"] == pytest.approx(0.2)
    assert [r["id"] for r in fb_data.queue(store, limit=2)] == ["b", "e"]
    shown = cli("feedback", "queue", "--limit", "3", home=home)
    assert shown.exit_code == 0 and shown.output.index("text b") < shown.output.index("text e")
    assert "disagree" in shown.output and "text d" not in shown.output


# ---- monitoring ---------------------------------------------------------------------------------


def test_stats_reports_feedback_accuracy_and_its_critical_alert(chain, home):
    from mlx_intent.cli.stats import stats_command
    from mlx_intent.stats import FEEDBACK_MIN_RECORDS

    rows = labelled()[: FEEDBACK_MIN_RECORDS - 1]
    judge(chain, rows, wrong=True)
    few = CliRunner().invoke(stats_command, ["--check", "--home", str(home)])
    assert few.exit_code == 0 and f"{FEEDBACK_MIN_RECORDS - 1} feedback records" in few.output
    judge(chain, labelled()[FEEDBACK_MIN_RECORDS : FEEDBACK_MIN_RECORDS + 1], wrong=True)
    critical = CliRunner().invoke(stats_command, ["--check", "--home", str(home)])
    assert critical.exit_code == EXIT_CRITICAL and "CRITICAL feedback accuracy 0.0% < 80%" in critical.output
    report = CliRunner().invoke(stats_command, ["--home", str(home)])
    assert report.exit_code == 0 and f"0.0% (0 confirmed, {FEEDBACK_MIN_RECORDS} corrected)" in report.output


# ---- the HTTP route -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A keyword-tier server that records, and one that does not."""
    from fastapi.testclient import TestClient

    from mlx_intent.serve.app import create_app

    chain = build_chain(KEYWORD, store=fb_store.open_store(tmp_path_factory.mktemp("served")))
    with (
        TestClient(create_app(KEYWORD, chain), base_url="http://127.0.0.1") as client,
        TestClient(create_app(KEYWORD, build_chain(KEYWORD)), base_url="http://127.0.0.1") as bare,
    ):
        yield client, bare


def test_feedback_over_http(server):
    client, bare = server
    answer = client.post("/v1/classify", json={"text": "any good fish near Galata?"}).json()
    rid = answer["id"]
    assert client.post("/v1/classify/batch", json={"texts": ["a", "b"]}).json()["results"][0]["id"] != rid
    first = client.post("/v1/feedback", json={"id": rid, "correct": True})
    assert first.status_code == 201 and first.json()["verdict"] == "confirmed"
    dup = client.post("/v1/feedback", json={"id": rid, "primary_intent": "shopping"})
    assert dup.status_code == 409 and "replace" in dup.json()["error"]
    replaced = client.post("/v1/feedback", json={"id": rid, "primary_intent": "shopping", "replace": True})
    assert replaced.status_code == 201 and replaced.json()["replaced"] is True
    unknown = client.post("/v1/feedback", json={"id": "nope", "correct": True})
    assert unknown.status_code == 404 and "unknown result id" in unknown.json()["error"]
    bad = client.post("/v1/feedback", json={"id": rid, "primary_intent": "food", "replace": True})
    assert bad.status_code == 422 and "'restaurant'" in bad.json()["error"]
    twice = client.post("/v1/feedback", json={"id": rid, "primary_intent": "events", "all_intents": ["events"] * 2})
    assert twice.status_code == 422
    off = bare.post("/v1/feedback", json={"id": rid, "correct": True})
    assert off.status_code == 404 and "--no-record" in off.json()["error"]
    text = client.get("/metrics").text
    assert "mlx_intent_feedback_accuracy " in text and 'mlx_intent_feedback_records{verdict="corrected"}' in text
    assert "mlx_intent_feedback_accuracy_critical 0.0" in text
    assert 'mlx_intent_http_requests_total{endpoint="/v1/feedback",status="409"}' in text


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.sampled_from(INTENTS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
REAL = "<a recorded id>"
BODY = st.fixed_dictionaries(
    {},
    optional={
        "id": st.just(REAL) | st.text(max_size=40) | JSON,
        "primary_intent": st.sampled_from(INTENTS) | JSON,
        "all_intents": st.lists(st.sampled_from(INTENTS), max_size=4) | JSON,
        "correct": st.booleans() | JSON,
        "replace": st.booleans() | JSON,
    },
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODY | JSON)
def test_any_feedback_body_gets_an_answer_or_a_4xx(server, body):
    client, _ = server
    if isinstance(body, dict) and body.get("id") == REAL:
        body["id"] = client.post("/v1/classify", json={"text": "ferry to Kadikoy?"}).json()["id"]
    headers = {"Content-Type": "application/json"}  # a JSON null too, which json=None would not send
    response = client.post("/v1/feedback", content=json.dumps(body), headers=headers)
    assert response.status_code in (201, 404, 409, 422), response.text
    assert set(response.json()) >= ({"id", "verdict"} if response.status_code == 201 else {"error", "detail"})
