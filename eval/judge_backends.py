"""The judges: an OpenAI-compatible chat endpoint, a local judge model, and the programmatic judge.

The two model judges turn JudgePrompts into judgment texts with `complete_many`, which yields
(index, judgment, error) as results arrive, so finished judgments are saved even if later ones fail.
The programmatic judge scores the synthetic demo task's answers directly and needs no prompt.

An endpoint that refuses connections or whose name does not resolve is down, not busy: it is tried a few times
and then the whole judging stops with an error naming the URL, instead of every call being retried like a 503.
"""

from __future__ import annotations

import email.utils
import errno
import json
import os
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

from finetune.core.synthetic_task import SKILL_BY_CATEGORY, score_answer
from eval.answer import generate_replies, prepare_for_generation
from finetune.config.evaluation import JudgeConfig
from eval.judge_prompts import UNPARSEABLE, JudgePrompt

JudgeResult = tuple[int, str | None, str | None]  # (index of the prompt, judgment text, error message)


class JudgeCallError(RuntimeError):
    """A judge request that failed for good (after retries, or a non-retryable error)."""


class JudgeUnreachable(RuntimeError):
    """The judge endpoint cannot be reached at all (connection refused, unknown host): judging stops."""


class Unreachable(RuntimeError):
    """One attempt found the endpoint unreachable; tried again UNREACHABLE_TRIES times at most."""


UNREACHABLE_TRIES = 3
UNREACHABLE_PAUSE_SECONDS = 1.0
# Socket errors that mean nothing listens at the address (or the name does not resolve): waiting does not help.
UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}


def is_unreachable(reason: Any) -> bool:
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror)) or (
        isinstance(reason, OSError) and reason.errno in UNREACHABLE_ERRNOS)


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

    def complete(self, prompt: JudgePrompt, stop: threading.Event | None = None) -> str:
        """One judgment, retried on timeouts, 429 and 5xx; waits end early once `stop` is set (Ctrl-C)."""
        stop = stop or threading.Event()
        body = json.dumps({
            "model": self.config.model,
            "messages": chat_messages(prompt),
            "temperature": 0,
            "max_tokens": self.config.max_tokens,
        }).encode()
        attempt = unreachable = 0
        while True:
            try:
                return self.post(body)
            except Unreachable as error:
                unreachable += 1
                if unreachable == UNREACHABLE_TRIES:
                    raise JudgeUnreachable(
                        f"cannot reach the judge at {self.url} ({error}; {unreachable} tries). Start the judge "
                        f"server, or fix eval.judge.base_url.") from None
                pause = UNREACHABLE_PAUSE_SECONDS
            except RetryableError as error:
                if attempt == self.config.max_retries:
                    raise JudgeCallError(f"gave up after {attempt + 1} attempts; last: {error}") from None
                backoff = self.config.backoff_seconds * 2**attempt
                pause = backoff if error.retry_after is None else error.retry_after
                attempt += 1
            if stop.wait(pause):
                raise JudgeCallError("stopped before the judge answered")

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
        except urllib.error.URLError as error:
            if is_unreachable(error.reason):
                raise Unreachable(str(error.reason)) from None
            raise RetryableError(f"{type(error).__name__}: {error.reason}") from None
        except (TimeoutError, ConnectionError) as error:
            raise RetryableError(f"{type(error).__name__}: {getattr(error, 'reason', error)}") from None
        except json.JSONDecodeError:
            raise JudgeCallError(f"{self.url} did not answer with JSON") from None
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeCallError(f"{self.url} answered without choices[0].message.content") from None

    def complete_many(self, prompts: list[JudgePrompt]) -> Iterator[JudgeResult]:
        """Judgments as they arrive, `max_concurrency` requests at a time. The requests run on daemon threads: when
        the caller stops (Ctrl-C, or JudgeUnreachable raised here) queued prompts are dropped at once and a
        request still in flight does not hold up the exit."""
        pending: queue.SimpleQueue = queue.SimpleQueue()
        for item in enumerate(prompts):
            pending.put(item)
        results: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                try:
                    index, prompt = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.put((index, self.complete(prompt, stop), None))
                except JudgeCallError as error:
                    results.put((index, None, error))
                except JudgeUnreachable as error:
                    results.put((index, None, error))  # first, so the caller sees it before any call it stops
                    stop.set()  # no more requests to a server that is not there

        for _ in range(min(self.config.max_concurrency, len(prompts))):
            threading.Thread(target=work, daemon=True, name="moetune-judge").start()
        try:
            for _ in prompts:
                index, judgment, error = next_result(results)
                if isinstance(error, JudgeUnreachable):
                    raise error
                yield index, judgment, None if error is None else str(error)
        finally:
            stop.set()


def next_result(results: queue.SimpleQueue) -> JudgeResult:
    """The next finished request; waits in short steps so that Ctrl-C reaches the main thread at once."""
    while True:
        try:
            return results.get(timeout=0.2)
        except queue.Empty:
            continue


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


def programmatic_can_score(question: dict[str, Any], reference: list[str] | None) -> bool:
    """Whether the programmatic judge can check this question: a synthetic-task category with a reference per turn."""
    return question["category"] in SKILL_BY_CATEGORY and reference is not None and len(reference) >= len(question["turns"])


def programmatic_judgment(category: str, answer: str, reference: str | None) -> tuple[int, str]:
    """(score, explanation) for one answer of the synthetic task; -1 where there is nothing to check against."""
    if category not in SKILL_BY_CATEGORY or reference is None:
        return UNPARSEABLE, f"The programmatic judge cannot check a {category!r} answer without a reference."
    score = score_answer(category, answer, reference)
    return score, f"Reference: {reference}. Rating: [[{score}]]"
