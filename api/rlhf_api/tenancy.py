"""What a pipeline's author may make the operator do with storage: one definition for the operator, its chart and
the docs (README, "Security and multi-tenancy").

An author who may create RLHFPipelines in a namespace gains nothing beyond what they could do there already:

* the operator reads a Secret of the namespace only when the Secret carries :data:`STORE_CREDENTIALS_LABEL`
  (``"true"``): whoever labels it (someone allowed to edit Secrets there) opts it in. An unlabelled Secret is never
  read, nor passed to the stage pods;
* the operator talks only to S3 endpoints the platform allowed (the chart's ``storage.allowedEndpoints``, passed as
  ``--allowed-endpoint`` or :data:`ALLOWED_ENDPOINTS_ENV`); a pipeline without ``storage.endpoint`` means AWS S3,
  always allowed;
* the operator has no store credentials of its own (no IRSA, node role or environment): a pipeline that needs the
  store and names no opted-in Secret is refused;
* ``file://`` storage roots are refused on a cluster (they would be the operator's own filesystem).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

#: The label that opts a Secret in as a pipeline's store credentials (``kubectl label secret NAME
#: rlhf-operator.io/store-credentials=true``).
STORE_CREDENTIALS_LABEL = "rlhf-operator.io/store-credentials"
STORE_CREDENTIALS_LABEL_VALUE = "true"
#: Comma-separated allowed S3 endpoints, for the operator process (the chart sets ``--allowed-endpoint`` flags).
ALLOWED_ENDPOINTS_ENV = "RLHF_ALLOWED_ENDPOINTS"
#: What an AWS region looks like; anything else could steer the AWS endpoint's host name.
REGION_PATTERN = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-[0-9]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_endpoint(url: str) -> str:
    """``url`` as the allow-list compares it: ``scheme://host:port`` with the scheme and host lowercased, the port
    explicit, a path kept without its trailing ``/``. A URL with user info, a query or a fragment normalises to
    itself, which matches no well-formed allowed entry."""
    parts = urlsplit(url.strip())
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username or parts.query or parts.fragment:
        return url
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return url
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def endpoint_allowed(endpoint: str | None, allowed: Iterable[str]) -> bool:
    """Whether the operator may send a pipeline's credentials to ``endpoint`` (None: AWS S3, always allowed)."""
    if endpoint is None:
        return True
    return normalize_endpoint(endpoint) in {normalize_endpoint(entry) for entry in allowed}


def parse_allowed_endpoints(values: Iterable[str]) -> tuple[str, ...]:
    """The allowed endpoints from flags and/or comma-separated lists, normalised, without blanks."""
    out = []
    for value in values:
        out += [normalize_endpoint(item) for item in value.split(",") if item.strip()]
    return tuple(dict.fromkeys(out))


def opted_in(labels: dict[str, str] | None) -> bool:
    """Whether a Secret with these labels may be read as store credentials."""
    return (labels or {}).get(STORE_CREDENTIALS_LABEL) == STORE_CREDENTIALS_LABEL_VALUE
