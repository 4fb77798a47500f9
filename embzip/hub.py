"""Whether the model hub can be reached at all, decided before the first request for a hub id.

Offline, huggingface_hub retries every request five times with backoff (about 23 s each), and a hub id
makes several: the config, the file list, the weights. When the hub's host name does not resolve and no
proxy is configured, no request can succeed, so embzip switches huggingface_hub to offline mode for the
rest of the process (what HF_HUB_OFFLINE=1 does): a model in the local cache opens at once, and one that
is not fails at once. With a proxy (which resolves names itself), a resolver slower than a moment, or
offline mode already set, nothing changes: the requests go as they would have.
"""

from __future__ import annotations

import logging
import socket
import threading
import urllib.request
from urllib.parse import urlparse

log = logging.getLogger("embzip")

RESOLVE_SECONDS = 2.0  # how long to wait for the resolver before leaving the decision to the requests
_decided: dict[str, bool | None] = {}  # host -> what resolves() said, once per process (a command may open twice)


def offline_if_unreachable() -> bool:
    """Switch huggingface_hub to offline mode when its endpoint's host name does not resolve and no proxy is
    set; True when offline mode is on afterwards (switched here, or set before)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if urllib.request.getproxies():
        return False
    host = urlparse(constants.ENDPOINT).hostname
    if host and host not in _decided:
        _decided[host] = resolves(host)
    if not host or _decided[host] is not False:
        return False
    constants.HF_HUB_OFFLINE = True
    log.warning("%s does not resolve and no proxy is set: working offline, from the local Hugging Face cache "
                "(as with HF_HUB_OFFLINE=1)", host)
    return True


def resolves(host: str, seconds: float = RESOLVE_SECONDS) -> bool | None:
    """True when `host` resolves, False when the resolver says it does not, None when it has not answered
    within `seconds` (the lookup goes on in a daemon thread; its answer is dropped)."""
    answer: list[bool] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
            answer.append(True)
        except (socket.gaierror, UnicodeError):
            answer.append(False)
        except OSError:  # a resolver failure that says nothing about the name
            pass

    thread = threading.Thread(target=look_up, daemon=True)
    thread.start()
    thread.join(seconds)
    return answer[0] if answer else None
