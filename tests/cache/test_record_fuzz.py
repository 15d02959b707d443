"""No prompt record reaches a traceback: every field, any JSON value, any text (lone surrogates
included) is either captured or a bad record naming file, line and reason."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from logitcache.cache.capture import capture
from logitcache.cache.capture_config import (
    DEFAULT_TARGETS,
    CaptureConfig,
    InputConfig,
    RunConfig,
    TargetConfig,
    TeacherConfig,
)
from logitcache.cache.errors import InputError
from logitcache.cache.prompts import read_prompts
from logitcache.cache.reader import open_dataset
from logitcache.cache.views import ViewRenderer
from logitcache.tools.tiny import CHAT_TEMPLATE

# Mistral-like: the template itself refuses roles out of order.
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Any text, lone surrogates (U+D800-U+DFFF, which JSON can escape) and control characters too.
text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), text)
role = st.one_of(st.sampled_from(["user", "assistant", "system"]), text, scalar)
message = st.one_of(
    st.fixed_dictionaries({"role": role, "content": st.one_of(text, scalar)}),
    st.dictionaries(text, scalar, max_size=2),
    scalar,
)
view = st.one_of(text, st.lists(message, max_size=3), scalar)
FIELDS = ("id", "prompt", "messages", "teacher", "student", "context", "response")
record = st.one_of(
    st.dictionaries(
        st.sampled_from(FIELDS),
        st.one_of(view, st.lists(message, min_size=1, max_size=3)),
        max_size=5,
    ),
    scalar,
    st.lists(scalar, max_size=2),
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(recs=st.lists(record, min_size=1, max_size=6), strict=st.booleans(), score=st.booleans())
def test_any_record_is_captured_or_a_named_bad_record(
    tok: Any, tmp_path: Path, recs: list[Any], strict: bool, score: bool
) -> None:
    path = tmp_path / "p.jsonl"
    # ensure_ascii writes lone surrogates as \udXXX escapes: valid JSON, invalid Unicode.
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    try:
        prompts = read_prompts([str(path)], require_response=score, on_error="skip")
    except InputError as e:
        assert "empty prompt set" in str(e)
        return
    tok.chat_template = STRICT_TEMPLATE if strict else CHAT_TEMPLATE
    rendered, bad = ViewRenderer(tok, "chat", None, "tok").render_all(
        [r for _, r in prompts.records]
    )
    assert len(rendered) + len(bad) + len(prompts.skipped) == len(recs)
    for _, s in prompts.skipped:
        assert s.line is not None and s.reason
        json.dumps(s.to_json()).encode("utf-8")  # the manifest can hold it
    for r, reason in bad:
        assert r.line is not None and reason
        reason.encode("utf-8")
    for ex in rendered:
        ex.id.encode("utf-8")


def test_a_lone_surrogate_is_skipped_and_the_rest_captured(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """The issue's record under --on-error skip: listed in extra.skipped, the rest captured."""
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"id": "ok", "prompt": "hello", "response": "yes"}\n'
        '{"id": "sur", "prompt": "bad \\ud800 half", "response": "ok"}\n'
    )
    cfg = CaptureConfig(
        input=InputConfig(prompts=(str(path),), on_error="skip"),
        teacher=TeacherConfig(path=str(tiny_teacher_dir)),
        run=RunConfig(out=str(tmp_path / "ds"), progress=False),
        targets=TargetConfig(spec=replace(DEFAULT_TARGETS, k=8, n=0)),
    )
    capture(cfg)
    ds = open_dataset(tmp_path / "ds", verify=True)
    assert [e.id for e in ds.iter_examples()] == ["ok"]
    (skipped,) = ds.manifest.extra["skipped"]
    assert skipped["file"].endswith("p.jsonl") and skipped["line"] == 2
    assert "prompt is not valid Unicode text" in skipped["reason"]


def test_context_files_that_cannot_be_a_context(tmp_path: Path) -> None:
    from logitcache.cache.views import Context

    (tmp_path / "dir").mkdir()
    (tmp_path / "blank.txt").write_text("   \n")
    (tmp_path / "deep.json").write_text("[" * 5000 + "]" * 5000)
    for name, match in (
        ("dir", r"is a folder; give one text or JSON file"),
        ("blank.txt", r"the file is empty \(or only whitespace\)"),
        ("deep.json", r"looks like JSON but is nested deeper than the JSON parser allows"),
    ):
        with pytest.raises(InputError, match=rf"--context .*{name}: {match}"):
            Context.load(str(tmp_path / name))


def test_a_rerun_with_other_files_does_not_capture_records_twice(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """Default ids name as much of the path as tells the files apart, so adding a file
    renames them: the rerun is refused instead of capturing en's records again."""
    for lang in ("en", "fr"):
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "train.jsonl").write_text(
            json.dumps({"prompt": f"hello {lang}", "response": "yes"}) + "\n"
        )

    def build(*files: str) -> None:
        capture(
            CaptureConfig(
                input=InputConfig(prompts=tuple(str(tmp_path / f) for f in files)),
                teacher=TeacherConfig(path=str(tiny_teacher_dir)),
                run=RunConfig(out=str(tmp_path / "ds"), progress=False),
                targets=TargetConfig(spec=replace(DEFAULT_TARGETS, k=8, n=0)),
            )
        )

    build("en/train.jsonl")
    with pytest.raises(
        InputError,
        match=r"already holds 'train\.jsonl:1'.*now it is 'en/train\.jsonl:1'.*"
        r"logitcache build --config .*capture_config\.json",
    ):
        build("en/train.jsonl", "fr/train.jsonl")
    build("en/train.jsonl")  # the original files still resume
    assert [e.id for e in open_dataset(tmp_path / "ds").iter_examples()] == ["train.jsonl:1"]
