"""Write mlx_intent/corpora/maps/massive.relabel.tsv and massive.exclude.tsv from a MASSIVE 1.1 checkout.

How the rows were looked at (maintainers rerun this after changing a rule, and review the diff):

* Row-level decisions are made on the English original (en-US ``utt``) and apply to the request's six
  localisations, which share its id.  A pattern below names each boundary rule of shared/intents.md that
  a source intent's blanket mapping (maps/massive.tsv) would get wrong: rule 2 (an airport named:
  airport_transport), rule 3 (directions from where I am: gps_route_planning; A to B both named stays
  transportation), rule 5 (near me: nearby_locations first, unless plainly about food), flights (no rule
  of ours covers air travel: excluded), and the location recommendations, kept only where a rule
  settles them (food: restaurant; buying: shopping; near: nearby_locations).
* A localisation that lost the words the label rests on is excluded in that locale only: an airport
  relabel whose translation names no airport in its language.
* Only train and dev rows are read: test is reserved and never looked at.

Usage: python scripts/massive_relabel.py PATH   (PATH holds 1.1/data/<locale>.jsonl)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

MAPS = Path(__file__).resolve().parents[1] / "mlx_intent" / "corpora" / "maps"
LOCALES = {"en": "en-US", "tr": "tr-TR", "ar": "ar-SA", "fr": "fr-FR", "de": "de-DE", "ru": "ru-RU"}
TRANSPORT = {"transport_query", "transport_taxi", "transport_ticket", "transport_traffic"}

AIRPORT = re.compile(r"\bairports?\b|\bheathrow\b|\bgatwick\b|\bstansted\b|\bjfk\b|\blax\b|\bo'?hare\b")
FLIGHT = re.compile(r"\bflights?\b|\bfly\b|\bflying\b|\bplanes?\b|\bairlines?\b|\bairfare\b|\bboarding\b")
GPS = re.compile(
    r"\bnavigat\w*|\bdirections?\b|\bfrom here\b|\bfrom my (current )?location\b|\bfrom where i am\b"
    r"|\bget me (to|home)\b|\bhow (do|can|should) i get (to|there)\b|\broute to\b|\bway to\b|\bgps\b"
    r"|\bmy destination\b|\bfastest route\b"
)
NAMED_FROM = re.compile(
    r"\bfrom (?!here\b|my\b|where\b|the current\b)\w+.* to \w+|\bto \w+.* from (?!here\b|my\b|where\b|the current\b)\w+"
)
FOOD = re.compile(
    r"\brestaurants?\b|\beat\b|\beating\b|\bfood\b|\bcaf[eé]s?\b|\bcoffee\b|\bbars?\b|\bpubs?\b|\bpizza\w*|\bsushi\b"
    r"|\bdinner\b|\blunch\b|\bbreakfast\b|\bbrunch\b|\bmeals?\b|\bcuisine\b|\bdiners?\b|\bburgers?\b|\bbakery\b"
    r"|\btakeaway\b|\bdine\b|\bdining\b|\bsteak\w*|\bvegan\b|\bbistro\b|\bbuffet\b|\bdrinks?\b|\bchinese\b|\bindian\b"
    r"|\bitalian\b|\bmexican\b|\bthai\b|\bchicken\b|\btacos?\b|\bsandwich\w*|\bnoodles?\b|\bbbq\b|\bbarbecue\b"
    r"|\bseafood\b|\bkebabs?\b|\bice cream\b|\bdesserts?\b|\bwine\b|\bbeer\b|\bdonuts?\b"
)
SHOP = re.compile(r"\bshops?\b|\bstores?\b|\bmalls?\b|\bbuy\b|\bmarkets?\b|\bboutiques?\b|\bshopping\b|\bgrocer\w*")
NEAR = re.compile(
    r"\bnear\b|\bnearest\b|\bnearby\b|\bclosest\b|\bclose to\b|\baround (me|here)\b|\bin my area\b|\bclose by\b"
    r"|\bin the area\b"
)
SCREEN = re.compile(
    r"\bcinemas?\b|\btheat(er|re)s?\b|\bshowing\b|\bshowtimes?\b|\bplaying (near|in|at|around)\b|\bscreening"
)
TABLE = re.compile(r"\bbook (a|me a) table\b|\btable for \w+\b|\breservation (at|for)\b")
AIRPORT_WORD = {
    "en": re.compile(r"airport|heathrow|gatwick|stansted|jfk|lax|hare", re.I),
    "tr": re.compile(r"havaliman|havaalan|heathrow|gatwick|jfk|lax", re.I),
    "ar": re.compile(r"مطار|jfk|lax"),
    "fr": re.compile(r"a[ée]roport|heathrow|gatwick|jfk|lax", re.I),
    "de": re.compile(r"flughafen|heathrow|gatwick|jfk|lax", re.I),
    "ru": re.compile(r"аэропорт|хитроу|гатвик|jfk|lax", re.I),
}


def decide(intent: str, text: str) -> tuple[str, str] | None:
    """(intents, reason) for a row the blanket map would get wrong, None where the map's own line holds."""
    t = text.lower()
    if intent in TRANSPORT:
        if AIRPORT.search(t):
            return "airport_transport", "an airport named as origin or destination (rule 2)"
        if FLIGHT.search(t):
            return "-", "air travel: no intent of ours covers flights"
        if GPS.search(t) and not NAMED_FROM.search(t):
            return "gps_route_planning", "directions from where the traveller is (rule 3)"
        return None
    if intent == "recommendation_locations":
        if TABLE.search(t):
            return "restaurant", "a table reservation: restaurant"
        if FOOD.search(t):
            return ("restaurant,nearby_locations" if NEAR.search(t) else "restaurant"), "about food (rule 5)"
        if SHOP.search(t):
            if NEAR.search(t):
                return "nearby_locations,shopping", "a shop near me (rule 5)"
            return "shopping", "buying things: shopping"
        if NEAR.search(t):
            return "nearby_locations", "what is near me (rule 5)"
        return "-", "a place recommendation no rule settles"
    if intent in ("recommendation_events", "recommendation_movies"):
        if intent == "recommendation_movies" and not SCREEN.search(t):
            return None
        if NEAR.search(t):
            return "nearby_locations,events", "what is on near me (rule 5)"
        return ("events", "a screening in town: events") if intent == "recommendation_movies" else None
    if intent in ("takeaway_order", "takeaway_query") and NEAR.search(t):
        return "restaurant,nearby_locations", "food near me: restaurant stays primary (rule 5)"
    if TABLE.search(t):
        return "restaurant", "a table reservation: restaurant"
    return None


def main(root: Path) -> None:
    rows = {
        lang: {
            r["id"]: r
            for r in map(json.loads, (root / "1.1" / "data" / f"{loc}.jsonl").read_text("utf-8").splitlines())
            if r["partition"] in ("train", "dev")
        }
        for lang, loc in LOCALES.items()
    }
    relabel, exclude = [], []
    for rid, r in sorted(rows["en"].items(), key=lambda kv: int(kv[0])):
        d = decide(r["intent"], r["utt"])
        if d is None:
            continue
        relabel.append(f"{rid}\t{d[0]}\t{r['intent']}: {d[1]}")
        if d[0] == "airport_transport":
            for lang in LOCALES:
                loc = rows[lang].get(rid)
                if loc is not None and not AIRPORT_WORD[lang].search(loc["utt"]):
                    exclude.append(f"massive-{loc['partition']}-{lang}-{rid}\tthe {lang} localisation names no airport")
    (MAPS / "massive.relabel.tsv").write_text("id\tintents\treason\n" + "\n".join(relabel) + "\n", "utf-8")
    (MAPS / "massive.exclude.tsv").write_text("id\treason\n" + "\n".join(exclude) + "\n", "utf-8")
    print(f"{len(relabel)} relabelled requests, {len(exclude)} localised rows excluded")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
