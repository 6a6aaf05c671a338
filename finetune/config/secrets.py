"""Credentials never go in a recipe: moetune copies the recipe into every stage folder (recipe.yaml, the manifest,
TRL's training_args.bin) and uploads it with the model card. A key that names a credential (TRL's hub_token, any
token/api-key/secret/password field, request headers), and any value shaped like a Hugging Face or OpenAI key, is
refused when the recipe is read, naming the way to pass it instead. The message never repeats the value.
"""

from __future__ import annotations

import re
from typing import Any

from finetune.config.recipe import RecipeError

# A key names a credential when it is (or ends in) one of these words. Vocabulary tokens (TRL's eos_token),
# counts (experts_per_token, max_tokens) and names of variables (api_key_env) are no credentials.
CREDENTIAL_KEY = re.compile(r"^((hub|hf|access|auth|api|bearer|refresh|session)_)?token$"
                            r"|(^|_)(api_?key|secret|password|passwd|credentials?|authorization|headers)$", re.IGNORECASE)
# Hugging Face user access tokens, OpenAI-style keys, and an HTTP Authorization value.
CREDENTIAL_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}|\bsk-[A-Za-z0-9_-]{16,}|\bBearer\s+\S{8,}")


def is_credential_key(key: str) -> bool:
    return CREDENTIAL_KEY.search(str(key)) is not None


def where_credentials_go(path: str) -> str:
    """The way to pass the credential a key at `path` would hold."""
    if path.startswith("eval."):
        return ("put the key in an environment variable and name the variable in eval.judge.api_key_env (e.g. "
                "OPENAI_API_KEY); the judge sends it as a Bearer token")
    return ("log in with `hf auth login`, or set HF_TOKEN in the environment; moetune's uploads (hub: and "
            "`moetune push`) use it")


def refuse_credentials(raw: Any, source: str, path: str = "") -> None:
    """Walk the raw recipe mapping; refuse the first credential key or credential-shaped value."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            where = f"{path}.{key}" if path else str(key)
            if is_credential_key(str(key)) and value not in (None, "", {}):
                raise RecipeError(f"{source}: {where} would hold a credential, and moetune writes the recipe "
                                         f"into every stage folder and uploads it. Remove it: "
                                         f"{where_credentials_go(where)}.")
            refuse_credentials(value, source, where)
    elif isinstance(raw, list):
        for index, item in enumerate(raw):
            refuse_credentials(item, source, f"{path}[{index}]")
    elif isinstance(raw, str) and CREDENTIAL_VALUE.search(raw):
        raise RecipeError(f"{source}: {path} holds what looks like an access token or API key (value not "
                                 f"shown). A recipe is written into every stage folder and uploaded: remove it; "
                                 f"{where_credentials_go(path)}.")
