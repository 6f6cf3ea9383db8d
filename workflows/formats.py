"""Strings the cluster, the container runtime or S3 check with rules of their own.

A value that breaks such a rule passes a plain `str` field, then fails far from the user: in
a pod that cannot be created (a label value of 64 characters, `cpu: abc`), an image the
kubelet cannot parse, or a stage that dies when its S3 client refuses the bucket name. Each
`Format` here states one rule once, for both places that check a PSFTJob:

- `psft validate` (and the operator): annotated on a field, `problem()` runs after pydantic's
  type check and becomes a field error naming the rule, e.g. `spec.resources.cpu: must be a
  positive Kubernetes quantity ... (got 'abc')`;
- the CRD (psft.workflows.crd): the same rule as OpenAPI `pattern`, `minLength`/`maxLength`
  and, where a regular expression cannot say it, CEL `x-kubernetes-validations`, so the API
  server refuses the object at `kubectl apply`.

Patterns are written in the regular-expression syntax that Go's RE2 (the API server, CEL
`matches`) and Python's `re` read alike: no look-around, no `\\d` or `\\w` (Unicode-aware in
Python), `[.]` for a literal dot. Every CEL rule is bounded by the string's `maxLength`, so
its cost stays far inside the API server's budget; a map's keys need `maxProperties` too.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

CEL = "x-kubernetes-validations"

# ---- Kubernetes' name rules (k8s.io/apimachinery/pkg/util/validation) ----

_LABEL_PART = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_LABEL = f"^{_LABEL_PART}$"
"""RFC 1123 label: namespaces, and psft's job names."""
DNS_LABEL_MAX = 63
DNS_SUBDOMAIN = f"^{_LABEL_PART}([.]{_LABEL_PART})*$"
"""RFC 1123 subdomain: names of Secrets, ServiceAccounts, PriorityClasses, schedulers."""
DNS_SUBDOMAIN_MAX = 253
_NAME_PART = "([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]"
"""The name of a label key, or a label value: at most 63 characters (bounded here)."""
QUALIFIED_NAME = f"^({_LABEL_PART}([.]{_LABEL_PART})*/)?{_NAME_PART}$"
"""A label, annotation or taint key: `[prefix/]name`."""
QUALIFIED_PREFIX_LENGTH = "^([^/]{1,253}/)?[^/]*$"
"""The prefix of a qualified name is a DNS subdomain of at most 253 characters: the one part
of the rule QUALIFIED_NAME cannot bound, checked by CEL with this second expression."""
QUALIFIED_NAME_MAX = DNS_SUBDOMAIN_MAX + 1 + DNS_LABEL_MAX
LABEL_VALUE = f"^({_NAME_PART})?$"
LABEL_VALUE_MAX = 63
CONFIG_KEY = "^([-_A-Za-z0-9][-._A-Za-z0-9]*|[.][-_A-Za-z0-9][-._A-Za-z0-9]*)$"
"""A key of a Secret or ConfigMap: letters, digits, '-', '_' and '.', but not '.', '..' or
anything starting with '..' (IsConfigMapKey)."""

# ---- resource quantities (k8s.io/apimachinery/pkg/api/resource) ----

_NUMBER = "([0-9]+([.][0-9]*)?|[.][0-9]+)"
_POSITIVE_NUMBER = "([0-9]*[1-9][0-9]*([.][0-9]*)?|[0-9]*[.][0-9]*[1-9][0-9]*)"
_SUFFIX = "(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][-+]?[0-9]+)?"
QUANTITY = f"^[-+]?{_NUMBER}{_SUFFIX}$"
"""Kubernetes' quantity grammar, with the exponent an integer as its parser requires."""
POSITIVE_QUANTITY = f"^[+]?{_POSITIVE_NUMBER}{_SUFFIX}$"
QUANTITY_MAX = 64
"""No Kubernetes rule: a real quantity has a few characters (`64Gi`, `1.5e3`)."""

# ---- container image references (github.com/distribution/reference) ----

_DOMAIN_PART = "([a-zA-Z0-9]|[a-zA-Z0-9][-a-zA-Z0-9]*[a-zA-Z0-9])"
_DOMAIN = f"({_DOMAIN_PART}([.]{_DOMAIN_PART})*|\\[[a-fA-F0-9:]+\\])(:[0-9]+)?"
_PATH_PART = "[a-z0-9]+(([_.]|__|[-]+)[a-z0-9]+)*"
_TAG = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = "[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_NAME = f"({_DOMAIN}/)?{_PATH_PART}(/{_PATH_PART})*"
IMAGE = f"^{IMAGE_NAME}(:{_TAG})?(@{_DIGEST})?$"
IMAGE_NAME_MAX = 255
"""The repository name (registry and path) of a reference; longer ones are refused."""
IMAGE_NAME_LENGTH = f"^[^@]{{1,{IMAGE_NAME_MAX}}}(:{_TAG})?(@[^@]*)?$"
"""For a reference IMAGE matches: its name has at most IMAGE_NAME_MAX characters (a tag
holds no '/', so the split between name and tag is the only one)."""
IMAGE_MAX = 1024
"""No rule of its own: a 255-character name, a 128-character tag and a SHA-512 digest fit."""

# ---- S3 (AWS' bucket naming rules; the minio client the stages use) ----

BUCKET = DNS_SUBDOMAIN
"""Lower-case letters, digits, '.' and '-', each '.'-separated part starting and ending
with a letter or digit: this also rules out '..', '.-' and '-.' (minio refuses them)."""
IP_FORMATTED = "^[0-9]+([.][0-9]+){3}$"
REGION = "^([A-Za-z0-9]([-_A-Za-z0-9]{0,61}[A-Za-z0-9])?)?$"
"""minio's rule for a region name (empty: the client asks the server)."""
_HOST_PART = "[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?"
_PORT = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
ENDPOINT = f"^(https?://)?({_HOST_PART}([.]{_HOST_PART})*|\\[[0-9A-Fa-f:.]+\\])(:{_PORT})?/?$"
ENDPOINT_MAX = len("https://") + DNS_SUBDOMAIN_MAX + len(":65535/")
HAS_CREDENTIALS = "^([A-Za-z][-+.A-Za-z0-9]*://)?[^/?#]*@"
"""A URL whose authority holds `user[:password]@`."""
DOT_SEGMENT = "(^|/)[.][.]?(/|$)"
"""A `.` or `..` segment of a key: S3 keeps it literally, but psft's download cache and a
run's local mirror are folders, where `..` climbs out of the folder."""
S3_PREFIX_MAX = 512
"""S3 keys hold at most 1024 bytes; the run root adds the namespace, job name and uid, and
artifacts their own relative keys."""
URL_MAX = 2048
PUSHGATEWAY_URL = "^(https?://)?([-A-Za-z0-9_.]+|\\[[0-9A-Fa-f:.]+\\])(:[0-9]{1,5})?([/?#][!-~]*)?$"
"""http(s)://host[:port][/path] or host:port, printable ASCII without spaces."""


@dataclass(frozen=True)
class CelRule:
    """A CEL rule of the CRD: `rule` true means valid; `message` is shown by the API server."""

    rule: str
    message: str
    field_path: str | None = None
    """The field the API server blames (`.operator`), when the rule sits on an object."""

    def wire(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


@dataclass(frozen=True)
class Format:
    """A rule for a string field: checked by `psft validate`, emitted into the CRD."""

    rule: str
    """What a valid value is, as the error says it after "must be"."""
    pattern: str | None = None
    """Anchored regular expression (RE2 and Python alike); also the CRD's `pattern`."""
    max_length: int | None = None
    min_length: int | None = None
    cel: tuple[CelRule, ...] = ()
    """CRD rules beyond the pattern and lengths (each with a Python twin in the checks)."""
    precheck: Callable[[str], str | None] | None = None
    """A Python check run before the pattern, for a more precise message; returns a problem
    or None."""
    extra: Callable[[str], str | None] | None = None
    """A Python check run once the pattern holds; returns a problem or None."""
    allow_empty: bool = False
    in_schema: bool = True
    """False for a map key: keys are no schema node in a CRD; MapKeys carries their rule."""

    @property
    def schema_pattern(self) -> str | None:
        if self.pattern is None or not self.allow_empty:
            return self.pattern
        return f"^({self.pattern[1:-1]})?$"

    def problem(self, value: str) -> str | None:
        """Why `value` breaks the rule, as an error message, or None."""
        if self.allow_empty and value == "":
            return None
        # lengths first: the patterns then never run on more than max_length characters
        n = len(value)
        if (self.max_length is not None and n > self.max_length) or (
            self.min_length is not None and n < self.min_length
        ):
            return f"is {f'{n} characters long' if n else 'empty'}; must be {self.rule}"
        for check in (self.precheck, self._pattern_problem, self.extra):
            problem = check(value) if check is not None else None
            if problem:
                return problem
        return None

    def _pattern_problem(self, value: str) -> str | None:
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            return f"must be {self.rule}"
        return None

    # pydantic: validate after the `str` check; describe in the JSON schema (the CRD's source)
    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        out = handler(schema)
        if not self.in_schema:
            return out
        if self.schema_pattern is not None:
            out["pattern"] = self.schema_pattern
        if self.min_length is not None and not self.allow_empty:
            out["minLength"] = self.min_length
        if self.max_length is not None:
            out["maxLength"] = self.max_length
        if self.cel:
            out[CEL] = [rule.wire() for rule in self.cel]
        return out

    def _validate(self, value: str) -> str:
        problem = self.problem(value)
        if problem:
            # no context: pydantic uses the message as written, braces and all
            raise PydanticCustomError("invalid_format", problem)
        return value


@dataclass(frozen=True)
class MapKeys:
    """The CRD rule for the keys of a map field, which are no schema node: a CEL rule over
    `self`. Its cost is bounded only with `maxProperties` on the map (pydantic's max_length
    on the dict field). Python checks the keys through the key type's own Format."""

    format: Format

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        out = handler(schema)
        out.pop("propertyNames", None)
        checks = " && ".join(f"k.matches('{p}')" for p in _key_patterns(self.format))
        message = f"every key must be {self.format.rule}"
        out[CEL] = [{"rule": f"self.all(k, {checks})", "message": message}]
        return out


def _key_patterns(fmt: Format) -> list[str]:
    patterns = [p for p in (fmt.schema_pattern,) if p]
    if fmt.pattern == QUALIFIED_NAME:
        patterns.append(QUALIFIED_PREFIX_LENGTH)
    for pattern in patterns:
        assert "'" not in pattern and "\\" not in pattern, "keep CEL string literals plain"
    return patterns


# ---- checks the patterns cannot make, or make with a vaguer message ----


def _qualified_name_problem(value: str) -> str | None:
    prefix, slash, _ = value.rpartition("/")
    if slash and len(prefix) > DNS_SUBDOMAIN_MAX:
        return f"has a prefix of {len(prefix)} characters before '/'; must be {_LABEL_KEY_RULE}"
    return None


def _quantity_problem(value: str) -> str | None:
    if not re.fullmatch(QUANTITY, value):
        return f"must be {QUANTITY_RULE}"
    number = re.match(f"[-+]?{_NUMBER}", value)
    if number is None or Decimal(number.group(0)) <= 0:
        return f"is zero or negative; must be {QUANTITY_RULE}"
    return None


def _bucket_problem(value: str) -> str | None:
    if re.fullmatch(IP_FORMATTED, value):
        return f"is formatted as an IP address; must be {BUCKET_RULE}"
    return None


def _image_problem(value: str) -> str | None:
    name = re.match(IMAGE_NAME, value)
    if name is not None and len(name.group(0)) > IMAGE_NAME_MAX:
        return (
            f"has a repository name of {len(name.group(0))} characters, more than the "
            f"{IMAGE_NAME_MAX} a container runtime accepts"
        )
    return None


S3_CREDENTIALS_FIX = (
    "put the access key and secret key in a Kubernetes Secret and name it in "
    "spec.storage.s3.secretRef (locally: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
)
PUSHGATEWAY_CREDENTIALS_FIX = "use a Pushgateway address that needs none"


def _credentials_problem(value: str, fix: str) -> str | None:
    if re.match(HAS_CREDENTIALS, value):
        return (
            "must not hold credentials (user:password@host): the spec is stored and shown in "
            f"plain text; {fix}"
        )
    return None


def _endpoint_problem(value: str) -> str | None:
    problem = _credentials_problem(value, S3_CREDENTIALS_FIX)
    if problem:
        return problem
    scheme = re.match("^([A-Za-z][-+.A-Za-z0-9]*)://", value)
    if scheme and scheme.group(1) not in ("http", "https"):
        return f"has the scheme {scheme.group(1)!r}; must be {ENDPOINT_RULE}"
    return None


def _credentials_problem_of_pushgateway(value: str) -> str | None:
    return _credentials_problem(value, PUSHGATEWAY_CREDENTIALS_FIX)


def _pushgateway_problem(value: str) -> str | None:
    try:
        parts = urlsplit(value if "://" in value else f"http://{value}")
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number in range
    except ValueError:
        return f"must be {PUSHGATEWAY_RULE}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be {PUSHGATEWAY_RULE}"
    return None


def _prefix_problem(value: str) -> str | None:
    if re.search(DOT_SEGMENT, value):
        return f"has a '.' or '..' segment; must be {PREFIX_RULE}"
    if any(unicodedata.category(c) == "Cc" for c in value):
        return f"contains a control character; must be {PREFIX_RULE}"
    return None


# ---- the formats ----

_DNS_LABEL_RULE = (
    "a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter "
    "or digit"
)
SUBDOMAIN_RULE = (
    f"a DNS-1123 subdomain: at most {DNS_SUBDOMAIN_MAX} characters, lower-case letters, "
    "digits, '-' and '.', each '.'-separated part starting and ending with a letter or digit"
)
_LABEL_KEY_RULE = (
    "a label key: an optional prefix (a DNS-1123 subdomain of at most 253 characters) and "
    "'/', then a name of at most 63 letters, digits, '-', '_' and '.', starting and ending "
    "with a letter or digit"
)
_LABEL_VALUE_RULE = (
    "a label value: at most 63 letters, digits, '-', '_' and '.', starting and ending with a "
    "letter or digit (or empty)"
)
QUANTITY_RULE = (
    f"a positive Kubernetes quantity of at most {QUANTITY_MAX} characters: a number with an "
    "optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, "
    "n, u, m, k, M, G, T, P, E) or exponent (e3), e.g. '8', '500m', '64Gi'"
)
BUCKET_RULE = (
    "an S3 bucket name: 3 to 63 lower-case letters, digits, '.' and '-', starting and ending "
    "with a letter or digit, without '..', '.-' or '-.', and not formatted as an IP address"
)
ENDPOINT_RULE = (
    "the host:port of the S3 API, optionally after http:// or https:// (e.g. "
    "'minio.storage.svc:9000'), without a path, query or credentials"
)
PREFIX_RULE = (
    f"an S3 key prefix of at most {S3_PREFIX_MAX} characters without '.' or '..' segments "
    "(e.g. 'psft' or 'team/runs')"
)
PUSHGATEWAY_RULE = (
    "an http:// or https:// URL of the Pushgateway, or its host:port, in printable ASCII "
    "without spaces"
)

JOB_NAME_MAX = 52
JOB_NAME = Format(
    f"{_DNS_LABEL_RULE}, at most {JOB_NAME_MAX} characters (child objects add up to 11)",
    DNS_LABEL,
    max_length=JOB_NAME_MAX,
    min_length=1,
)
NAMESPACE = Format(
    f"{_DNS_LABEL_RULE}, at most {DNS_LABEL_MAX} characters (Kubernetes' rule for namespaces)",
    DNS_LABEL,
    max_length=DNS_LABEL_MAX,
    min_length=1,
)
OBJECT_NAME = Format(SUBDOMAIN_RULE, DNS_SUBDOMAIN, max_length=DNS_SUBDOMAIN_MAX, min_length=1)
"""Names of Secrets, ServiceAccounts, PriorityClasses and schedulers."""
_PREFIX_LENGTH_CEL = CelRule(
    f"self.matches('{QUALIFIED_PREFIX_LENGTH}')",
    "the prefix before '/' must have at most 253 characters",
)
LABEL_KEY = Format(
    _LABEL_KEY_RULE,
    QUALIFIED_NAME,
    max_length=QUALIFIED_NAME_MAX,
    min_length=1,
    extra=_qualified_name_problem,
    in_schema=False,
)
"""A key of labels, annotations or a node selector: checked in Python; in the CRD by the
map's MapKeys rule (a map key is no schema node)."""
TAINT_KEY = Format(
    _LABEL_KEY_RULE,
    QUALIFIED_NAME,
    max_length=QUALIFIED_NAME_MAX,
    extra=_qualified_name_problem,
    cel=(_PREFIX_LENGTH_CEL,),
    allow_empty=True,
)
"""A toleration's key; empty (with operator Exists) matches every taint."""
LABEL_VALUE_FORMAT = Format(_LABEL_VALUE_RULE, LABEL_VALUE, max_length=LABEL_VALUE_MAX)
QUEUE = Format(
    "a queue name usable as a label value: at most 63 letters, digits, '-', '_' and '.', "
    "starting and ending with a letter or digit",
    LABEL_VALUE,
    max_length=LABEL_VALUE_MAX,
    min_length=1,
)
SECRET_KEY = Format(
    "a Secret key: at most 253 letters, digits, '-', '_' and '.', and not '.', '..' or "
    "starting with '..'",
    CONFIG_KEY,
    max_length=DNS_SUBDOMAIN_MAX,
    min_length=1,
)
UID = Format(
    "letters, digits and '-', at most 128 characters (Kubernetes sets a UUID here)",
    "^[-A-Za-z0-9]+$",
    max_length=128,
    min_length=1,
)
POSITIVE_QUANTITY_FORMAT = Format(
    QUANTITY_RULE,
    POSITIVE_QUANTITY,
    max_length=QUANTITY_MAX,
    min_length=1,
    precheck=_quantity_problem,
)
IMAGE_FORMAT = Format(
    "a container image reference: an optional registry host[:port] and '/', a repository "
    "path of lower-case letters and digits separated by '/', '.', '_', '__' or '-', then an "
    "optional ':tag' (at most 128 letters, digits, '_', '.' and '-') and '@digest', e.g. "
    "'ghcr.io/psft-dev/psft-trainer:0.1.0'",
    IMAGE,
    max_length=IMAGE_MAX,
    min_length=1,
    extra=_image_problem,
    cel=(
        CelRule(
            f"self.matches('{IMAGE_NAME_LENGTH}')",
            f"the repository name (before :tag and @digest) must have at most {IMAGE_NAME_MAX} "
            "characters",
        ),
    ),
)
BUCKET_FORMAT = Format(
    BUCKET_RULE,
    BUCKET,
    max_length=63,
    min_length=3,
    extra=_bucket_problem,
    cel=(
        CelRule(
            f"!self.matches('{IP_FORMATTED}')",
            "an S3 bucket name must not be formatted as an IP address",
        ),
    ),
)
REGION_FORMAT = Format(
    "an S3 region name such as 'us-east-1': at most 63 letters, digits, '-' and '_', "
    "starting and ending with a letter or digit",
    REGION,
    max_length=63,
)
ENDPOINT_FORMAT = Format(
    ENDPOINT_RULE,
    ENDPOINT,
    max_length=ENDPOINT_MAX,
    min_length=1,
    precheck=_endpoint_problem,
    cel=(
        CelRule(
            f"!self.matches('{HAS_CREDENTIALS}')",
            "must not hold credentials (user:password@host): put them in the Secret named "
            "by storage.s3.secretRef",
        ),
    ),
)
S3_PREFIX = Format(
    PREFIX_RULE,
    max_length=S3_PREFIX_MAX,
    extra=_prefix_problem,
    cel=(
        CelRule(
            f"!self.matches('{DOT_SEGMENT}')",
            "the prefix must not have a '.' or '..' segment",
        ),
    ),
)
PUSHGATEWAY = Format(
    PUSHGATEWAY_RULE,
    PUSHGATEWAY_URL,
    max_length=URL_MAX,
    min_length=1,
    precheck=_credentials_problem_of_pushgateway,
    extra=_pushgateway_problem,
    cel=(
        CelRule(
            f"!self.matches('{HAS_CREDENTIALS}')",
            "must not hold credentials (user:password@host): use a Pushgateway address "
            "that needs none",
        ),
    ),
)
BENCHMARK_NAME = Format(
    "a benchmark name: at most 63 lower-case letters, digits, '_', '.' and '-', starting "
    "with a letter or digit (it names files and metric labels)",
    "^[a-z0-9][a-z0-9_.-]*$",
    max_length=63,
    min_length=1,
)

NODE_SELECTOR_MAX = 64
"""Entries of a node selector: no Kubernetes rule, but a CEL rule over a map's keys needs a
bound to stay within the API server's cost budget (real selectors have a few)."""
TOLERATIONS_MAX = 64
"""Tolerations of a pod: no Kubernetes rule either, but the CEL rules of each item are
counted once per possible item; unbounded, the API server refuses the CRD (its estimate
then exceeds the budget 80 times over)."""

FORMATS_BY_PATTERN: dict[tuple[str, int | None, int | None], Format] = {
    (f.schema_pattern, None if f.allow_empty else f.min_length, f.max_length): f
    for f in reversed(
        (
            JOB_NAME,
            NAMESPACE,
            OBJECT_NAME,
            TAINT_KEY,
            LABEL_VALUE_FORMAT,
            QUEUE,
            SECRET_KEY,
            POSITIVE_QUANTITY_FORMAT,
            IMAGE_FORMAT,
            BUCKET_FORMAT,
            REGION_FORMAT,
            ENDPOINT_FORMAT,
        )
    )
    if f.schema_pattern
}
"""Formats by their CRD pattern, minLength and maxLength, so the field reference can say a
rule in words."""

TOLERATION_RULES = (
    CelRule(
        "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
        "operator must be Exists when key is empty (such a toleration matches every taint)",
        ".operator",
    ),
    CelRule(
        "!has(self.value) || self.value == '' || !has(self.operator) || self.operator != 'Exists'",
        "value must be empty when operator is Exists",
        ".value",
    ),
    CelRule(
        "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        "tolerationSeconds needs effect NoExecute (it says how long a pod stays on a node "
        "once such a taint appears)",
        ".effect",
    ),
)
"""Kubernetes' rules for a toleration of a Pod (ValidateTolerations): a Pod that breaks them
cannot be created. psft.workflows.validate checks the same in Python."""
