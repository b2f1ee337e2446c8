"""Importers for public, human-written intent corpora, mapped to our 15 intents.

CLINC150 (train/val/oos), HWU64 (less SLURP test), SLURP devel and MASSIVE train (six
languages) may train, MASSIVE dev calibrates (one half) and is reported (the other); CLINC150
test, SLURP test, MASSIVE test, xSID and Snips are reserved for evaluation.  See CREDITS.md for the
citations and licences, maps/ for the reviewed label maps.
"""

from .build import assign_part, build, cap_general, format_summary, hash_fraction, text_key
from .download import ChecksumError, fetch_corpus, fetched
from .mapping import DROP, load_exclusions, load_map, map_intent
from .readers import READERS, CorpusFormatError, Record
from .sources import CORPORA, corpus, manifests

__all__ = [
    "CORPORA",
    "DROP",
    "READERS",
    "ChecksumError",
    "CorpusFormatError",
    "Record",
    "assign_part",
    "build",
    "cap_general",
    "corpus",
    "fetch_corpus",
    "fetched",
    "format_summary",
    "hash_fraction",
    "load_exclusions",
    "load_map",
    "manifests",
    "map_intent",
    "text_key",
]
