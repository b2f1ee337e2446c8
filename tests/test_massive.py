"""MASSIVE's importer: the six locales, row-level relabels, exclusions, caps, the dev halves, the tarball.

Runs on tests/fixtures/corpora/massive: invented sentences in MASSIVE 1.1's layout, with two ids that the
committed relabel and exclusion tables name (12657: a taxi to the airport whose Turkish localisation names
no airport; 1208: a location recommendation about food).  The download test serves a tarball made here,
on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_intent.corpora import CORPORA, build, text_key
from mlx_intent.corpora.build import MASSIVE_PER_SOURCE, cap_per_source
from mlx_intent.corpora.download import ChecksumError, fetch_archive
from mlx_intent.corpora.mapping import DROP, MapError, load_exclusions, load_map, load_relabels
from mlx_intent.corpora.readers import MASSIVE_LOCALES, Record, parallel_id, read_massive
from mlx_intent.corpora.sources import ARCHIVES, Archive
from mlx_intent.schema import INTENTS, LANGUAGES

FIX = Path(__file__).parent / "fixtures" / "corpora"
SOURCES = {n: FIX / n for n in CORPORA}
OWN = FIX / "own"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    return out, build(SOURCES, out, OWN)


def test_reader_reads_our_six_locales_with_parallel_ids():
    recs = list(read_massive(FIX / "massive", ("train", "dev", "test")))
    assert set(MASSIVE_LOCALES) == set(LANGUAGES)
    by_id = defaultdict(set)
    for r in recs:
        by_id[parallel_id(r)].add(r.lang)
        assert r.id == f"massive-{r.split}-{r.lang}-{parallel_id(r)}"
    assert all(langs == set(LANGUAGES) for langs in by_id.values())
    assert {r.split for r in recs} == {"train", "dev", "test"}
    assert not list(read_massive(FIX / "massive", ("validation",)))


def test_tables_are_valid():
    table = load_map("massive")
    relabels = load_relabels("massive")
    assert table["recommendation_locations"].intent == DROP and table["weather_query"].intent == "weather"
    assert len(relabels) > 300
    for rid, names in relabels.items():
        assert rid.isdigit() and (names == (DROP,) or all(n in INTENTS for n in names)), rid
    for rid in load_exclusions("massive"):
        corpus, split, lang, key = rid.split("-")
        assert corpus == "massive" and split in CORPORA["massive"].training_splits and lang in LANGUAGES
        assert load_relabels("massive")[key] == ("airport_transport",)


def test_relabel_table_refuses_an_unknown_intent(tmp_path, monkeypatch):
    from mlx_intent.corpora import mapping

    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "bad.relabel.tsv").write_text("id\tintents\treason\n7\trestaurant,teleport\tno such intent\n")
    monkeypatch.setattr(mapping.resources, "files", lambda _: tmp_path)
    load_relabels.cache_clear()
    try:
        with pytest.raises(MapError, match="teleport"):
            load_relabels("bad")
    finally:
        load_relabels.cache_clear()


def test_build_relabels_and_excludes(built):
    out, summary = built
    train = [r for r in _read(out / "public-train.jsonl") if r["id"].startswith("massive-")]
    by = {(r["lang"], r["id"].rsplit("-", 1)[1]): r for r in train}
    # 12657: a taxi to the airport (rule 2) in every language whose localisation names the airport
    assert {lang for lang, rid in by if rid == "12657"} == set(LANGUAGES) - {"tr"}
    assert all(by[(lang, "12657")]["primary_intent"] == "airport_transport" for lang in LANGUAGES if lang != "tr")
    # 1208: a location recommendation about food is restaurant; 301, one no rule settles, is dropped
    assert all(by[(lang, "1208")]["all_intents"] == ["restaurant"] for lang in LANGUAGES)
    assert not any(rid == "301" for _, rid in by)
    assert summary["removed"]["excluded_row"]["massive"] == 1
    assert summary["removed"]["unmapped_label"]["massive"] == 6
    # 302's Turkish text is a Turkish text of MASSIVE test: removed in Turkish only
    assert ("en", "302") in by and ("tr", "302") not in by
    assert summary["removed"]["in_reserved"]["massive"] == 1


def test_dev_halves_are_the_same_requests_in_every_language(built):
    out, summary = built
    heldout = _read(out / "public-heldout-massive.jsonl")
    calib = [r for r in _read(out / "public-calib.jsonl") if r["id"].startswith("massive-")]
    assert {r["id"].rsplit("-", 1)[1] for r in heldout} == {"2"}
    assert {r["lang"] for r in heldout} == set(LANGUAGES)
    assert {r["id"].rsplit("-", 1)[1] for r in calib} <= {"3", "4"}
    # SLURP devel's English copies of the reported requests (ids 2, 5, 6) are not trained on
    assert summary["removed"]["massive_heldout"] == {"slurp": 3}
    trained = {text_key(r["text"]) for r in _read(out / "public-train.jsonl")}
    assert not trained & {text_key(r["text"]) for r in heldout}


def test_reserved_massive_holds_test_only(built):
    out, _ = built
    reserved = _read(out / "reserved-massive.jsonl")
    assert {r["id"].split("-")[1] for r in reserved} == {"test"}
    assert {r["lang"] for r in reserved} == set(LANGUAGES)
    keys = {(r["lang"], text_key(r["text"])) for r in reserved}
    for name in ("public-train.jsonl", "public-calib.jsonl", "public-heldout-massive.jsonl"):
        assert not keys & {(r["lang"], text_key(r["text"])) for r in _read(out / name)}


@given(
    st.lists(
        st.tuples(st.sampled_from(["alarm_set", "play_music", "weather_query"]), st.sampled_from(["en", "tr"])),
        max_size=120,
    ),
    st.integers(0, 5),
)
def test_cap_per_source_keeps_every_kind_in_every_language(rows, cap):
    pairs = [
        (
            Record("massive", "train", f"{lang}-{i}", src, f"t{i}", lang),
            ("weather",) if src == "weather_query" else ("general",),
        )
        for i, (src, lang) in enumerate(rows)
    ]
    kept, dropped = cap_per_source(pairs, cap)
    assert len(kept) + dropped == len(pairs)
    counts = defaultdict(int)
    for rec, _ in kept:
        counts[(rec.source_intent, rec.lang)] += 1
    for (src, lang), n in counts.items():
        want = sum(1 for s, x in rows if (s, x) == (src, lang))
        assert n == (want if src == "weather_query" else min(want, cap))
    assert kept == cap_per_source(pairs, cap)[0]
    assert MASSIVE_PER_SOURCE > 0


# --- the release tarball ----------------------------------------------------------------


def _tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture()
def release(tmp_path):
    members = {
        f"1.1/data/{loc}.jsonl": (FIX / "massive" / "1.1" / "data" / f"{loc}.jsonl").read_bytes()
        for loc in MASSIVE_LOCALES.values()
    }
    www = tmp_path / "www"
    www.mkdir()
    (www / "massive.tar.gz").write_bytes(_tarball({**members, "1.1/LICENSE": b"CC BY 4.0"}))
    (www / "broken.tar.gz").write_bytes(b"not a tarball")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, tuple(members)
    httpd.shutdown()
    httpd.server_close()


def test_fetch_archive_unpacks_the_members_then_builds(release, tmp_path):
    base, www, members = release
    digest = hashlib.sha256((www / "massive.tar.gz").read_bytes()).hexdigest()
    archive = Archive(f"{base}/massive.tar.gz", digest, members)
    root = fetch_archive("massive", archive, tmp_path / "home", progress=False)
    assert (root / ".fetched.json").is_file() and not (root / "1.1" / "LICENSE").exists()
    assert list(read_massive(root, ("test",)))
    # a second fetch re-verifies the kept tarball, with the server gone
    gone = Archive("http://127.0.0.1:9/massive.tar.gz", digest, members)
    assert fetch_archive("massive", gone, tmp_path / "home", progress=False) == root


def test_fetch_archive_bad_digest_or_tarball_leaves_no_member(release, tmp_path):
    base, www, members = release
    with pytest.raises(ChecksumError):
        fetch_archive("massive", Archive(f"{base}/massive.tar.gz", "0" * 64, members), tmp_path / "a", progress=False)
    assert not [p for p in (tmp_path / "a").rglob("*") if p.is_file()]
    digest = hashlib.sha256(b"not a tarball").hexdigest()
    with pytest.raises(ChecksumError, match="not a readable tarball"):
        fetch_archive("massive", Archive(f"{base}/broken.tar.gz", digest, members), tmp_path / "b", progress=False)
    assert not list((tmp_path / "b").rglob("*.jsonl")) and not list((tmp_path / "b").rglob(".fetched.json"))


def test_the_official_release_is_pinned():
    a = ARCHIVES["massive"]
    assert a.url.endswith("amazon-massive-dataset-1.1.tar.gz") and len(a.sha256) == 64
    assert {m.rsplit("/", 1)[1] for m in a.members} == {f"{loc}.jsonl" for loc in MASSIVE_LOCALES.values()}
