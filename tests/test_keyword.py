"""The keyword tier: folding, lexicon loading, the boundary rules and six languages."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_intent.keyword import (
    LEXICON_DIR,
    MARKERS,
    KeywordClassifier,
    LexiconError,
    classify_keywords,
    load_lexicons,
)
from mlx_intent.normalize import normalize, tokens
from mlx_intent.schema import INTENTS, LANGUAGES, answer_of, validate

# Any code point, surrogates and unassigned ones included.
ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=200)


@settings(max_examples=500)
@given(ANY_TEXT)
def test_normalize_is_idempotent_and_total(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert once == once.strip() and "  " not in once


@settings(max_examples=300)
@given(ANY_TEXT)
def test_any_text_gives_a_schema_valid_result(text: str) -> None:
    result = classify_keywords(text)
    validate(answer_of(result))
    assert 0.0 < result["confidence"] < 1.0
    assert set(result["scores"]) == set(INTENTS)


@pytest.mark.parametrize(
    "variants",
    [
        ["İSTANBUL", "istanbul", "Istanbul", "ıstanbul"],
        ["Kadıköy", "Kadikoy", "KADIKÖY", "kadıköy"],
        ["Beşiktaş", "Besiktas", "BEŞİKTAŞ"],
        ["Üsküdar", "Uskudar"],
        ["café", "cafe", "CAFÉ"],
        ["Straße", "strasse"],
        ["أين", "اين", "إين"],
        ["مَدْرَسَة", "مدرسه"],
        ["مستشفى", "مستشفي"],
        ["ещё", "еще", "ЕЩЁ"],
        ["١٢٣", "123"],
    ],
)
def test_spelling_variants_fold_together(variants: list[str]) -> None:
    assert len({normalize(v) for v in variants}) == 1


def test_punctuation_symbols_and_tatweel_go() -> None:
    assert normalize("¿Dónde?  «bonjour» ، ؟ 🙂 hi_there!") == "donde bonjour hi there"
    assert normalize("مـــرحبا") == normalize("مرحبا")
    assert tokens("Kadıköy'de  balık, nerede?") == ["kadikoy", "de", "balik", "nerede"]


def test_package_lexicons_cover_every_intent_in_every_language() -> None:
    load_lexicons()  # raises on any malformed line
    for lang in LANGUAGES:
        lines = (LEXICON_DIR / f"{lang}.tsv").read_text(encoding="utf-8").splitlines()
        used = {line.split("\t")[0] for line in lines if line.strip() and not line.startswith("#")} - set(MARKERS)
        assert used == set(INTENTS) - {"general"} or used == set(INTENTS), lang


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("restaurants\tkebab", "unknown intent"),
        ("restaurant kebab", "expected 'intent<TAB>term"),
        ("restaurant\tkebab\tmany", "bad weight"),
        ("restaurant\tkebab\t-1", "bad weight"),
        ("restaurant\t?!", "no letters or digits"),
        ("restaurant\tke*bab", "may only end a term"),
    ],
)
def test_malformed_lexicon_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "xx.tsv"
    path.write_text(f"# comment\n\ngreeting\thello\n{line}\n", encoding="utf-8")
    with pytest.raises(LexiconError) as info:
        load_lexicons(tmp_path)
    assert f"{path}:4" in str(info.value) and problem in str(info.value)


def test_empty_lexicon_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LexiconError, match="no \\*.tsv"):
        load_lexicons(tmp_path)


def test_custom_lexicon_phrases_stems_and_weights(tmp_path: Path) -> None:
    (tmp_path / "t.tsv").write_text(
        "restaurant\tbalık ekmek\t2\nattraction\tmüze*\ngreeting\tmerhaba\n", encoding="utf-8"
    )
    lex = load_lexicons(tmp_path)
    assert classify_keywords("BALIK EKMEK nerede?", lex)["primary_intent"] == "restaurant"
    assert classify_keywords("Müzeleri açık mı", lex)["primary_intent"] == "attraction"
    assert classify_keywords("balık", lex)["primary_intent"] == "general"  # half a phrase is no match
    result = classify_keywords("Merhaba! balik ekmek", lex)
    assert result["all_intents"] == ["restaurant", "greeting"]


def top(text: str) -> str:
    return classify_keywords(text)["primary_intent"]


@pytest.mark.parametrize(
    ("text", "primary", "also"),
    [
        # 1. social words plus a request: the request decides, greeting joins
        ("Hi, where can I eat?", "restaurant", ["greeting"]),
        ("Merhaba, where is the nearest ATM?", "nearby_locations", ["greeting"]),
        ("Thanks a lot, bye!", "greeting", []),
        ("Thanks, see you tonight!", "greeting", []),
        ("Hi! Is Topkapı open today?", "attraction", ["greeting"]),
        # 2. an airport named: airport_transport, not transportation
        ("How do I get from IST to Sultanahmet?", "airport_transport", []),
        ("10 hour layover at IST, can I see the old city?", "route_planning", []),
        ("Havalimanından Taksim'e otobüs var mı?", "airport_transport", []),
        # 3. from here / navigate: gps; both ends named: transportation
        ("Navigate me to Taksim from here", "gps_route_planning", []),
        ("Buradan Galata Kulesi'ne nasıl giderim?", "gps_route_planning", []),
        ("How do I get from Kadıköy to Beşiktaş by ferry?", "transportation", []),
        # 4. several stops: route_planning; all museums: museum_route_planning
        ("Sultanahmet then Galata, best order?", "route_planning", []),
        ("Plan a museum tour for tomorrow", "museum_route_planning", []),
        ("Which museums in one day, in what order?", "museum_route_planning", []),
        # 5. near X: nearby_locations, unless plainly food
        ("What's near Galata Tower?", "nearby_locations", []),
        ("Best restaurants near Taksim", "restaurant", ["nearby_locations"]),
        # 6. a named landmark alone: attraction
        ("Hagia Sophia", "attraction", []),
        ("Is Hagia Sophia open on Mondays?", "attraction", []),
        # 7. nothing fits: general
        ("", "general", []),
        ("asdf qwer", "general", []),
        ("ok", "general", []),
    ],
)
def test_boundary_rules(text: str, primary: str, also: list[str]) -> None:
    result = classify_keywords(text)
    assert result["primary_intent"] == primary
    assert all(i in result["all_intents"] for i in also)


@pytest.mark.parametrize(
    ("text", "primary"),
    [
        ("Where to buy Turkish delight?", "shopping"),
        ("Will it rain tomorrow?", "weather"),
        ("Any concerts this weekend?", "events"),
        ("What is Balat like as a neighbourhood?", "neighborhood"),
        ("Somewhere locals go, not tourists", "hidden_gems"),
        ("Do I need a visa?", "general"),
        ("How does the Istanbulkart work?", "transportation"),
        ("Merhaba, nasılsın?", "greeting"),
        ("Kadıköy'de en iyi balık restoranı", "restaurant"),
        ("Topkapı Sarayı bilet fiyatı", "attraction"),
        ("Yarın hava nasıl olacak?", "weather"),
        ("Gizli kalmış yerler", "hidden_gems"),
        ("مرحبا، كيف حالك؟", "greeting"),
        ("أين أجد مطعم كباب في تقسيم؟", "restaurant"),
        ("كيف أذهب من المطار إلى السلطان أحمد؟", "airport_transport"),
        ("ما هي أقرب صيدلية؟", "nearby_locations"),
        ("هل أحتاج تأشيرة لدخول تركيا؟", "general"),
        ("Où manger du poisson ?", "restaurant"),
        ("Quel quartier pour loger ?", "neighborhood"),
        ("Il va pleuvoir demain ?", "weather"),
        ("Emmène-moi à la Mosquée bleue d'ici", "gps_route_planning"),
        ("Wie warm ist es im Mai?", "weather"),
        ("La mosquée restaurée est-elle ouverte ?", "attraction"),
        ("ATM in der Nähe", "nearby_locations"),
        ("Wie komme ich vom Flughafen nach Taksim?", "airport_transport"),
        ("Wo kann man Teppiche kaufen?", "shopping"),
        ("Когда последний паром?", "transportation"),
        ("Привет! Спасибо за помощь", "greeting"),
        ("Где ближайшая аптека?", "nearby_locations"),
        ("Составь маршрут на 3 дня", "route_planning"),
        ("Какие концерты на выходных?", "events"),
    ],
)
def test_clear_examples_in_six_languages(text: str, primary: str) -> None:
    assert top(text) == primary


@pytest.mark.parametrize(
    "text",
    ["hellooo 👋", "günaydınnn", "привееет", "merci beaucoup !!", "🙏", "😊😊", "👍", "shukran", "privet", "bonjour ☀️"],
)
def test_elongated_words_and_emoji_still_greet(text: str) -> None:
    assert top(text) == "greeting"


@pytest.mark.parametrize(
    ("text", "intents"),
    [
        ("the ferry ride was beautiful, thank you", ["greeting"]),  # the ferry is what the remark is about
        ("good morning, lovely weather isn't it", ["greeting"]),
        ("Ayasofya muhteşemdi, eyvallah", ["greeting"]),
        ("الجو جميل اليوم، مرحبا", ["greeting"]),
        ("Topkapı war toll, wo essen wir jetzt zu abend", ["restaurant"]),  # a request after the remark
        ("best month to visit for nice weather, not too hot not too rainy", ["weather"]),  # a strong request
        ("il fait beau demain ?", ["weather"]),  # in a question a remark is no social word
        ("Loved the Blue Mosque. Is Hagia Sophia open on Fridays?", ["attraction"]),
    ],
)
def test_a_remark_that_asks_nothing_is_social_talk(text: str, intents: list[str]) -> None:
    assert classify_keywords(text)["all_intents"] == intents


def test_a_remark_is_as_sure_as_a_hello() -> None:
    assert classify_keywords("what a view!")["confidence"] == classify_keywords("hello")["confidence"]


@pytest.mark.parametrize("text", ["what's your name?", "wie heißt du?", "как тебя зовут?", "ههههههه", "tu es génial"])
def test_talk_with_the_assistant_is_social(text: str) -> None:
    assert classify_keywords(text)["all_intents"] == ["greeting"]


@pytest.mark.parametrize("text", ["haha ok, where can I eat kebab?", "where can I eat kebab? 😊"])
def test_a_laugh_or_a_smile_adds_no_greeting_to_a_request(text: str) -> None:
    assert classify_keywords(text)["all_intents"] == ["restaurant"]


@pytest.mark.parametrize(
    ("text", "intents"),
    [
        ("how do you say thank you in Turkish?", ["general"]),
        ("merhaba ne demek", ["general"]),  # the question word comes after the quoted one
        ("Was bedeutet Merhaba?", ["general"]),
        ("thanks! I just wanted to say bye", ["greeting"]),  # said, not asked about
    ],
)
def test_social_words_asked_about_are_quoted_not_said(text: str, intents: list[str]) -> None:
    assert classify_keywords(text)["all_intents"] == intents


@pytest.mark.parametrize(
    ("text", "intents"),
    [
        ("bye! heading to the grand bazaar now", ["greeting"]),  # where they go, not what they want
        ("hoşça kal! şimdi kapalıçarşıya gidiyorum", ["greeting"]),  # the verb closes a Turkish clause
        ("greetings from galata tower!", ["greeting"]),
        ("только что заселились в отель в таксиме, привет!", ["greeting"]),
        ("hi just landed at SAW need a taxi to Kadıköy", ["airport_transport", "greeting"]),  # asked, no "?"
        ("hi! just landed at IST, how do I get to Taksim?", ["airport_transport", "greeting"]),
        ("hi we just landed at sabiha gokcen, how do we get to taksim", ["airport_transport", "greeting"]),
        ("bye, heading out. Grand Bazaar hours", ["shopping", "greeting"]),  # another clause asks
        ("heading to the grand bazaar now", ["shopping"]),  # no social word: nothing says it is talk
        ("Hi! How are you? I'm good, having breakfast by the Bosphorus.", ["greeting"]),  # a social "?"
        ("hi, how are you? is the metro running today?", ["transportation", "greeting"]),
        ("Привет! Как дела? У меня всё хорошо, гуляем по Галате.", ["greeting"]),
        ("you were right about the baklava, now where can we get coffee", ["restaurant", "greeting"]),
        ("merci ! on mange où ce soir à Kadıköy", ["restaurant", "greeting"]),  # "on mange" narrates, "mange" asks
        ("teşekkürler, kapalıçarşıda halı aldık 😊", ["greeting"]),
        ("merhaba, kapalıçarşıda halı nereden alınır", ["shopping", "greeting"]),
    ],
)
def test_narration_in_social_talk_names_where_one_is(text: str, intents: list[str]) -> None:
    assert classify_keywords(text)["all_intents"] == intents


def test_weather_emoji_counts_as_weather() -> None:
    assert top("☔ tomorrow?") == "weather"


def test_confidence_follows_evidence() -> None:
    nothing = classify_keywords("hmm")["confidence"]
    one = classify_keywords("kebab?")["confidence"]
    strong = classify_keywords("Plan my day: 2 days, best order, itinerary please")["confidence"]
    assert nothing < one < strong < 1.0


def test_classifier_object_matches_function() -> None:
    """Uncalibrated, the tier object is the function; calibrated, only the confidence moves."""
    text = "Merhaba, Kadıköy'de kahvaltı nerede?"
    assert KeywordClassifier(platt=None).classify(text) == classify_keywords(text)
    calibrated = KeywordClassifier(platt=(2.0, 1.0)).classify(text)
    raw = classify_keywords(text)
    assert calibrated["confidence"] > raw["confidence"]

    def rest(result: dict) -> dict:
        return {k: v for k, v in result.items() if k != "confidence"}

    assert rest(calibrated) == rest(raw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello, how do I get from Kadıköy to Beşiktaş by ferry?", ["transportation", "greeting"]),
        ("Merhaba, Üsküdar'dan Balat'a nasıl giderim?", ["transportation", "greeting"]),
        ("Where to stay, Balat or Karaköy? and how is the tram there", ["neighborhood", "transportation"]),
    ],
)
def test_places_named_on_the_way_are_not_extra_intents(text, expected) -> None:
    """Districts and sights only say where; they join all_intents with a cue of their own ("where to stay")."""
    assert classify_keywords(text)["all_intents"] == expected
