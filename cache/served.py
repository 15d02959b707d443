"""A served teacher (``--teacher-url``): capture from an OpenAI-compatible completions server.

For teachers only a cluster can hold. The server (vLLM's ``vllm.entrypoints.openai.api_server``,
SGLang) runs the model; we send it token ids and read back top-k log-probs by token id:

- score mode: ``/v1/completions`` with ``prompt`` = teacher view + response ids,
  ``prompt_logprobs`` = k and ``max_tokens`` = 1; position j of the response is the server's
  prompt log-probs at index len(teacher view) + j (the distribution of that token given the ones
  before it), whose keys are token ids;
- generate mode: ``prompt`` = teacher view ids, ``logprobs`` = k with
  ``return_tokens_as_token_ids`` (keys ``token_id:<id>``, never strings, which collide) and
  ``return_token_ids`` (the response's ids), a per-request ``seed`` from the example id, and the
  teacher's end-of-sequence ids as ``stop_token_ids``.

The tokenization is ours: the server sees only ids. Before any work the server's tokenizer is
checked against the local one (:func:`check_tokenizer`): the same ids and token strings for a
fixed probe of texts and the same strings for ids spread over the vocabulary, compared as one
sha256 fingerprint of the answers, the first difference named on a mismatch.

A batch's requests are all in flight at once (up to ``--max-in-flight``, asyncio + httpx); each
is retried with exponential backoff on connection errors, timeouts, 429 and 5xx (tenacity). A
batch's results reach the dataset writer only when every request of it has answered, so a
dropped connection or a dead server loses nothing committed and commits nothing twice: the rerun
resumes after the last committed shard, like any crashed capture.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .capture_config import CaptureConfig, GenerateConfig
from .errors import IncompatibleError, InputError, LogitCacheError
from .external import ExternalTeacher, TopRow, folder_vocab_context, pad_id
from .teacher import teacher_identity

log = logging.getLogger(__name__)

PROBE_TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  \n\ttabs\r\nand newlines\n\n",
    "Zahlen 0123456789 3.14159 -42 1e-9 1,000,000",
    "Ünïcödé: café naïve façade, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, emoji 🙂🚀",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
)
"""Texts whose ids and token strings the server and the local tokenizer must agree on."""
_PROBE_IDS = 64
"""Ids spread over the vocabulary whose strings must agree."""


class ServerError(LogitCacheError):
    """The teacher server refused a request or stopped answering."""


def _fix_resume(url: str) -> str:
    return (
        f"what is committed is kept: once the server at {url} answers again, rerun the same "
        "command to resume"
    )


class ServedTeacher(ExternalTeacher):
    """A teacher behind an OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang)."""

    def __init__(self, cfg: CaptureConfig, tokenizer: Any, eos_ids: list[int]):
        try:
            import httpx  # noqa: F401
            import tenacity  # noqa: F401
        except ModuleNotFoundError as e:
            raise InputError(
                f"--teacher-url needs {e.name}: pip install 'logitcache[served]'"
            ) from None
        t = cfg.teacher
        assert t.url is not None
        vocab, context = folder_vocab_context(t.path)
        self.url = t.url.rstrip("/")
        self.max_in_flight = t.max_in_flight
        self.timeout = t.request_timeout
        self.retries = t.request_retries
        self._loop = asyncio.new_event_loop()
        self._client: Any = None
        self.requests = 0
        """Requests sent, retries included (for the tests and the benchmark)."""
        models = self._run(self._get("/v1/models"))
        served = [m.get("id") for m in models.get("data", [])]
        if not served:
            raise ServerError(f"--teacher-url {self.url}: /v1/models lists no model")
        self.model = served[0]
        server_len = models["data"][0].get("max_model_len")
        # The url is where it ran, not what it is: kept out of what a resume must match.
        identity = {**teacher_identity(t.path), "name_or_path": f"served:{self.model}"}
        super().__init__(
            tokenizer=tokenizer,
            vocab_size=vocab,
            identity=identity,
            pad_id=pad_id(tokenizer, eos_ids),
            eos_ids=eos_ids,
            context_size=int(server_len) if server_len else context,
            dtype="served",
            where=f"--teacher-url {self.url}",
            engine={"name": "served", "api": "openai /v1/completions", "model": self.model},
        )
        self.fingerprint = check_tokenizer(self, tokenizer)

    # ------------------------------------------------------------------ transport

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def _http(self) -> Any:
        import httpx

        if self._client is None:
            limits = httpx.Limits(max_connections=self.max_in_flight)
            self._client = httpx.AsyncClient(
                base_url=self.url, timeout=httpx.Timeout(self.timeout), limits=limits
            )
        return self._client

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request, retried with exponential backoff on transient failures."""
        import httpx
        from tenacity import (
            AsyncRetrying,
            retry_if_exception,
            stop_after_attempt,
            wait_random_exponential,
        )

        def transient(e: BaseException) -> bool:
            if isinstance(e, httpx.HTTPStatusError):
                return e.response.status_code == 429 or e.response.status_code >= 500
            return isinstance(e, httpx.TransportError)  # connect/read errors, timeouts, drops

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_random_exponential(multiplier=0.2, max=30.0),
            retry=retry_if_exception(transient),
            reraise=True,
            before_sleep=lambda s: log.warning(
                "%s %s failed (%s); retry %d of %d",
                method,
                path,
                s.outcome.exception() if s.outcome else "?",
                s.attempt_number,
                self.retries,
            ),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    self.requests += 1
                    r = await self._http().request(method, path, json=body)
                    if r.status_code >= 400:
                        if r.status_code == 429 or r.status_code >= 500:
                            r.raise_for_status()
                        raise ServerError(
                            f"--teacher-url {self.url}{path} refused the request: HTTP "
                            f"{r.status_code}: {r.text[:500]}" + _hint(r.text)
                        )
                    return _loads(r.content)
        except httpx.HTTPError as e:
            raise ServerError(
                f"--teacher-url {self.url}{path}: no answer after {self.retries + 1} tries "
                f"(last: {type(e).__name__}: {e}); {_fix_resume(self.url)}"
            ) from None

    async def _get(self, path: str) -> Any:
        return await self._call("GET", path)

    async def _many(self, bodies: list[dict[str, Any]], path: str = "/v1/completions") -> list:
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(body: dict[str, Any]) -> Any:
            async with gate:
                return await self._call("POST", path, body)

        return await asyncio.gather(*(one(b) for b in bodies))

    def post_many(self, bodies: list[dict[str, Any]], path: str = "/v1/completions") -> list:
        """POST every body with up to ``max_in_flight`` in flight; the answers in order."""
        return self._run(self._many(bodies, path))

    def close(self) -> None:
        if self._client is not None:
            self._run(self._client.aclose())
            self._client = None
        self._loop.close()

    # ------------------------------------------------------------------ capture

    def prompt_rows(self, prompts: list[list[int]], k: int) -> list[Sequence[TopRow]]:
        bodies = [
            {
                "model": self.model,
                "prompt": p,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": k,
                "add_special_tokens": False,
            }
            for p in prompts
        ]
        out = []
        for p, a in zip(prompts, self.post_many(bodies), strict=True):
            rows = _choice(a, self.url).get("prompt_logprobs")
            if not isinstance(rows, list) or len(rows) < len(p):
                raise ServerError(
                    f"--teacher-url {self.url}: an answer without prompt_logprobs for its "
                    f"{len(p)} prompt ids; the server must support prompt_logprobs (vLLM)"
                )
            out.append([_id_row(r, self.url) if r else {} for r in rows])
        return out

    def generation_bodies(
        self, prompts: list[list[int]], k: int, gen: GenerateConfig, ex_keys: np.ndarray
    ) -> list[dict[str, Any]]:
        """The ``/v1/completions`` request of each prompt in generate mode."""
        return [
            {
                "model": self.model,
                "prompt": p,
                "max_tokens": gen.max_new_tokens,
                "temperature": gen.temperature,
                "top_p": gen.top_p,
                "seed": int(key),
                "logprobs": k,
                "return_tokens_as_token_ids": True,
                "return_token_ids": True,
                "stop_token_ids": list(self.eos_ids),
                "ignore_eos": not self.eos_ids,  # no end ids: like the HF engine, never stop
                "skip_special_tokens": False,
                "add_special_tokens": False,
            }
            for p, key in zip(prompts, ex_keys, strict=True)
        ]

    def generations(
        self, prompts: list[list[int]], k: int, gen: GenerateConfig, ex_keys: np.ndarray
    ) -> list[tuple[list[int], Sequence[TopRow]]]:
        out = []
        for a in self.post_many(self.generation_bodies(prompts, k, gen, ex_keys)):
            choice = _choice(a, self.url)
            lp = choice.get("logprobs") or {}
            ids = choice.get("token_ids")
            if ids is None:  # servers without return_token_ids: the ids of the token strings
                ids = [_token_id(s, self.url) for s in lp.get("tokens") or []]
            tops = lp.get("top_logprobs") or []
            rows = [_token_row(t, self.url) for t in tops]
            out.append(([int(i) for i in ids], rows))
        return out


def _loads(content: bytes) -> Any:
    """JSON → Python: orjson where installed (the ``served`` extra; ~1.5x faster on the
    log-prob answers), else the standard library."""
    try:
        import orjson
    except ModuleNotFoundError:
        return json.loads(content)
    return orjson.loads(content)


def _hint(text: str) -> str:
    if "logprobs" in text and ("max" in text or "exceed" in text):
        return (
            "; the server caps the log-probs per position: start it with --max-logprobs at least "
            "--k, or lower --k"
        )
    return ""


def _choice(answer: Any, url: str) -> dict[str, Any]:
    try:
        return answer["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise ServerError(
            f"--teacher-url {url}: an answer without choices: {json.dumps(answer)[:300]}"
        ) from None


def _token_id(s: str, url: str) -> int:
    """``token_id:123`` (vLLM's return_tokens_as_token_ids) → 123."""
    if isinstance(s, str) and s.startswith("token_id:"):
        return int(s[9:])
    raise ServerError(
        f"--teacher-url {url}: log-probs keyed by the string {s!r} rather than a token id; the "
        "server must honour return_tokens_as_token_ids (vLLM ≥ 0.6)"
    )


def _token_row(row: dict[str, float], url: str) -> TopRow:
    """One generation step's ``{"token_id:<id>": log-prob}`` → {id: log-prob}."""
    out = {int(s[9:]): v for s, v in row.items() if s.startswith("token_id:")}
    if len(out) != len(row):  # a key that is not an id: name it
        for s in row:
            _token_id(s, url)
    return out


def _id_row(row: Any, url: str) -> TopRow:
    """One prompt position's ``{"<id>": {"logprob": ..., "rank": ...}}`` → {id: log-prob}."""
    if not isinstance(row, dict):
        raise ServerError(f"--teacher-url {url}: a prompt position without log-probs: {row!r}")
    out = {}
    for key, v in row.items():
        key = str(key)
        out[int(key[9:]) if key.startswith("token_id:") else int(key)] = float(
            v["logprob"] if isinstance(v, dict) else v
        )
    return out


# --------------------------------------------------------------------------- tokenizer check


def local_probe(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """What the local tokenizer says to the probe: ids and token strings of each probe text,
    and the strings of ids spread over the vocabulary."""
    texts = []
    for text in PROBE_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        texts.append({"ids": ids, "strs": tokenizer.convert_ids_to_tokens(ids)})
    spread = probe_ids(tokenizer, vocab_size)
    return {"texts": texts, "decoded": [tokenizer.decode([i]) for i in spread]}


def probe_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """Ids spread evenly over the tokenizer's vocabulary, the last one included, special ids
    left out (servers may skip them when decoding)."""
    n = min(vocab_size, len(tokenizer))
    special = set(tokenizer.all_special_ids)
    return sorted({int(i) for i in np.linspace(0, n - 1, _PROBE_IDS)} - special)


def probe_fingerprint(probe: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(probe, ensure_ascii=False).encode()).hexdigest()


def check_tokenizer(server: ServedTeacher, tokenizer: Any) -> str:
    """Refuse a server whose tokenizer differs from the local one; returns the fingerprint.

    The server tokenizes the probe texts (``/tokenize``, with token strings) and decodes ids
    spread over the vocabulary (``/detokenize``); both answers must equal the local tokenizer's.
    Raises IncompatibleError naming the first difference."""
    mine = local_probe(tokenizer, server.vocab_size)
    bodies = [
        {"model": server.model, "prompt": t, "add_special_tokens": False, "return_token_strs": True}
        for t in PROBE_TEXTS
    ]
    spread = probe_ids(tokenizer, server.vocab_size)
    tok = server.post_many(bodies, "/tokenize")
    dec = server.post_many([{"model": server.model, "tokens": [i]} for i in spread], "/detokenize")
    theirs = {
        "texts": [{"ids": a["tokens"], "strs": a.get("token_strs")} for a in tok],
        "decoded": [a["prompt"] for a in dec],
    }
    for text, m, s in zip(PROBE_TEXTS, mine["texts"], theirs["texts"], strict=True):
        if s["strs"] is None:  # a server that gives ids only: compare those
            s["strs"] = m["strs"]
        if m != s:
            raise IncompatibleError(
                f"--teacher-url {server.url} tokenizes differently from the local tokenizer "
                f"(--tokenizer/--teacher): {text!r} is {m['ids'][:16]} here and {s['ids'][:16]} "
                "on the server; serve the same tokenizer, or point --teacher at the served "
                "model's folder"
            )
    for i, m, s in zip(spread, mine["decoded"], theirs["decoded"], strict=True):
        if m != s:
            raise IncompatibleError(
                f"--teacher-url {server.url} decodes id {i} as {s!r}, the local tokenizer as "
                f"{m!r}: another vocabulary; serve the same tokenizer, or point --teacher at the "
                "served model's folder"
            )
    return probe_fingerprint(theirs)
