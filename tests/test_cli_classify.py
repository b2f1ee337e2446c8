"""`mlx-intent classify`: one text or a JSONL file through the chain, --resume, exit codes.

Runs that need the LLM use ``--chain smollm2-135m`` with no confidence floor and a
generous latency budget, so the bundled model answers (no keyword tier to pass to, nor to give
a second opinion) however slow the machine is; the model itself comes from the session's ``bundled`` fixture instead of
being loaded again by every command.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlx_intent import schema
from mlx_intent.batch_io import ANSWER_KEYS, OUTPUT_KEYS
from mlx_intent.cli.main import main
from mlx_intent.models import loading

LLM = ["--chain", "smollm2-135m", "--min-confidence", "0", "--latency-budget-ms", "600000"]
KEYWORD = ["--chain", "keyword"]


pytestmark = pytest.mark.usefixtures("clean_settings")  # conftest: no stray .env or MLX_INTENT_* setting


@pytest.fixture
def llm(monkeypatch, bundled):
    def load(name, adapter=None, dequantize=None, home=None):
        assert name == "smollm2-135m" and adapter is None
        return bundled

    monkeypatch.setattr(loading, "load", load)


def run(*args: str, input: str | bytes | None = None):
    return CliRunner().invoke(main, ["classify", *args], input=input)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_output_rows(rows: list[dict], ids: list[str]) -> None:
    assert [r["id"] for r in rows] == ids
    for row in rows:
        assert set(row) == set(OUTPUT_KEYS)
        schema.validate({k: row[k] for k in ANSWER_KEYS})
        assert row["tier"] == row["model"] == "smollm2-135m"
        assert row["latency_ms"] > 0
        assert row["latency_per_query_ms"] == pytest.approx(row["latency_ms"] / row["batch_texts"], abs=0.01)


QUERIES = [
    {"id": "q1", "text": "Where can I eat fish in Kadıköy?"},
    {"id": "q2", "text": "Merhaba, Topkapı Sarayı kaçta açılıyor?"},
    {"text": "Какая погода завтра?"},  # no id: the line number stands in
]


def test_single_text_prints_the_answer(llm):
    result = run("Where can I eat fish in Kadıköy?", *LLM)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert list(answer) == list(ANSWER_KEYS)
    schema.validate(answer)


def test_verbose_adds_model_tier_latency_top(llm):
    result = run("Is Hagia Sophia open on Mondays?", "--verbose", *LLM)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    schema.validate({k: answer[k] for k in ANSWER_KEYS})
    assert answer["model"] == answer["tier"] == "smollm2-135m"
    assert answer["latency_ms"] > 0
    top = answer["top"]
    assert isinstance(top, dict) and 1 <= len(top) <= 5 and set(top) <= set(schema.INTENTS)
    assert max(top, key=top.get) == answer["primary_intent"]


def test_jsonl_in_jsonl_out(llm, tmp_path):
    out = tmp_path / "out.jsonl"
    result = run("--input", write_jsonl(tmp_path / "in.jsonl", QUERIES), "--output", str(out), *LLM)
    assert result.exit_code == 0, result.output
    check_output_rows(read_jsonl(out), ["q1", "q2", "3"])


def test_stdin(llm, tmp_path):
    out = tmp_path / "out.jsonl"
    lines = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUERIES[:2])
    result = run("--input", "-", "--output", str(out), *LLM, input=lines.encode())
    assert result.exit_code == 0, result.output
    check_output_rows(read_jsonl(out), ["q1", "q2"])


def test_resume_skips_ids_already_written(llm, tmp_path):
    out = tmp_path / "out.jsonl"
    earlier = {"id": "q1", "primary_intent": "general", "confidence": 0.5, "all_intents": ["general"]}
    earlier |= {"model": "earlier run", "tier": "earlier run", "latency_ms": 1.0}
    out.write_text(json.dumps(earlier) + "\n", encoding="utf-8")
    result = run("--input", write_jsonl(tmp_path / "in.jsonl", QUERIES), "--output", str(out), "--resume", *LLM)
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert rows[0] == earlier
    check_output_rows(rows[1:], ["q2", "3"])


def test_without_resume_the_output_is_rewritten(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "q1"}\n', encoding="utf-8")
    result = run("--input", write_jsonl(tmp_path / "in.jsonl", QUERIES), "--output", str(out), *KEYWORD)
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_jsonl(out)] == ["q1", "q2", "3"]


@pytest.mark.parametrize(
    "bad, why",
    [
        (b"{not json\n", "not valid JSON"),
        (b'{"id": "x", "text": "caf\xe9"}\n', "not valid UTF-8"),
        (b'{"id": "x", "text": "  \\t "}\n', "text is empty"),
        (b'{"id": "x"}\n', '"text"'),
        (b'["a list"]\n', '"text"'),
    ],
)
@pytest.mark.parametrize("source", ["file", "stdin"])
def test_bad_line_exits_2_naming_it_before_any_work_from_a_file(tmp_path, bad, why, source):
    """A file is checked whole before any line is classified; stdin, read as it comes, keeps the lines before."""
    good = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUERIES[:2]).encode()
    path = tmp_path / "in.jsonl"
    path.write_bytes(good + b"\n" + bad + good)  # the blank line 3 is skipped; line 4 is bad
    out = tmp_path / "out.jsonl"
    if source == "file":
        result = run("--input", str(path), "--output", str(out), *KEYWORD)
    else:
        result = run("--input", "-", "--output", str(out), *KEYWORD, input=path.read_bytes())
    where = str(path) if source == "file" else "-"
    assert result.exit_code == 2
    assert f"{where}:4:" in result.stderr and why in result.stderr
    assert "Traceback" not in result.output
    written = read_jsonl(out) if out.exists() else []
    assert [r["id"] for r in written] == ([] if source == "file" else ["q1", "q2"])


@pytest.mark.parametrize("args", [["--model", "nope"], ["--chain", "nope,keyword"]])
def test_unknown_model_exits_3(tmp_path, args):
    result = run("Where is the ferry?", *args)
    assert result.exit_code == 3
    assert "unknown model 'nope'" in result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_exits_2(text):
    result = run(text, *KEYWORD)
    assert result.exit_code == 2
    assert "text is empty" in result.stderr


def test_missing_input_file_exits_2(tmp_path):
    result = run("--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out.jsonl"), *KEYWORD)
    assert result.exit_code == 2
    assert "no such file" in result.stderr


def test_resume_cuts_a_torn_last_line(tmp_path):
    from mlx_intent.batch_io import done_ids

    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "1", "primary_intent": "greeting"}\n{"id": "2", "prim')
    assert done_ids(out) == {json.dumps("1")}
    assert out.read_bytes() == b'{"id": "1", "primary_intent": "greeting"}\n'


@pytest.fixture
def converted_home(tmp_path, monkeypatch):
    """The bundled model converted by ``models convert --home X`` into X, with MLX_INTENT_HOME unset and the
    registry's default folder an empty one (a home dropped on the way would find no model, and no GGUF is
    converted again)."""
    from mlx_intent import settings
    from mlx_intent.models import gguf, registry

    monkeypatch.delenv("MLX_INTENT_HOME", raising=False)
    monkeypatch.setattr(settings, "default_home", lambda: tmp_path / "default")
    home = tmp_path / "x"
    gguf_path = registry.bundled_gguf(registry.get_spec("smollm2-135m"))
    made = CliRunner().invoke(
        main, ["models", "convert", "--gguf", str(gguf_path), "--name", "smollm2-135m", "--home", str(home)]
    )
    assert made.exit_code == 0, made.output
    assert registry.is_mlx_folder(home / "smollm2-135m") and not (tmp_path / "default").exists()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again: the home was lost")

    monkeypatch.setattr(gguf, "convert_gguf", no_conversion)
    return home


@pytest.mark.parametrize("how", ["--home", ".env"])
def test_classify_finds_a_model_converted_into_the_home_it_is_given(converted_home, tmp_path, how):
    """The home of --home or .env goes down to the registry as an argument: no MLX_INTENT_HOME, and
    os.environ is left as it was (commands used to write MLX_INTENT_HOME into it)."""
    import os

    import mlx_intent.cli.options as options

    assert not hasattr(options, "_apply_home")
    args = ["--home", str(converted_home)] if how == "--home" else []
    if how == ".env":
        (tmp_path / ".env").write_text(f"MLX_INTENT_HOME={converted_home}\n")
    before = {k: v for k, v in os.environ.items() if k.startswith("MLX_INTENT")}  # mlx-lm sets others
    result = run(*LLM, "-v", *args, "Where can I eat fish in Kadıköy?")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["tier"] == "smollm2-135m" and answer["model"] == "smollm2-135m", answer["fallbacks"]
    assert {k: v for k, v in os.environ.items() if k.startswith("MLX_INTENT")} == before
    assert "MLX_INTENT_HOME" not in os.environ
    assert (converted_home / "smollm2-135m" / "mlx_intent.json").is_file()  # loaded from there


def test_sample_needs_generate_mode():
    result = run(*KEYWORD, "--sample", "Where is the ferry?")
    assert result.exit_code == 2 and "--sample needs --mode generate" in result.output


@pytest.mark.parametrize("sample", [False, True])
def test_classify_sample_samples_at_the_models_temperature(llm, monkeypatch, sample):
    """``classify --mode generate --sample`` samples at ModelSpec.temperature; without --sample it is greedy."""
    import dataclasses

    from mlx_intent import classifier
    from mlx_intent.models import registry

    spec = registry.REGISTRY["smollm2-135m"]
    monkeypatch.setitem(registry.REGISTRY, "smollm2-135m", dataclasses.replace(spec, temperature=0.7))
    seen = []
    real = classifier.branch_probs
    monkeypatch.setattr(classifier, "branch_probs", lambda logits, t: seen.append(t) or real(logits, t))
    args = [*LLM, "--mode", "generate", *(["--sample"] if sample else [])]
    result = run(*args, "Where can I eat fish in Kadıköy?")
    assert result.exit_code == 0, result.output
    schema.validate(json.loads(result.output))
    assert (0.7 in seen) is sample


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("via", ["same path", "symlink", "relative path"])
def test_output_that_is_the_input_is_refused_and_left_intact(tmp_path, monkeypatch, via, resume):
    """--input X --output X used to empty X (the output was opened for writing before the input was read)."""
    source = write_jsonl(tmp_path / "in.jsonl", QUERIES)
    before = (tmp_path / "in.jsonl").read_bytes()
    out = source
    if via == "symlink":
        (tmp_path / "link.jsonl").symlink_to(tmp_path / "in.jsonl")
        out = str(tmp_path / "link.jsonl")
    elif via == "relative path":
        monkeypatch.chdir(tmp_path)
        out = "./in.jsonl"
    result = run("--input", source, "--output", out, *(["--resume"] if resume else []), *KEYWORD)
    assert result.exit_code == 2, result.output
    assert "is the --input file" in result.stderr
    assert (tmp_path / "in.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    "lines, first, second",
    [
        ([{"id": "a", "text": "hi"}, {"text": "hello"}, {"id": "2", "text": "ferry"}], 2, 3),  # missing -> "2"
        ([{"id": 7, "text": "hi"}, {"id": 7, "text": "hello"}], 1, 2),
        ([{"id": None, "text": "hi"}, {"id": None, "text": "hello"}], 1, 2),
        ([{"id": "x", "text": "hi"}, {"id": "y", "text": "yo"}, {"id": "x", "text": "hello"}], 1, 3),
    ],
)
def test_duplicate_ids_in_one_input_exit_2_naming_both_lines(tmp_path, lines, first, second):
    """A line without an id got its line number, colliding with an explicit "2", and --resume then skipped one."""
    out = tmp_path / "out.jsonl"
    result = run("--input", write_jsonl(tmp_path / "in.jsonl", lines), "--output", str(out), *KEYWORD)
    assert result.exit_code == 2, result.output
    assert f"in.jsonl:{second}:" in result.stderr and f"line {first}" in result.stderr and "unique" in result.stderr


def test_ids_are_json_values_so_resume_skips_only_the_same_id(tmp_path):
    """2 and "2" are different ids, null is null (it used to become "None"): --resume skips exactly the done ones."""
    lines = [
        {"id": 2, "text": "where can I eat fish"},
        {"id": "2", "text": "hello"},
        {"id": None, "text": "a ferry to Kadikoy"},
        {"id": "None", "text": "thanks"},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    first = run("--input", source, "--output", str(out), *KEYWORD)
    assert first.exit_code == 0, first.output
    assert [r["id"] for r in read_jsonl(out)] == [2, "2", None, "None"]
    rows = read_jsonl(out)
    out.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")  # 2 and null done
    again = run("--input", source, "--output", str(out), "--resume", *KEYWORD)
    assert again.exit_code == 0, again.output
    assert [r["id"] for r in read_jsonl(out)] == [2, None, "2", "None"]


def test_output_dash_writes_the_results_to_stdout(tmp_path, monkeypatch):
    """Issue 24, part 6: ``--output -`` pipes the results on (it wrote a file named "-")."""
    monkeypatch.chdir(tmp_path)
    queries = write_jsonl(tmp_path / "in.jsonl", QUERIES)
    result = CliRunner().invoke(main, ["classify", *KEYWORD, "--input", queries, "--output", "-"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2", "3"] and all(set(r) == set(OUTPUT_KEYS) for r in rows)
    assert not (tmp_path / "-").exists()
    refused = CliRunner().invoke(main, ["classify", *KEYWORD, "--input", queries, "--output", "-", "--resume"])
    assert refused.exit_code == 2 and "stdout" in refused.output


@pytest.mark.parametrize("extra", [["--mode", "generate"], ["--mode", "generate", "--sample"]])
def test_generate_and_sample_without_an_llm_exit_2_with_the_reason(extra, models_home):
    """Issue 24, part 6: they silently returned the encoder's answer."""
    result = run("Когда последний паром?", "--chain", "llama-3.2-3b,keyword", *extra)
    assert result.exit_code == 2
    assert "needs an LLM tier" in result.output and "mlx-intent models pull llama-3.2-3b" in result.output
    alone = run("Когда последний паром?", "--chain", "keyword", *extra)
    assert alone.exit_code == 2 and "the chain has none" in alone.output


def test_generate_with_an_llm_still_answers(llm):
    result = run("Когда последний паром?", *LLM, "--mode", "generate")
    assert result.exit_code == 0, result.output
