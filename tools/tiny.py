"""Tiny tokenizer and random models for tests and benchmarks, built locally in about a second.

Tests must never download a model, yet they need the real code paths: `AutoTokenizer` and
`AutoModelForCausalLM.from_pretrained(folder)`, `apply_chat_template`, safetensors on disk. So we
train a byte-level BPE on a built-in corpus and save random Llama/Qwen2 models next to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

Arch = Literal["llama", "qwen2"]

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# ChatML-like, in the shape of SmolLM2's template: role marker, newline, content, eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SUBJECTS = ["the cat", "a teacher", "my friend", "the model", "every student", "our ship"]
_VERBS = ["reads", "writes", "learns", "answers", "explains", "sails to"]
_OBJECTS = ["a short story", "the capital of France", "simple maths", "the weather", "a poem"]
_EXTRA = [
    "What is the capital of France? Paris is the capital of France.",
    "Ahoy! The pirate said hello to the crew, matey.",
    "Bonjour, comment allez-vous? Je vais bien, merci.",
    "Please explain how rain forms, in two sentences.",
    "1 + 1 = 2, 2 * 3 = 6, 10 / 5 = 2.",
    "def add(a, b):\n    return a + b\n",
]


def tiny_corpus() -> list[str]:
    """A fixed, small corpus: deterministic so the tokenizer is identical on every machine."""
    lines = [f"{s} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS]
    return lines + _EXTRA


def make_tiny_tokenizer(out_dir: str | Path, *, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (`vocab_size` >= 262) with bos/eos/pad, role tokens and a chat template.

    Byte level so that any text, including non-English prompts, encodes and decodes losslessly.
    Saved to `out_dir`, loadable with `AutoTokenizer.from_pretrained(out_dir)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    min_size = 256 + len(specials)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {min_size} "
            f"(256 bytes + {len(specials)} special tokens); pass vocab_size >= {min_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def make_tiny_model(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    arch: Arch = "llama",
    init_std: float = 0.2,
    tie_embeddings: bool = True,
    max_positions: int = 2048,
) -> Path:
    """Save a random causal LM plus `tokenizer` into `out_dir`; returns `out_dir`.

    Weights depend only on the arguments (`seed` included), not on the global RNG, which is left
    untouched. `init_std` is ten times HF's 0.02 so next-token distributions are peaked (entropy
    ~4 of ln(384) = 5.95 nats at hidden 64) rather than near uniform, as top-k tests need. Grouped-query attention and tied embeddings by default, as in SmolLM2.
    `tokenizer` is a tokenizer object or a folder holding one.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, Qwen2Config

    problems = []
    if arch not in ("llama", "qwen2"):
        problems.append(f"arch={arch!r} is not supported: use 'llama' or 'qwen2'")
    if hidden % heads:
        problems.append(f"hidden={hidden} is not divisible by heads={heads}")
    if heads % kv_heads:
        problems.append(f"heads={heads} is not divisible by kv_heads={kv_heads}")
    if problems:
        raise ValueError("; ".join(problems))

    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)

    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_playground(out_dir: str | Path) -> Path:
    """A folder to try every command in seconds, without a model download: ``teacher/`` (random
    2-layer Llama, hidden 64), ``student/`` (hidden 32, same tokenizer), ``prompts.jsonl`` (41
    prompts from the tiny corpus) and ``context.txt`` (a system prompt only the teacher sees)."""
    import json

    out = Path(out_dir)
    tok = make_tiny_tokenizer(out / "tokenizer")
    make_tiny_model(out / "teacher", tok, layers=2, hidden=64, seed=0)
    make_tiny_model(out / "student", tok, layers=2, hidden=32, seed=1)
    lines = [f"{s} {v}" for s in _SUBJECTS for v in _VERBS] + [
        f"Tell me about {o}." for o in _OBJECTS
    ]
    records = [{"id": f"q{i}", "prompt": text} for i, text in enumerate(lines)]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "context.txt").write_text("Answer like a pirate, starting with 'Ahoy!'.\n")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m logitcache.tools.tiny",
        description=make_playground.__doc__.split("\n\n")[0].replace("\n   ", ""),
    )
    p.add_argument("out", help="folder to create (e.g. play/)")
    out = make_playground(p.parse_args(argv).out)
    print(
        f"made {out}/teacher, {out}/student, {out}/prompts.jsonl and {out}/context.txt; try:\n"
        f"  logitcache build --teacher {out}/teacher --context {out}/context.txt "
        f"--prompts {out}/prompts.jsonl --mode generate --max-new-tokens 16 --out {out}/logits\n"
        f"  logitcache inspect {out}/logits\n"
        f"  logitcache train --data.train {out}/logits --model.path {out}/student "
        f"--train.output {out}/run --train.steps 20\n"
        f"  logitcache eval --student {out}/student --student {out}/run/final "
        f"--data {out}/logits --out {out}/report"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
