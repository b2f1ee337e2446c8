"""Public-corpus importers: maps, parsers, splits, de-duplication, general cap, download, CLI.

Everything runs on tests/fixtures/corpora: a few invented sentences in each corpus's
real file layout (no third-party sentence is committed).  The server of the download
tests listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_intent.cli.data import data_command
from mlx_intent.corpora import (
    CORPORA,
    DROP,
    ChecksumError,
    CorpusFormatError,
    assign_part,
    build,
    cap_general,
    fetch_corpus,
    load_exclusions,
    load_map,
    manifests,
    text_key,
)
from mlx_intent.corpora.download import git_blob_sha1
from mlx_intent.corpora.readers import READERS, read_hwu64, read_xsid, strip_annotation
from mlx_intent.corpora.sources import ARCHIVES, RemoteFile
from mlx_intent.schema import INTENTS

FIX = Path(__file__).parent / "fixtures" / "corpora"
SOURCES = {n: FIX / n for n in CORPORA if n != "massive"}  # MASSIVE's build: tests/test_massive.py
OWN = FIX / "own"


def _all_records(name: str, root: Path = FIX):
    c = CORPORA[name]
    return list(READERS[name](root / name, c.training_splits + c.reserved_splits if name != "hwu64" else ("all",)))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    return out, build(SOURCES, out, OWN)


# --- maps ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CORPORA))
def test_every_source_intent_has_a_valid_line(name):
    table = load_map(name)
    for rec in _all_records(name):
        assert rec.source_intent in table, f"maps/{name}.tsv lacks {rec.source_intent}"
    for source, m in table.items():
        assert m.intent in INTENTS or m.intent == DROP, (source, m.intent)
        assert len(m.reason) > 10, source


def test_map_inventories():
    """CLINC's 150 intents plus oos; SLURP shares HWU64's scenario_intent labels and their decisions."""
    assert len(load_map("clinc150")) == 151
    assert load_map("hwu64") == load_map("slurp")
    assert {
        "weather": "weather",
        "greeting": "greeting",
        "goodbye": "greeting",
        "thank_you": "greeting",
        "restaurant_reservation": "restaurant",
        "traffic": "transportation",
        "alarm": "general",
        "exchange_rate": "general",
        "international_visa": "general",
        "translate": "general",
        "oos": "general",
    }.items() <= {k: v.intent for k, v in load_map("clinc150").items()}.items()


@pytest.mark.parametrize("name", ["clinc150", "hwu64", "slurp"])
def test_exclusions_name_training_rows(name):
    for rid in load_exclusions(name):
        assert rid.startswith(f"{name}-") and rid.split("-")[1] in CORPORA[name].training_splits


@pytest.mark.skipif(not os.environ.get("MLX_INTENT_CORPORA"), reason="set MLX_INTENT_CORPORA to real checkouts")
@pytest.mark.parametrize("name", list(CORPORA))
def test_real_corpora_fully_mapped(name):
    root = Path(os.environ["MLX_INTENT_CORPORA"])
    assert {r.source_intent for r in _all_records(name, root)} <= set(load_map(name))


# --- parsers and normaliser ------------------------------------------------------------

_words = st.lists(st.text(st.characters(categories=("L", "N")), min_size=1, max_size=8), min_size=1, max_size=6)


@given(_words, st.sampled_from(["!", "?", ".", ",", " ", "  ", "¿", "…"]))
def test_text_key_folds_case_and_punctuation(words, punct):
    text = " ".join(words)
    assert text_key(text) == text_key(text_key(text))
    assert text_key(punct + text.upper() + punct) == text_key(text.lower())


@given(_words, _words)
def test_strip_annotation(before, value):
    plain = " ".join(before + value)
    assert strip_annotation(f"{' '.join(before)} [slot_name : {' '.join(value)}]") == plain
    assert strip_annotation(plain) == plain if "[" not in plain else True


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.text(st.characters(categories=("L", "N", "Zs")), min_size=1, max_size=30).map(str.strip).filter(bool),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from([": ", " = "]),
)
def test_xsid_parser_roundtrip(tmp_path_factory, texts, sep):
    root = tmp_path_factory.mktemp("xsid")
    (root / "data" / "xSID").mkdir(parents=True)
    blocks = [
        f"# id{sep}{i}\n# text-en{sep}x\n# text{sep}{t}\n# intent{sep}weather/find\n1\tw\tweather/find\tO\n"
        for i, t in enumerate(texts)
    ]
    (root / "data" / "xSID" / "tr.test.conll").write_text("\n".join(blocks), "utf-8")
    recs = list(read_xsid(root))
    assert [r.text for r in recs] == texts and {r.lang for r in recs} == {"tr"}


def test_hwu64_full_csv_layout(tmp_path):
    """The full annotated CSV wins over the folds; IRR rows are dropped; the key is the answerid."""
    p = tmp_path / "AnnotatedData" / "NLU-Data-Home-Domain-Annotated-All.csv"
    p.parent.mkdir(parents=True)
    p.write_text(
        "userid;answerid;scenario;intent;status;answer_annotation;notes;suggested_entities;"
        "answer_normalised;answer;question\n"
        "1;7;weather;query;;will it hail in [place_name : the hills];;;will it hail in the hills;x;q\n"
        "1;8;alarm;set;IRR_XX;nonsense;;;nonsense;x;q\n",
        "utf-8",
    )
    recs = list(read_hwu64(tmp_path))
    assert [(r.id, r.source_intent, r.text) for r in recs] == [
        ("hwu64-all-7", "weather_query", "will it hail in the hills")
    ]


def test_snips_joins_chunks():
    recs = _all_records("snips")
    assert "Will it be foggy in the valley tomorrow?" in {r.text for r in recs}


def test_corrupt_file_names_it(tmp_path):
    bad = tmp_path / "data" / "data_full.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json", "utf-8")
    with pytest.raises(CorpusFormatError, match="data_full.json"):
        list(READERS["clinc150"](tmp_path, ("train",)))


# --- splits, de-duplication, cap -------------------------------------------------------


@given(st.text(min_size=1, max_size=40))
def test_part_depends_on_normalized_text_only(text):
    for corpus, split in (("hwu64", "all"), ("slurp", "devel"), ("clinc150", "train")):
        assert assign_part(corpus, split, text_key(text)) == assign_part(corpus, split, text_key(f" {text.upper()}!"))
    assert assign_part("clinc150", "val", text_key(text)) == "heldout"
    assert assign_part("clinc150", "train", text_key(text)) in ("train", "calib")


def test_split_fractions_roughly_hold():
    parts = Counter(assign_part("slurp", "devel", f"sentence number {i}") for i in range(5000))
    assert abs(parts["train"] / 5000 - 0.6) < 0.03 and abs(parts["heldout"] / 5000 - 0.2) < 0.03


def test_build_removals(built):
    out, summary = built
    removed = summary["removed"]
    assert removed["in_slurp_test"] == {"hwu64": 1}  # "is it windy in the harbour"
    assert removed["in_reserved"] == {"clinc150": 1, "slurp": 1}  # CLINC test forecast; xSID's German weather
    assert removed["in_own_data"] == {"slurp": 1}  # "turn the lights down low"
    assert removed["duplicate"]["hwu64"] == 1 and removed["duplicate"]["slurp"] == 2
    assert removed["label_conflict"] == {"clinc150": 1, "hwu64": 1}  # goodbye vs general_quirky
    assert removed["unmapped_label"]["hwu64"] == 1 and removed["unmapped_label"]["clinc150"] == 1
    train_side = [r for f in out.glob("public-*.jsonl") for r in _read(f)]
    reserved = {text_key(r["text"]) for f in out.glob("reserved-*.jsonl") for r in _read(f)}
    keys = [text_key(r["text"]) for r in train_side]
    assert len(keys) == len(set(keys)) and not set(keys) & reserved
    assert "is it windy in the harbour" not in keys


def test_build_rows_and_files(built):
    out, summary = built
    names = {p.name for p in out.iterdir()}
    assert {
        "public-train.jsonl",
        "public-calib.jsonl",
        "public-heldout-clinc150.jsonl",
        "public-heldout-hwu64.jsonl",
        "public-heldout-slurp.jsonl",
        "reserved-clinc150.jsonl",
        "reserved-slurp.jsonl",
        "reserved-xsid.jsonl",
        "reserved-snips.jsonl",
        "summary.json",
    } == names
    for f in out.glob("*.jsonl"):
        for r in _read(f):
            assert r["primary_intent"] in INTENTS and r["all_intents"] == [r["primary_intent"]]
            assert r["source"].split("/")[0] == r["id"].split("-")[0]
    heldout = {r["text"] for r in _read(out / "public-heldout-clinc150.jsonl")}
    assert {"thanks so much for the help", "teach me to juggle flaming torches"} <= heldout  # val/oos_val
    de = [r for r in _read(out / "reserved-xsid.jsonl") if r["lang"] == "de"]
    assert de and de[0]["text"] == "Ist es draußen kalt?" and de[0]["primary_intent"] == "weather"
    assert json.loads((out / "summary.json").read_text())["outputs"]["public-train.jsonl"]["rows"] == len(
        _read(out / "public-train.jsonl")
    )


def test_build_is_deterministic(built, tmp_path):
    out, _ = built
    build(SOURCES, tmp_path, OWN)
    for f in out.glob("*.jsonl"):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes()


def test_hwu64_requires_slurp(tmp_path):
    with pytest.raises(ValueError, match="SLURP test"):
        build({"hwu64": FIX / "hwu64"}, tmp_path, OWN)


@given(st.integers(0, 60), st.integers(0, 60), st.sampled_from([0.0, 0.1, 0.3, 0.5]))
def test_general_cap(n_general, n_other, cap):
    """The share holds in each language (rows alternate between two), so none is left without negatives."""
    rows = [{"id": f"g{i}", "lang": "en tr".split()[i % 2], "primary_intent": "general"} for i in range(n_general)]
    rows += [{"id": f"o{i}", "lang": "en tr".split()[i % 2], "primary_intent": "weather"} for i in range(n_other)]
    kept, dropped = cap_general(rows, cap, seed=1)
    g = sum(r["primary_intent"] == "general" for r in kept)
    assert g + dropped == n_general and len(kept) - g == n_other
    for lang in ("en", "tr"):
        mine = [r for r in kept if r["lang"] == lang]
        assert sum(r["primary_intent"] == "general" for r in mine) <= cap * len(mine) + 1e-9
    assert kept == cap_general(rows, cap, seed=1)[0]


def test_general_cap_in_build(tmp_path):
    summary = build(SOURCES, tmp_path, OWN, general_cap=0.1)
    for part in ("public-train.jsonl", "public-calib.jsonl"):
        rows = _read(tmp_path / part)
        assert sum(r["primary_intent"] == "general" for r in rows) <= 0.1 * len(rows)
    assert summary["removed"]["general_cap"]


# --- download --------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.endswith("truncated.json"):  # promise more bytes than are sent, then hang up
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"{" * 1000)
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        super().do_GET()


@pytest.fixture()
def server(tmp_path):
    m = manifests()["clinc150"]
    root = tmp_path / "www"
    dest = root / m.repo / m.commit / "data"
    dest.mkdir(parents=True)
    shutil.copy(FIX / "clinc150" / "data" / "data_full.json", dest / "data_full.json")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _leftovers(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_fetch_ok_then_cached(server, tmp_path):
    src = FIX / "clinc150" / "data" / "data_full.json"
    spec = RemoteFile("data/data_full.json", sha256=hashlib.sha256(src.read_bytes()).hexdigest())
    root = fetch_corpus("clinc150", tmp_path / "home", base_url=server, files=[spec], progress=False)
    assert (root / "data" / "data_full.json").read_bytes() == src.read_bytes()
    assert (root / ".fetched.json").is_file()
    # a second fetch with the server gone re-verifies the cache and downloads nothing
    assert fetch_corpus("clinc150", tmp_path / "home", base_url="http://127.0.0.1:9", files=[spec], progress=False)


def test_fetch_git_blob_digest(server, tmp_path):
    src = FIX / "clinc150" / "data" / "data_full.json"
    spec = RemoteFile("data/data_full.json", git_sha1=git_blob_sha1(src))
    data = src.read_bytes()
    assert git_blob_sha1(src) == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    fetch_corpus("clinc150", tmp_path / "home", base_url=server, files=[spec], progress=False)


def test_fetch_bad_checksum_leaves_nothing(server, tmp_path):
    spec = RemoteFile("data/data_full.json", sha256="0" * 64)
    with pytest.raises(ChecksumError):
        fetch_corpus("clinc150", tmp_path / "home", base_url=server, files=[spec], progress=False)
    assert _leftovers(tmp_path / "home") == []


def test_fetch_interrupted_leaves_nothing(server, tmp_path):
    spec = RemoteFile("data/truncated.json", sha256="0" * 64)
    with pytest.raises(OSError, match="connection closed|IncompleteRead|reset"):
        fetch_corpus("clinc150", tmp_path / "home", base_url=server, files=[spec], progress=False, timeout=5)
    assert _leftovers(tmp_path / "home") == []


def test_manifests_pin_every_corpus():
    for name in CORPORA:
        if name in ARCHIVES:  # a released tarball, pinned by its digest
            assert len(ARCHIVES[name].sha256) == 64 and ARCHIVES[name].members
            continue
        m = manifests()[name]
        assert len(m.commit) == 40 and m.files
        assert all(f.sha256 or f.git_sha1 for f in m.files)


# --- CLI -------------------------------------------------------------------------------


def _cli(*args: str):
    return CliRunner().invoke(data_command, list(args))


def test_cli_help():
    r = _cli("--help")
    assert r.exit_code == 0 and "fetch" in r.output and "build" in r.output and "list" in r.output


def test_cli_unknown_corpus(tmp_path):
    assert _cli("fetch", "nope", "--home", str(tmp_path)).exit_code == 2
    r = _cli("build", "--from", f"nope={FIX}", "--out", str(tmp_path))
    assert r.exit_code == 2 and "unknown corpus" in r.output


def test_cli_missing_path(tmp_path):
    r = _cli("build", "--from", f"clinc150={tmp_path / 'absent'}", "--out", str(tmp_path))
    assert r.exit_code == 2 and "absent" in r.output


def test_cli_corrupt_file(tmp_path):
    bad = tmp_path / "clinc" / "data" / "data_full.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("[1, 2", "utf-8")
    r = _cli(
        "build",
        "--home",
        str(tmp_path / "h"),
        "--from",
        f"clinc150={tmp_path / 'clinc'}",
        "--own-data",
        str(OWN),
        "--out",
        str(tmp_path / "o"),
    )
    assert r.exit_code == 2 and str(bad) in r.output
    assert not (tmp_path / "o" / "public-train.jsonl").exists()


def test_cli_build_and_list(tmp_path):
    args = ["build", "--home", str(tmp_path), "--own-data", str(OWN)]
    for n in CORPORA:
        args += ["--from", f"{n}={FIX / n}"]
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    assert "removed in_slurp_test: hwu64=1" in r.output
    r = _cli("list", "--home", str(tmp_path))
    assert r.exit_code == 0 and "CC BY 3.0" in r.output and "public-train.jsonl" in r.output
    assert "not fetched" in r.output


def test_xsid_reads_only_the_languages_served(tmp_path):
    """xSID's other languages (and the de-st dialect) are outside the six the classifier serves."""
    folder = tmp_path / "data" / "xSID"
    folder.mkdir(parents=True)
    block = "# text: {t}\n# intent: weather/find\n1\tw\tweather/find\tO\n"
    for lang in ("de", "de-st", "ja", "nl"):
        (folder / f"{lang}.test.conll").write_text(block.format(t=f"text {lang}"), "utf-8")
    assert {r.lang for r in read_xsid(tmp_path)} == {"de"}
    assert {r.lang for r in read_xsid(tmp_path, langs=None)} == {"de", "de-st", "ja", "nl"}
