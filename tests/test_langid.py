"""Language detection: a few queries per language, Turkish typed without Turkish letters, robustness."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_intent.langid import detect_language
from mlx_intent.schema import LANGUAGES

SENTENCES = {
    "en": [
        "Where can I eat good kebab near Taksim?",
        "How do I get to Hagia Sophia from the airport?",
        "whats around ortakoy mosque",
        "Best rooftop bars in Beyoğlu",
        "Hagia Sophia opening hours",
    ],
    "tr": [
        "Sultanahmet'e nasıl gidebilirim?",
        "Kadıköy'de iyi bir balık restoranı önerir misin?",
        "İstanbul'da gezilecek yerler",
        "Bugün hava nasıl olacak?",
        # typed without Turkish letters
        "Sultanahmete nasil gidebilirim",
        "yakinda eczane var mi",
        "Ayasofya icin bilet lazim mi",
        "taksimden havalimanina nasil giderim",
    ],
    "de": [
        "Wo kann ich in der Nähe vom Taksim gut essen?",
        "Wie komme ich zum Flughafen?",
        "Gibt es eine Straßenbahn nach Kabataş?",
        "Was ist los heute abend in Kadıköy?",
        "Öffnungszeiten der Hagia Sophia am Freitag",
    ],
    "fr": [
        "Où puis-je manger près de Taksim ?",
        "Comment aller à l'aéroport depuis Beşiktaş ?",
        "Quels sont les horaires de Sainte-Sophie ?",
        "ferry Eminönü Kadıköy horaires",
        "salut ça va ?",
    ],
    "ru": [
        "Как добраться до Айя-Софии?",
        "Где находится Sultanahmet Camii?",
        "Какая погода завтра в Стамбуле?",
        "Привет!",
    ],
    "ar": [
        "كيف أصل إلى آيا صوفيا؟",
        "مطاعم قريبة من Taksim",
        "ما هو الطقس غدا في إسطنبول؟",
        "مرحبا",
    ],
}


def test_every_schema_language_is_covered():
    assert set(SENTENCES) == set(LANGUAGES)


@pytest.mark.parametrize(("lang", "text"), [(lang, t) for lang, texts in SENTENCES.items() for t in texts])
def test_sentences(lang, text):
    assert detect_language(text) == lang


@pytest.mark.parametrize("text", ["", "   ", "123 456", "?!… 👋🙏", "東京タワー", None, 42])
def test_no_decision(text):
    assert detect_language(text) is None




@given(st.text())
def test_any_text_gives_none_or_a_schema_code(text):
    assert detect_language(text) in (None, *LANGUAGES)
