"""The public corpora we import: where they live, which splits may train, their credits.

The training/reserved split of each corpus is policy, not data, so it is spelled out
here once: rows of a reserved split may only ever be evaluated on (never trained,
calibrated, tuned on or shown as examples), and their texts are removed from every
training-side file that `build` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class Corpus:
    """One public corpus: its splits by role, its pinned snapshot, and how to credit it."""

    name: str
    title: str
    licence: str
    citation: str
    training_splits: tuple[str, ...]  # may feed public-train / calib / heldout
    reserved_splits: tuple[str, ...]  # evaluation only: reserved-<name>.jsonl

    @property
    def credit(self) -> str:
        """The one-line credit that `data list` prints and CREDITS.md expands."""
        return f"{self.title}: {self.citation} Licence: {self.licence}."


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus(
            "clinc150",
            "CLINC150 (oos-eval)",
            "CC BY 3.0",
            "Larson et al. 2019, An Evaluation Dataset for Intent Classification and Out-of-Scope Prediction, "
            "EMNLP-IJCNLP.",
            ("train", "val", "oos_train", "oos_val"),
            ("test", "oos_test"),
        ),
        Corpus(
            "hwu64",
            "HWU64 / NLU-Evaluation-Data",
            "CC BY 4.0",
            "Liu et al. 2019, Benchmarking Natural Language Understanding Services for building Conversational "
            "Agents, IWSDS.",
            ("all",),
            (),
        ),
        Corpus(
            "slurp",
            "SLURP (text)",
            "CC BY 4.0",
            "Bastianelli et al. 2020, SLURP: A Spoken Language Understanding Resource Package, EMNLP.",
            ("devel",),
            ("test",),
        ),
        Corpus(
            "xsid",
            "xSID",
            "CC BY-SA 4.0",
            "van der Goot et al. 2021, From Masked Language Modeling to Translation: Non-English Auxiliary Tasks "
            "Improve Zero-shot Spoken Language Understanding, NAACL.",
            (),
            ("test",),
        ),
        Corpus(
            "snips",
            "Snips NLU benchmark (2017-06 custom intent engines)",
            "CC0 1.0",
            "Coucke et al. 2018, Snips Voice Platform: an embedded Spoken Language Understanding system for "
            "private-by-design voice interfaces, arXiv:1805.10190.",
            (),
            ("validate",),
        ),
        Corpus(
            "massive",
            "MASSIVE 1.1 (en-US, tr-TR, ar-SA, fr-FR, de-DE, ru-RU)",
            "CC BY 4.0",
            "FitzGerald et al. 2022, MASSIVE: A 1M-Example Multilingual Natural Language Understanding Dataset "
            "with 51 Typologically-Diverse Languages, arXiv:2204.08582.",
            ("train", "dev"),
            ("test",),
        ),
    )
}

# Training corpora in the order that wins a duplicate text (first kept).
TRAINING_ORDER: tuple[str, ...] = ("clinc150", "hwu64", "slurp", "massive")


@dataclass(frozen=True)
class RemoteFile:
    """A raw file at a pinned commit with the digest that a download must match."""

    path: str
    sha256: str | None = None
    git_sha1: str | None = None  # the blob id in the commit's tree, when the snapshot lacked the bytes
    size: int | None = None


@dataclass(frozen=True)
class Manifest:
    repo: str
    commit: str
    files: tuple[RemoteFile, ...]


@dataclass(frozen=True)
class Archive:
    """A corpus released as one tarball (not a repository): its address, digest and the members we read."""

    url: str
    sha256: str
    members: tuple[str, ...]


# MASSIVE is released by its authors as a tarball, not a repository; the digest is the 1.1 release's.
ARCHIVES: dict[str, Archive] = {
    "massive": Archive(
        "https://amazon-massive-nlu-dataset.s3.amazonaws.com/amazon-massive-dataset-1.1.tar.gz",
        "4cba5faa11c71437928e17cb1b9b3d8b8e727e7ea363a3a9a8045e19c0491577",
        tuple(f"1.1/data/{loc}.jsonl" for loc in ("en-US", "tr-TR", "ar-SA", "fr-FR", "de-DE", "ru-RU")),
    )
}


@cache
def manifests() -> dict[str, Manifest]:
    """The pinned commits and checksums (computed from the snapshots we reviewed)."""
    raw = json.loads(resources.files(__package__).joinpath("manifests.json").read_text("utf-8"))
    return {
        name: Manifest(m["repo"], m["commit"], tuple(RemoteFile(**f) for f in m["files"])) for name, m in raw.items()
    }


def corpus(name: str) -> Corpus:
    """The corpus called `name`; a clear error naming the known ones otherwise."""
    try:
        return CORPORA[name]
    except KeyError:
        raise KeyError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}") from None
