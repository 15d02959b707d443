"""A small OpenAI-compatible completions server over a Hugging Face model, for tests.

It answers the requests a served teacher sends (``/v1/models``, ``/tokenize``, ``/detokenize``,
``/v1/completions`` with ``prompt_logprobs`` or ``logprobs``) in vLLM's response shapes, with
log-probs computed by the model in fp32, and it can be told to fail: answer 503, or drop the
connection without an answer, for the next requests. Runs in a thread on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeTeacherServer:
    """``with FakeTeacherServer(model_dir) as s: s.url`` — a served teacher on loopback.

    ``tokenizer_dir``: the tokenizer it tokenizes and detokenizes with (default: the model's).
    ``max_logprobs``: a request asking for more gets HTTP 400, as vLLM answers.
    ``fail``: a list of "503" / "drop" consumed one per completions request (then healthy).
    ``dead``: while True every completions request gets 503.
    """

    def __init__(
        self, model_dir: str, tokenizer_dir: str | None = None, max_logprobs: int = 64
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        self.max_logprobs = max_logprobs
        self.fail: list[str] = []
        self.dead = False
        self.bodies: list[dict[str, Any]] = []
        """Every completions request body received."""
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ model

    def _logp(self, ids: list[int]) -> Any:
        import torch

        with torch.no_grad(), self.lock:
            logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, -1)  # (T, V)

    def _top(self, row: Any, k: int, chosen: int | None) -> dict[int, tuple[float, int]]:
        vals, idx = row.topk(k)
        out = {int(i): (float(v), r + 1) for r, (v, i) in enumerate(zip(vals, idx, strict=True))}
        if chosen is not None and chosen not in out:  # vLLM adds the actual token
            out[chosen] = (float(row[chosen]), int((row > row[chosen]).sum()) + 1)
        return out

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = [int(i) for i in body["prompt"]]
        choice: dict[str, Any] = {"index": 0, "text": "", "finish_reason": "length"}
        pk = body.get("prompt_logprobs")
        if pk:
            logp = self._logp(ids)
            choice["prompt_logprobs"] = [None] + [
                {
                    str(t): {"logprob": lp, "rank": r}
                    for t, (lp, r) in self._top(logp[p - 1], pk, ids[p]).items()
                }
                for p in range(1, len(ids))
            ]
        k = body.get("logprobs")
        stop = set(body.get("stop_token_ids") or [])
        new: list[int] = []
        tops = []
        for _ in range(int(body.get("max_tokens", 16))):
            row = self._logp(ids + new)[-1]
            nxt = int(row.argmax())  # greedy: the tests' generation
            new.append(nxt)
            if k:
                tops.append({f"token_id:{t}": lp for t, (lp, _) in self._top(row, k, nxt).items()})
            if nxt in stop:
                choice["finish_reason"] = "stop"
                break
        if body.get("return_token_ids"):
            choice["token_ids"] = new
        if k:
            choice["logprobs"] = {
                "tokens": [f"token_id:{t}" for t in new],
                "token_logprobs": [t[f"token_id:{i}"] for t, i in zip(tops, new, strict=True)],
                "top_logprobs": tops,
                "text_offset": [0] * len(new),
            }
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": "fake",
            "choices": [choice],
        }

    # ------------------------------------------------------------------ http

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"data": [{"id": "fake-teacher", "max_model_len": 2048}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                tok = server.tok
                if self.path == "/tokenize":
                    ids = tok(
                        body["prompt"], add_special_tokens=body.get("add_special_tokens", True)
                    )["input_ids"]
                    strs = tok.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
                    self._send(
                        200,
                        {
                            "count": len(ids),
                            "max_model_len": 2048,
                            "tokens": ids,
                            "token_strs": strs,
                        },
                    )
                    return
                if self.path == "/detokenize":
                    self._send(200, {"prompt": tok.decode(body["tokens"])})
                    return
                if self.path != "/v1/completions":
                    self._send(404, {"error": "not found"})
                    return
                server.bodies.append(body)
                with server.lock:
                    action = server.fail.pop(0) if server.fail else ("503" if server.dead else "")
                if action == "503":
                    self._send(503, {"error": "overloaded"})
                    return
                if action == "drop":  # the connection dies before any answer
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                asked = max(body.get("logprobs") or 0, body.get("prompt_logprobs") or 0)
                if asked > server.max_logprobs:
                    self._send(
                        400,
                        {
                            "error": {
                                "message": f"Requested sample logprobs of {asked}, which is greater than max allowed: {server.max_logprobs}"
                            }
                        },
                    )
                    return
                self._send(200, server.completion(body))

        return Handler

    def start(self) -> FakeTeacherServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeTeacherServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
