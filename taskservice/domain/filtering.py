"""The AIP-160 subset that ListTasks accepts, parsed into a typed TaskFilter.

Grammar (whitespace-insensitive):
    filter      := restriction ( "AND" restriction )*
    restriction := "state" "=" STATE_NAME
                 | "priority" "=" PRIORITY_NAME
                 | "assignee" "=" STRING
                 | "tags" ":" STRING
    STRING      := '"' ( any character but '"' and '\\' | '\\' '"' | '\\' '\\' )* '"'
Each field may appear once. Anything else is rejected with a message naming
the problem; nothing unparsed ever reaches a store query. A tag is compared
in NFC, the form tags are stored in.
"""

from __future__ import annotations

import re

from taskservice.domain.errors import InvalidArgument, clip
from taskservice.domain.limits import MAX_FILTER_LENGTH
from taskservice.domain.model import Priority, State, TaskFilter
from taskservice.domain.validation import normalize_tag

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<op>==|!=|<=|>=|=|:|<|>)
      | (?P<word>[A-Za-z_][A-Za-z0-9_.]*(?![^\s"=:<>!()]))
      | (?P<bare>[^\s"=:<>!()]+)
      | (?P<bad>\S)
    )""",
    re.VERBOSE | re.DOTALL,
)
_FIELDS = {"state": "=", "priority": "=", "assignee": "=", "tags": ":"}
_EXAMPLES = {
    "state": "state = STATE_OPEN",
    "priority": "priority = PRIORITY_HIGH",
    "assignee": 'assignee = "ana@example.com"',
    "tags": 'tags:"ops"',
}


def _invalid(problem: str) -> InvalidArgument:
    return InvalidArgument([("filter", problem)], reason="INVALID_FILTER")


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # pragma: no cover - the pattern always matches a non-space
            raise _invalid(f"cannot read the filter at position {pos}")
        kind = m.lastgroup or "bad"
        value = m.group(kind)
        if kind == "bad":
            if value == '"':
                raise _invalid("unterminated string")
            raise _invalid(f"unexpected character {value!r} at position {m.start(kind)}")
        if kind == "bare":  # a run of characters no word may hold (an unquoted e-mail)
            if len(out) >= 2 and out[-1][0] == "op" and out[-2][1] in ("assignee", "tags"):
                raise _quote_hint(out[-2][1], out[-1][1], value)
            bad = re.search(r"[^A-Za-z0-9_.]", value)
            offset = bad.start() if bad else 0
            raise _invalid(
                f"unexpected character {value[offset]!r} at position {m.start(kind) + offset}"
            )
        out.append((kind, value))
        pos = m.end()
    return out


def _quote_hint(field: str, op: str, value: str) -> InvalidArgument:
    shown = clip(value, 64).replace("\\", "\\\\").replace('"', '\\"')
    spaced = f"{field} {op} " if op == "=" else f"{field}{op}"
    return _invalid(f'{field} takes a quoted string; quote strings: {spaced}"{shown}"')


def _unquote(literal: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal[1:-1], flags=re.DOTALL)


def parse_filter(text: str) -> TaskFilter:
    """Parses a ListTasks filter; the empty string means no restriction."""
    if len(text) > MAX_FILTER_LENGTH:
        raise _invalid(f"longer than {MAX_FILTER_LENGTH} characters")
    tokens = _tokens(text)
    if not tokens:
        return TaskFilter()
    seen: set[str] = set()
    state: State | None = None
    priority: Priority | None = None
    strings: dict[str, str] = {}
    i = 0
    while True:
        if i + 3 > len(tokens):
            raise _invalid("incomplete restriction; expected e.g. state = STATE_OPEN")
        (k1, field), (k2, op), (k3, value) = tokens[i : i + 3]
        if k1 != "word" or field not in _FIELDS:
            allowed = ", ".join(_FIELDS)
            raise _invalid(
                f"unsupported field {clip(field, 64)!r}; filterable fields are {allowed}"
            )
        if k2 == "op" and op == "==" and _FIELDS[field] == "=":
            raise _invalid(f"'==' is not a filter operator; use a single '=': {_EXAMPLES[field]}")
        if k2 == "op" and op != _FIELDS[field] and _FIELDS[field] == "=" and op != ":":
            raise _invalid(
                f"{op!r} is not supported for {field}; only '=' is supported: {_EXAMPLES[field]}"
            )
        if k2 != "op" or op != _FIELDS[field]:
            raise _invalid(
                f"{field} must be followed by {_FIELDS[field]!r}, e.g. {_EXAMPLES[field]}"
            )
        if field in seen:
            raise _invalid(f"{field} is restricted more than once")
        seen.add(field)
        if field == "state":
            state = State[_enum_name(State, "STATE_", value, k3)]
        elif field == "priority":
            priority = Priority[_enum_name(Priority, "PRIORITY_", value, k3)]
        else:
            if k3 != "string":
                raise _quote_hint(field, op, value)
            strings[field] = _unquote(value)
        i += 3
        if i == len(tokens):
            break
        kind, word = tokens[i]
        if kind != "word" or word != "AND":
            raise _invalid(
                f"expected AND, found {clip(word, 64)!r}; only AND-joined restrictions are"
                " supported"
            )
        i += 1
    tag = strings.get("tags")
    return TaskFilter(
        state=state,
        priority=priority,
        assignee=strings.get("assignee"),
        tag=None if tag is None else normalize_tag(tag),
    )


def _enum_name(enum: type[State] | type[Priority], prefix: str, value: str, kind: str) -> str:
    """The member name that `value` (e.g. STATE_OPEN) spells; never UNSPECIFIED."""
    name = value[len(prefix) :] if kind == "word" and value.startswith(prefix) else ""
    member = enum.__members__.get(name)
    if member is None or member.value == 0:
        choices = ", ".join(prefix + m.name for m in enum if m.value)
        meant = enum.__members__.get(value.upper().removeprefix(prefix))
        hint = f"; did you mean {prefix}{meant.name}?" if meant is not None and meant.value else ""
        raise _invalid(f"{clip(value, 64)!r} is not one of {choices}{hint}")
    return name
