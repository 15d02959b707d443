"""The tiny tokenizer and models load offline through the Auto classes and round-trip exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.tools.tiny import CHAT_TEMPLATE, make_tiny_model, make_tiny_tokenizer

MESSAGES = [
    {"role": "system", "content": "Answer like a pirate."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_tokenizer_loads_with_special_tokens(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert 263 <= len(tok) <= 500
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.chat_template == CHAT_TEMPLATE


def test_tokenizer_round_trips_any_text(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = "Ahoy! Café, naïve 東京 ☃ 1+1=2\n\tdef f(x): return x"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_chat_template_renders(tiny_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nAnswer like a pirate.</s>\n"
        "<|user|>\nWhat is the capital of France?</s>\n"
        "<|assistant|>\n"
    )
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    # Role markers are single special tokens, so a context/prompt boundary falls on a token edge.
    assert ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1
    assert ids[0] == tok.bos_token_id


def test_tokenizer_is_deterministic(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    again = make_tiny_tokenizer(tmp_path)
    first = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert again.get_vocab() == first.get_vocab()


def test_tokenizer_rejects_small_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small.*vocab_size >= 262"):
        make_tiny_tokenizer(tmp_path, vocab_size=100)


@pytest.mark.parametrize(
    ("fixture", "hidden"), [("tiny_teacher_dir", 64), ("tiny_student_dir", 32)]
)
def test_models_load_and_share_the_tokenizer(
    fixture: str, hidden: int, tiny_tokenizer_dir: Path, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(fixture)
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.hidden_size == hidden
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_tokenizer_dir).get_vocab()

    batch = tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    prompt_len = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=4)
    assert prompt_len < out.shape[1] <= prompt_len + 4


def test_teacher_is_peaked_not_uniform(tiny_teacher_dir: Path) -> None:
    # Top-k tests need a distribution whose top-k mass differs clearly from k / V.
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)  # (1, T, V)
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    assert entropy < 0.85 * torch.log(torch.tensor(float(logp.shape[-1]))).item()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_load_round_trip_is_exact(tmp_path: Path, tiny_tokenizer_dir: Path, arch: str) -> None:
    a = make_tiny_model(tmp_path / "a", tiny_tokenizer_dir, hidden=32, seed=7, arch=arch)
    b = make_tiny_model(tmp_path / "b", tiny_tokenizer_dir, hidden=32, seed=7, arch=arch)
    c = make_tiny_model(tmp_path / "c", tiny_tokenizer_dir, hidden=32, seed=8, arch=arch)
    ma, mb, mc = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b, c))
    assert ma.config.model_type == arch
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        la, lb, lc = (m(ids).logits for m in (ma, mb, mc))
    assert torch.equal(la, lb)  # same seed, same bits, through safetensors
    assert not torch.equal(la, lc)

    ma.save_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")(ids).logits
    assert torch.equal(la, again)


def test_model_leaves_global_rng_alone(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path, tiny_tokenizer_dir, hidden=32)
    assert torch.equal(torch.rand(3), expected)


def test_model_rejects_bad_shapes_all_at_once(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"arch='gpt2' is not supported.*hidden=30 is not divisible by heads=4",
    ):
        make_tiny_model(tmp_path, tiny_tokenizer_dir, hidden=30, arch="gpt2")  # type: ignore[arg-type]


def test_playground_commands_work_as_printed(tmp_path: Path, monkeypatch, capsys) -> None:
    """`python -m logitcache.tools.tiny DIR` prints four commands; each runs as printed."""
    import shlex

    from logitcache.tools.cli import main as cli
    from logitcache.tools.tiny import main

    monkeypatch.chdir(tmp_path)
    assert main(["play"]) == 0
    printed = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in printed if line.startswith("  logitcache ")]
    assert [c[1] for c in commands] == ["build", "inspect", "train", "eval"]
    for argv in commands:
        assert cli(argv[1:]) == 0, argv
    out = capsys.readouterr().out
    assert "captured 41 examples" in out and "done: 20 steps" in out
    assert (tmp_path / "play" / "report" / "report.md").exists()
