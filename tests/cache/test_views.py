"""The tokenization rule at the prompt/response boundary, across tokenizer families.

The rule (docs/CAPTURE.md): a view's ids followed by the response ids are exactly the tokens the
tokenizer makes of that view's whole conversation, rendered as text in one piece. Each tokenizer
family below is built locally; the reference is rendered here with `apply_chat_template` over
the whole conversation, independently of cache/views.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from logitcache.cache import capture as capture_mod
from logitcache.cache.capture import capture
from logitcache.cache.capture_config import (
    CaptureConfig,
    InputConfig,
    RunConfig,
    TeacherConfig,
)
from logitcache.cache.errors import InputError
from logitcache.cache.prompts import read_prompts
from logitcache.cache.views import Context, ViewRenderer
from logitcache.tools.tiny import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, tiny_corpus

# Generation prompt ends in a special token, no newline: the response follows it directly.
TEMPLATE_NO_NEWLINE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Generation prompt ends in plain text with a space, as Llama-2's "[/INST] " does.
TEMPLATE_TEXT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ '[' + message['role'] + '] ' + message['content'] + ' [/' + message['role'] + ']' }}"
    "{% endif %}{% endfor %}"
)
TEMPLATES = {"newline": CHAT_TEMPLATE, "no-newline": TEMPLATE_NO_NEWLINE, "text": TEMPLATE_TEXT}

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _build(out: Path, family: str) -> Any:
    """A tokenizer of ``family`` trained on the tiny corpus, saved and reloaded with Auto."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    if family in ("bytelevel", "llama3"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = (
            pre_tokenizers.ByteLevel(add_prefix_space=False)
            if family == "bytelevel"
            else pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        )
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: Metaspace with a prepend scheme, byte fallback
        scheme = family.split("-")[1] if family.startswith("metaspace-") else "first"
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        # Trained split at spaces, used unsplit: like SentencePiece models, whose merges never
        # span a word boundary, as converted by transformers (Metaspace, split=False).
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme, split=True)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        specials = ["<unk>", *specials, *(f"<0x{i:02X}>" for i in range(256))]
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    if family.startswith("metaspace") or family == "llama":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme, split=False)
    common = dict(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if family == "llama":  # loaded by transformers as LlamaTokenizer, as Llama-2/Mistral are
        fast = LlamaTokenizerFast(**common, unk_token="<unk>", legacy=False)
    else:
        fast = PreTrainedTokenizerFast(**common, additional_special_tokens=list(ROLE_TOKENS))
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


FAMILIES = [
    "bytelevel",
    "llama3",
    "metaspace-first",
    "metaspace-always",
    "metaspace-never",
    "llama",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family_tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _build(tmp_path_factory.mktemp(request.param), request.param)


CHATS = {
    "one turn": [{"role": "user", "content": "hello"}],
    "multi-turn": [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Ahoy, matey."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
}
RESPONSES = ["yes. no", " yes. no", "\nyes. no", "Paris is the capital of France."]


def _whole(tok: Any, msgs: list[dict[str, str]], response: str) -> list[int]:
    """The tokens of the rendered conversation, through the assistant turn's end."""
    text = tok.apply_chat_template(
        [*msgs, {"role": "assistant", "content": response}], tokenize=False
    )
    return tok(text.rstrip(), add_special_tokens=False)["input_ids"]


def _render(tok: Any, recs: list[dict], tmp: Path, **kw: Any) -> tuple[list, list]:
    path = tmp / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ps = read_prompts([str(path)], require_response=True, on_error="skip")
    renderer = ViewRenderer(tok, kw.pop("render", "chat"), kw.pop("context", None), "tok")
    return renderer.render_all([r for _, r in ps.records])


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_chat_views_are_the_tokens_of_the_rendered_conversation(
    family_tok: Any, template: str, tmp_path: Path
) -> None:
    tok = family_tok
    tok.chat_template = TEMPLATES[template]
    system = "Answer like a pirate."
    recs, refs = [], {}
    for chat_name, msgs in CHATS.items():
        for j, response in enumerate(RESPONSES):
            rid = f"{chat_name}/{j}"
            recs.append({"id": rid, "messages": msgs, "response": response})
            refs[rid] = (msgs, response)
    context = Context("ctx.txt", system)
    rendered, bad = _render(tok, recs, tmp_path, context=context)
    assert bad == []
    assert len(rendered) == len(recs)
    for ex in rendered:
        msgs, response = refs[ex.id]
        student = [*ex.student_ids.tolist(), *ex.response_ids.tolist()]
        assert student == _whole(tok, msgs, response), ex.id
        teacher = [*ex.teacher_ids.tolist(), *ex.response_ids.tolist()]
        assert teacher == _whole(tok, [{"role": "system", "content": system}, *msgs], response)
        # The response ends with the end-of-turn token and never a between-turns newline.
        assert ex.response_ids[-1] == tok.eos_token_id


def test_sentencepiece_response_has_no_stray_space_marker(tmp_path: Path) -> None:
    """The issue's input: Metaspace 'first' prepends ▁ to a response tokenized on its own."""
    tok = _build(tmp_path / "tok", "llama")
    tok.chat_template = CHAT_TEMPLATE
    alone = tok.convert_ids_to_tokens(tok("yes. no", add_special_tokens=False)["input_ids"])
    assert alone[0].startswith("▁")  # the fault the old rule stored
    rendered, bad = _render(tok, [{"prompt": "hello", "response": "yes. no"}], tmp_path)
    assert bad == []
    first = tok.convert_ids_to_tokens(rendered[0].response_ids.tolist())[0]
    assert not first.startswith("▁"), first
    text = tok.decode([*rendered[0].student_ids, *rendered[0].response_ids])
    assert text.endswith("<|assistant|>\nyes. no</s>"), text


def test_plain_views_are_the_tokens_of_prompt_plus_response(
    family_tok: Any, tmp_path: Path
) -> None:
    tok = family_tok
    recs = [
        {"id": "a", "prompt": "Q: What is the capital of France?\nA:", "response": " Paris."},
        {"id": "b", "prompt": "Ahoy! The pirate said hello", "response": " to the crew."},
        {"id": "c", "prompt": "Bonjour,", "response": "\ncomment allez-vous?"},
    ]
    context = Context("ctx.txt", "Answer like a pirate.\n")
    rendered, bad = _render(tok, recs, tmp_path, render="plain", context=context)
    assert bad == []
    for ex, rec in zip(rendered, recs, strict=True):
        whole = tok(rec["prompt"] + rec["response"], add_special_tokens=True)["input_ids"]
        assert [*ex.student_ids.tolist(), *ex.response_ids.tolist()] == whole
        teacher = tok(context.value + rec["prompt"] + rec["response"], add_special_tokens=True)
        assert [*ex.teacher_ids.tolist(), *ex.response_ids.tolist()] == teacher["input_ids"]


def _merging_split(tok: Any) -> tuple[str, str]:
    """A plain prompt/response cut inside a word that the tokenizer keeps in one token."""
    for word in (" France", " capital", " pirate", " teacher", " the"):
        prompt, response = "Name the capital of" + word[:-2], word[-2:]
        alone = tok(prompt, add_special_tokens=True)["input_ids"]
        if tok(prompt + response, add_special_tokens=True)["input_ids"][: len(alone)] != alone:
            return prompt, response
    raise AssertionError("no word of the tiny corpus is one token")


def test_a_token_across_the_boundary_is_refused(family_tok: Any, tmp_path: Path) -> None:
    prompt, response = _merging_split(family_tok)
    recs = [{"id": "m", "prompt": prompt, "response": response}]
    rendered, bad = _render(family_tok, recs, tmp_path, render="plain")
    assert rendered == []
    assert "share a token across their boundary" in bad[0][1]
    assert "end the prompt with a newline, or start the response with a space" in bad[0][1]
    # The advice, followed literally either way, gives a record the build accepts.
    fixed = [
        {"id": "newline", "prompt": prompt + "\n", "response": response},
        {"id": "space", "prompt": prompt, "response": " " + response},
    ]
    rendered, bad = _render(family_tok, fixed, tmp_path, render="plain")
    assert bad == [] and [ex.id for ex in rendered] == ["newline", "space"]


def test_build_refuses_a_boundary_merge_before_the_teacher_loads(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_teacher(*a: Any, **k: Any) -> Any:
        raise AssertionError("the teacher was loaded before the records were checked")

    monkeypatch.setattr(capture_mod, "load_teacher", no_teacher)
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    prompt, response = _merging_split(tok)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "response": response}) + "\n")
    cfg = CaptureConfig(
        input=InputConfig(prompts=(str(path),), render="plain"),
        teacher=TeacherConfig(path=str(tiny_teacher_dir)),
        run=RunConfig(out=str(tmp_path / "ds"), progress=False),
    )
    with pytest.raises(InputError, match=r"p\.jsonl:1: the prompt and the response share a token"):
        capture(cfg)
    assert not (tmp_path / "ds").exists()


def test_a_tokenizer_that_appends_eos_is_named(tmp_path: Path) -> None:
    tok = _build(tmp_path / "tok", "llama")
    tok.add_eos_token = True
    if tok("hi", add_special_tokens=True)["input_ids"][-1] != tok.eos_token_id:
        pytest.skip("this transformers version ignores add_eos_token")
    rendered, bad = _render(
        tok, [{"prompt": "hello", "response": " yes"}], tmp_path, render="plain"
    )
    assert rendered == []
    assert "ends every text with the special token" in bad[0][1]
