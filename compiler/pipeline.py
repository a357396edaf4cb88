"""Pipeline text: parse `a,b{k=v,k2=v2},pipeline(c,d)` into a PassManager and build a target's default.

Grammar:  pipeline := item (',' item)* ;  item := NAME ['{' key=value (',' key=value)* '}'] | 'pipeline(' pipeline ')'
Values are bare words, numbers or "quoted strings"; lists are ';'-separated. Printing a parsed pipeline
gives back the text it was parsed from (modulo spaces).
"""

from __future__ import annotations

import re

from compiler.errors import UsageError
from compiler.passmanager import PassManager, create_pass

_TOKEN = re.compile(r'\s*(?:(?P<name>[A-Za-z_][\w\-.]*)|(?P<str>"[^"]*")|(?P<num>[-+]?[\d.][\w.+:-]*)|(?P<punct>[{}(),=;])|(?P<bad>\S))')


def parse_pipeline(text: str) -> PassManager:
    """Parse pipeline text into a PassManager; UsageError names the position of a syntax error."""
    tokens = _tokenize(text)
    pos, pm = _parse_list(tokens, 0, text)
    if pos != len(tokens):
        raise UsageError(f"pipeline: unexpected '{tokens[pos][1]}' in {text!r}")
    if not pm.passes:
        raise UsageError("pipeline: empty pipeline")
    return pm


def default_pipeline_text(target, prune_ratio: float = 0.0, prune_mode: str | None = None,
                          calib_method: str | None = None, max_drop: float | None = None) -> str:
    """The target's default pipeline, with a prune pass before quantization and channel padding (whose zero
    channels must not count as pruned) when `prune_ratio` > 0, and a fallback-float pass after calibration
    when an accuracy budget `max_drop` is given."""
    pm = parse_pipeline(target.default_pipeline)
    items = [str(p) for p in pm.passes]
    if calib_method:
        items = [f"calibrate{{method={calib_method}}}" if i.split("{")[0] == "calibrate" else i for i in items]
    if prune_ratio > 0:
        mode = prune_mode or target.default_prune_mode
        prune = f"prune{{ratio={prune_ratio!r},mode={mode}}}"
        lossy = [k for k, i in enumerate(items) if i.split("{")[0] in ("align-channels", "insert-qdq", "convert-fp16")]
        items.insert(lossy[0] if lossy else len(items), prune)
    if max_drop is not None:
        calib = [k for k, i in enumerate(items) if i.split("{")[0] == "calibrate"]
        if calib:
            items.insert(calib[0] + 1, f"fallback-float{{max_drop={max_drop!r}}}")
    return ",".join(items)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind is None:
            continue
        if kind == "bad":
            raise UsageError(f"pipeline: unexpected character {m.group(kind)!r} in {text!r}")
        tokens.append((kind, m.group(kind)))
    return tokens


def _parse_list(tokens, pos, text) -> tuple[int, PassManager]:
    pm = PassManager()
    while pos < len(tokens):
        kind, value = tokens[pos]
        if kind != "name":
            raise UsageError(f"pipeline: expected a pass name, got '{value}' in {text!r}")
        pos += 1
        if value == "pipeline" and pos < len(tokens) and tokens[pos][1] == "(":
            pos, inner = _parse_list(tokens, pos + 1, text)
            if pos >= len(tokens) or tokens[pos][1] != ")":
                raise UsageError(f"pipeline: missing ')' in {text!r}")
            pm.add(inner)
            pos += 1
        else:
            options = {}
            if pos < len(tokens) and tokens[pos][1] == "{":
                pos, options = _parse_options(tokens, pos + 1, text, value)
            pm.add(create_pass(value, options))
        if pos < len(tokens) and tokens[pos][1] == ",":
            pos += 1
            continue
        break
    return pos, pm


def _parse_options(tokens, pos, text, pass_name) -> tuple[int, dict]:
    options: dict[str, str] = {}
    while pos < len(tokens) and tokens[pos][1] != "}":
        if pos + 2 >= len(tokens) or tokens[pos][0] != "name" or tokens[pos + 1][1] != "=":
            raise UsageError(f"pipeline: pass '{pass_name}' options must be key=value in {text!r}")
        key = tokens[pos][1]
        pos += 2
        parts = []
        while pos < len(tokens) and tokens[pos][1] not in (",", "}"):
            parts.append(tokens[pos][1].strip('"'))
            pos += 1
        if not parts:
            raise UsageError(f"pipeline: pass '{pass_name}' option '{key}' has no value")
        options[key] = "".join(parts)
        if pos < len(tokens) and tokens[pos][1] == ",":
            pos += 1
    if pos >= len(tokens):
        raise UsageError(f"pipeline: missing '}}' after options of '{pass_name}' in {text!r}")
    return pos + 1, options
