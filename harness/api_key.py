"""The API key a vLLM server started with ``--api-key`` asks for: where the harness finds it, how
it sends it, and the one line a refusal becomes.

vLLM's OpenAI-compatible server started with ``--api-key KEY`` (or with ``VLLM_API_KEY`` in its
environment) answers ``401 Unauthorized`` to every ``/v1/...`` request that lacks the header
``Authorization: Bearer KEY``; ``/health``, ``/metrics``, ``/tokenize`` and ``/version`` stay open
(vLLM 0.32, ``vllm/entrypoints/serve/middleware/authenticate.py``). A reverse proxy in front of a
server may guard every path, so when a key is given every request of the harness carries it.

Where the key comes from, the first one set wins:

1. ``--api-key KEY``. Anyone on the same machine can read a command line (``ps``), so prefer
2. ``VLLM_API_KEY``: the variable vLLM's server itself reads as its key, so one ``export`` serves
   the server and its clients alike, and it names this purpose only;
3. ``OPENAI_API_KEY``: what the ``openai`` SDK reads, so a setup made for other OpenAI-compatible
   clients works unchanged. It often holds a key for OpenAI itself, which then goes to the server
   named by the URL: set ``VLLM_API_KEY`` to send that server its own key instead.

The key is never printed, logged or written to a result: ``ApiKey`` hides it from ``repr``, and
an error names where the key came from, never the key.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from harness.errors import UserError

API_KEY_FLAG = "--api-key"
API_KEY_ENV = ("VLLM_API_KEY", "OPENAI_API_KEY")  # in the order they are read
# What the openai client sends when no key is given: it insists on one, a server without a key
# ignores it.
NO_KEY_SENT = "EMPTY"
# The answers that mean "not with this key": vLLM's 401, and the 403 some proxies give instead.
REFUSED_STATUSES = (401, 403)


@dataclass(frozen=True)
class ApiKey:
    """A key to send (``value``) and where it was found (``source``), or no key at all."""

    value: str | None = field(default=None, repr=False)
    source: str | None = None  # "--api-key", "VLLM_API_KEY", "OPENAI_API_KEY", ...; None: no key

    @property
    def client_key(self) -> str:
        """The ``api_key`` argument of an ``openai`` client."""
        return self.value or NO_KEY_SENT

    def headers(self) -> dict[str, str]:
        """The header of a raw HTTP request: the key as a Bearer token, nothing without a key."""
        return {"Authorization": f"Bearer {self.value}"} if self.value else {}

    def refused(self, server: str, status: int) -> UserError:
        """The one line for a server that answered ``status`` (401 or 403) to this key."""
        try:
            answer = f"{status} {HTTPStatus(status).phrase}"
        except ValueError:
            answer = f"HTTP {status}"
        if self.value is None:
            return UserError(
                f"{server} asks for an API key ({answer}) and none was given: set VLLM_API_KEY "
                f"(or pass {API_KEY_FLAG})"
            )
        return UserError(
            f"{server} refused the API key from {self.source} ({answer}): give the server's key in "
            f"VLLM_API_KEY (or {API_KEY_FLAG})"
        )


NO_API_KEY = ApiKey()


def api_key_from(flag: str | None, environ: Mapping[str, str] | None = None) -> ApiKey:
    """The key of ``--api-key`` (``flag``), else of the first variable of ``API_KEY_ENV`` set to
    something not empty, else no key."""
    if flag is not None:
        if not flag.strip():
            raise UserError(f"{API_KEY_FLAG} is empty: give the server's key (or leave the flag out)")
        return ApiKey(flag.strip(), API_KEY_FLAG)
    env = os.environ if environ is None else environ
    for name in API_KEY_ENV:
        value = env.get(name, "").strip()
        if value:
            return ApiKey(value, name)
    return NO_API_KEY


def add_api_key_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, servers: str) -> None:
    """The ``--api-key`` flag, its help naming the variables and the ``ps`` caveat.

    ``servers``: what the key is for, e.g. "the --endpoint server"."""
    parser.add_argument(
        API_KEY_FLAG,
        metavar="KEY",
        help=f"the API key of {servers} when it was started with --api-key (sent as 'Authorization: "
        f"Bearer KEY'). Default: $VLLM_API_KEY, else $OPENAI_API_KEY. A key on the command line is "
        f"visible to other users of this machine (ps): prefer export VLLM_API_KEY=...",
    )
