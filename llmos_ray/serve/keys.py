"""API keys with identities and limits: who a caller is, what they may use, how much.

A key comes from serve.api_keys, $LLMOS_API_KEYS (comma separated) or serve.api_keys_file. A
plain string is a key with no limits, named `key-<first 8 hex digits of its sha256>`. A record
(in serve.api_keys, or in a YAML/JSON keys file) gives it an identity and limits:

    keys:                                   # a keys file (YAML or JSON); a bare list works too
      - name: alice                         # the name in the ledger, the metrics and `llmos usage`
        sha256: 9f86d08...                  # the key's hash (`llmos keys hash`), or `key: sk-...`
        tenant: acme                        # a label to group keys by (default: the name)
        models: [tiny]                      # served models it may use (default: all)
        apps: [summarize]                   # prompt apps it may run (default: all)
        rpm: 60                             # requests per minute
        tpm: 20000                          # tokens (prompt + completion) per minute
        budget_tokens: 1000000              # tokens per budget_period ...
        budget_period: month                # day | week | month (UTC calendar) | total
        admin: false                        # may read everyone's usage (GET /v1/admin/usage)

A keys file of one key per line (# comments) stays valid. Only hashes are kept once a key is
read: a secret never reaches the Serve config, a log, the ledger or a metric, and `Keyring.find`
compares hashes with hmac.compare_digest.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any, Optional

from llmos_ray.errors import ConfigError

API_KEYS_ENV = "LLMOS_API_KEYS"
PERIODS = ("day", "week", "month", "total")


def hash_key(secret: str) -> str:
    """The sha256 (hex) of a key: what is stored and compared."""
    return hashlib.sha256(secret.strip().encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One API key as the server knows it: its hash, identity, what it may use and its limits."""

    name: str
    sha256: str
    tenant: str = ""
    """A label to group keys by; '' = the key's name."""
    models: Optional[tuple[str, ...]] = None
    """Served models this key may use; None = all."""
    apps: Optional[tuple[str, ...]] = None
    """Prompt apps this key may run; None = all."""
    rpm: Optional[int] = None
    tpm: Optional[int] = None
    budget_tokens: Optional[int] = None
    budget_period: str = "month"
    admin: bool = False

    def __post_init__(self):
        if not self.tenant:
            object.__setattr__(self, "tenant", self.name)

    @property
    def limited(self) -> bool:
        """Whether a request must ask the usage meter before it runs."""
        return any(v is not None for v in (self.rpm, self.tpm, self.budget_tokens))

    def limits(self) -> dict[str, Any]:
        return {"rpm": self.rpm, "tpm": self.tpm, "budget_tokens": self.budget_tokens,
                "budget_period": self.budget_period}

    def allows_model(self, name: str) -> bool:
        return self.models is None or name in self.models

    def allows_app(self, name: str) -> bool:
        return self.apps is None or name in self.apps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KeyRecord":
        lists = {f: tuple(d[f]) if d.get(f) is not None else None for f in ("models", "apps")}
        return cls(**{**d, **lists})


FIELDS = ("name", "key", "sha256", "tenant", "models", "apps", "rpm", "tpm", "budget_tokens", "budget_period",
          "admin")


def parse_record(raw: Any, where: str) -> KeyRecord:
    """A KeyRecord from a plain key string or a record (dict); ConfigError naming `where` otherwise."""
    if isinstance(raw, str):
        digest = hash_key(raw)
        return KeyRecord(name=f"key-{digest[:8]}", sha256=digest)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a key is a string or a record with name and key/sha256, got {raw!r:.40}")
    for field in raw:
        if field not in FIELDS:
            close = difflib.get_close_matches(str(field), FIELDS, n=1)
            raise ConfigError(f"{where}: unknown field {field!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (fields: {', '.join(FIELDS)})")
    if ("key" in raw) == ("sha256" in raw):
        raise ConfigError(f"{where}: give exactly one of 'key' (the secret) and 'sha256' (its hash)")
    digest = hash_key(str(raw["key"])) if "key" in raw else str(raw["sha256"]).lower().removeprefix("sha256:")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"{where}: sha256 must be 64 hex digits (`llmos keys hash` prints one)")
    name = raw.get("name") or f"key-{digest[:8]}"
    for field in ("rpm", "tpm", "budget_tokens"):
        value = raw.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{where}.{field}: must be a positive integer, got {value!r}")
    if raw.get("budget_period", "month") not in PERIODS:
        raise ConfigError(f"{where}.budget_period: one of {', '.join(PERIODS)}, got {raw['budget_period']!r}")
    lists = {}
    for field in ("models", "apps"):
        value = raw.get(field)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}.{field}: a list of names, got {value!r}")
        lists[field] = tuple(value) if value is not None else None
    if not isinstance(raw.get("admin", False), bool):
        raise ConfigError(f"{where}.admin: true or false, got {raw['admin']!r}")
    return KeyRecord(name=str(name), sha256=digest, tenant=str(raw.get("tenant") or ""), **lists,
                     rpm=raw.get("rpm"), tpm=raw.get("tpm"), budget_tokens=raw.get("budget_tokens"),
                     budget_period=raw.get("budget_period", "month"), admin=raw.get("admin", False))


def read_keys_file(path: str) -> list[Any]:
    """The entries of a keys file: records from YAML/JSON (`keys: [...]` or a list), else one key a line."""
    import yaml

    try:
        with open(os.path.expanduser(path)) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"serve.api_keys_file {path!r} cannot be read: {e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None
    if isinstance(doc, dict) and "keys" in doc:
        doc = doc["keys"]
    if isinstance(doc, list) and any(isinstance(d, dict) for d in doc):
        return doc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def resolve_keys(keys: list[Any], keys_file: Optional[str]) -> list[KeyRecord]:
    """Keys from the config, $LLMOS_API_KEYS and the keys file, in that order (a key given twice
    counts once, as first given); two keys of one name are an error."""
    entries = [(f"serve.api_keys[{i}]", k) for i, k in enumerate(keys) if not (isinstance(k, str) and not k.strip())]
    entries += [(API_KEYS_ENV, k.strip()) for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if keys_file:
        entries += [(f"{keys_file}[{i}]", k) for i, k in enumerate(read_keys_file(keys_file))]
    found: dict[str, KeyRecord] = {}
    names: dict[str, str] = {}
    for where, raw in entries:
        record = parse_record(raw, where)
        if record.sha256 in found:
            continue
        if names.get(record.name, record.sha256) != record.sha256:
            raise ConfigError(f"{where}: two different keys are named {record.name!r}; names must be unique")
        found[record.sha256], names[record.name] = record, record.sha256
    return list(found.values())


class Keyring:
    """The keys one ingress accepts (none = an open server)."""

    def __init__(self, records: list[KeyRecord]):
        self.records = list(records)
        self._digests = [(r.sha256.encode(), r) for r in self.records]

    @property
    def open(self) -> bool:
        return not self.records

    def find(self, token: str) -> Optional[KeyRecord]:
        """The record of key `token`, or None; every stored hash is compared (constant time each)."""
        digest = hash_key(token).encode()
        match = None
        for stored, record in self._digests:
            if hmac.compare_digest(digest, stored):
                match = record
        return match
