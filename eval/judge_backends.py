"""The judges: an OpenAI-compatible chat endpoint, a local judge model, and the programmatic judge.

The two model judges turn JudgePrompts into judgment texts with `complete_many`, which yields
(index, judgment, error) as results arrive, so finished judgments are saved even if later ones fail.
The programmatic judge scores the synthetic demo task's answers directly and needs no prompt.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Iterator

from data_prep.synthetic import SKILL_BY_CATEGORY, score_answer
from eval.answer import generate_replies, prepare_for_generation
from eval.config import JudgeConfig
from eval.judge_prompts import UNPARSEABLE, JudgePrompt

JudgeResult = tuple[int, str | None, str | None]  # (index of the prompt, judgment text, error message)


class JudgeCallError(RuntimeError):
    """A judge request that failed for good (after retries, or a non-retryable error)."""


class RetryableError(RuntimeError):
    """A timeout, HTTP 429 or 5xx: worth asking again after a pause (the server's Retry-After, when it sent one)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds: either delay-seconds or an HTTP date (RFC 9110); None if absent or bad."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def chat_messages(prompt: JudgePrompt) -> list[dict[str, str]]:
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user}]


class OpenAICompatibleJudge:
    """Any server speaking OpenAI's chat completions API, called with the standard library only."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        # The key is read here and kept only in the request headers: never printed, logged or saved.
        api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        elif config.api_key_env:
            print(f"[eval] judge: environment variable {config.api_key_env} is not set; calling {self.url} without a key.")

    def complete(self, prompt: JudgePrompt) -> str:
        body = json.dumps({
            "model": self.config.model,
            "messages": chat_messages(prompt),
            "temperature": 0,
            "max_tokens": self.config.max_tokens,
        }).encode()
        attempt = 0
        while True:
            try:
                return self.post(body)
            except RetryableError as error:
                if attempt == self.config.max_retries:
                    raise JudgeCallError(f"gave up after {attempt + 1} attempts; last: {error}") from None
                backoff = self.config.backoff_seconds * 2**attempt
                time.sleep(backoff if error.retry_after is None else error.retry_after)
                attempt += 1

    def post(self, body: bytes) -> str:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_seconds) as response:
                reply = json.load(response)
        except urllib.error.HTTPError as error:
            if error.code == 429 or error.code >= 500:
                wait = retry_after_seconds(error.headers.get("Retry-After"))
                raise RetryableError(f"HTTP {error.code}", retry_after=wait) from None
            raise JudgeCallError(f"HTTP {error.code} from {self.url}") from None
        except (TimeoutError, ConnectionError, urllib.error.URLError) as error:
            raise RetryableError(f"{type(error).__name__}: {getattr(error, 'reason', error)}") from None
        except json.JSONDecodeError:
            raise JudgeCallError(f"{self.url} did not answer with JSON") from None
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeCallError(f"{self.url} answered without choices[0].message.content") from None

    def complete_many(self, prompts: list[JudgePrompt]) -> Iterator[JudgeResult]:
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            futures = {pool.submit(self.complete, prompt): index for index, prompt in enumerate(prompts)}
            for future in as_completed(futures):
                try:
                    yield futures[future], future.result(), None
                except JudgeCallError as error:
                    yield futures[future], None, str(error)


class LocalJudge:
    """A judge model run with transformers, given the same prompts; loaded only when there is work."""

    def __init__(self, load: Callable[[], tuple[Any, Any]], max_new_tokens: int, batch_size: int):
        self.load = load
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def complete_many(self, prompts: list[JudgePrompt]) -> Iterator[JudgeResult]:
        if not prompts:
            return
        model, tokenizer = self.load()
        prepare_for_generation(model, tokenizer)
        for start in range(0, len(prompts), self.batch_size):
            batch = [chat_messages(prompt) for prompt in prompts[start:start + self.batch_size]]
            for offset, judgment in enumerate(generate_replies(model, tokenizer, batch, self.max_new_tokens, 0.0)):
                yield start + offset, judgment, None


def programmatic_judgment(category: str, answer: str, reference: str | None) -> tuple[int, str]:
    """(score, explanation) for one answer of the synthetic task; -1 where there is nothing to check against."""
    if category not in SKILL_BY_CATEGORY or reference is None:
        return UNPARSEABLE, f"The programmatic judge cannot check a {category!r} answer without a reference."
    score = score_answer(category, answer, reference)
    return score, f"Reference: {reference}. Rating: [[{score}]]"
