"""Whether a hub model id can be loaded here, decided in a second instead of a minute.

Asked for a model id it cannot reach, huggingface_hub retries each request with backoff for about
a minute before it fails, and it does the same before it falls back to a copy already in its
cache. One probe of the hub up front tells the three cases apart: the hub answers (load as
usual), it does not but the model is cached (load the cached copy, offline), or neither (a clear
error at once, naming what would work here).
"""

from __future__ import annotations

import functools
from typing import Any

from declora.errors import ModelError

PROBE_TIMEOUT_S = 5.0


@functools.cache
def hub_unreachable_reason(endpoint: str) -> str | None:
    """None when the hub at `endpoint` answers at all (any HTTP status), else why it did not.

    It goes through huggingface_hub's own HTTP session, so proxies and certificates are the ones
    the download would use. Asked once per process."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # any failure to get an answer: the client's errors vary by version
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def is_cached(repo_id: str) -> bool:
    """True when the Hugging Face cache holds this model's config.json (at revision main)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_load_options(repo_id: str, *, offline_models: str) -> dict[str, Any]:
    """Extra from_pretrained options for a hub id: {} to load as usual, or
    {"local_files_only": True} when the hub cannot be reached but the model is cached.

    Raises ModelError at once for an id that is malformed, or that is neither cached nor
    reachable; `offline_models` names what the user could load instead."""
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub.errors import HFValidationError

    try:
        cached = is_cached(repo_id)
    except HFValidationError:
        raise ModelError(
            f"model.name {repo_id!r} is neither a local model folder nor a valid hub id "
            "(owner/name of letters, digits, '-', '_' and '.'); "
            f"offline choices: {offline_models}"
        ) from None
    if is_offline_mode():
        if cached:
            return {"local_files_only": True}
        raise ModelError(
            f"model.name {repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and HF_HUB_OFFLINE is set, so it cannot be downloaded; offline choices: "
            f"{offline_models}"
        )
    reason = hub_unreachable_reason(constants.ENDPOINT)
    if reason is None:
        return {}
    if cached:
        return {"local_files_only": True}
    raise ModelError(
        f"model.name {repo_id!r} is not a local folder, not a bundled model and not in the "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}), and the hub at {constants.ENDPOINT} "
        f"cannot be reached from here ({reason}); offline choices: {offline_models}"
    )


def model_load_options(hub: dict[str, Any]) -> dict[str, Any]:
    """`hub` for a model's from_pretrained: transformers' check for a PEFT adapter in the repo
    does not pass local_files_only on (transformers 5.25), so it is given again there."""
    if hub.get("local_files_only"):
        return {**hub, "adapter_kwargs": {"local_files_only": True}}
    return hub
