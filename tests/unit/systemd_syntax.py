"""How systemd reads a command line back into argv, written from systemd.syntax(7) and systemd.service(5).

An independent reader for the tests (not the project's quoting code): specifiers are expanded on the
whole line first (`%%` → `%`, `%N` → the unit name without `.service`), then words are split on whitespace with double
or single quotes and C-style escapes (`\\n`, `\\xHH`, `\\s`, …), then `$$` → `$` and any other `$NAME`
would be an environment substitution (reported, since gpufleet never means one).
"""

from __future__ import annotations

import re

_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
           '"': '"', "'": "'", "s": " "}


def _specifiers(line: str, unit: str) -> str:
    out, i = [], 0
    while i < len(line):
        c = line[i]
        if c == "%":
            nxt = line[i + 1 : i + 2]
            if nxt == "%":
                out.append("%")
            elif nxt == "N":
                out.append(unit)
            else:
                raise ValueError(f"specifier %{nxt} in {line!r}")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _escape(s: str, i: int) -> tuple[str, int]:
    c = s[i]
    if c in _SIMPLE:
        return _SIMPLE[c], i + 1
    if c == "x":
        value = int(s[i + 1 : i + 3], 16)
        if value > 0x7F:
            raise ValueError("\\x above 7f is a raw byte, not a character")
        return chr(value), i + 3
    if c == "u":
        return chr(int(s[i + 1 : i + 5], 16)), i + 5
    if c == "U":
        return chr(int(s[i + 1 : i + 9], 16)), i + 9
    if c in "01234567":
        return chr(int(s[i : i + 3], 8)), i + 3
    raise ValueError(f"bad escape \\{c}")


def _dollars(word: str) -> str:
    if re.search(r"\$(?!\$)(\{|[A-Za-z_])", word.replace("$$", "")):
        raise ValueError(f"environment substitution in {word!r}")
    return word.replace("$$", "$")


def split_command(line: str, unit: str = "u.service") -> list[str]:
    """argv of an `ExecStart=` value (the part after `=`, without a `-@+!` prefix)."""
    if "\n" in line:
        raise ValueError("a raw newline ends the setting")
    s = _specifiers(line, unit.removesuffix(".service"))  # %N: the unit name without its type suffix
    words: list[str] = []
    i = 0
    while i < len(s):
        if s[i] in " \t":
            i += 1
            continue
        cur: list[str] = []
        quote = ""
        while i < len(s):
            c = s[i]
            if quote:
                if c == quote:
                    quote = ""
                    i += 1
                elif c == "\\":
                    ch, i = _escape(s, i + 1)
                    cur.append(ch)
                else:
                    cur.append(c)
                    i += 1
            elif c in "\"'":
                quote = c
                i += 1
            elif c == "\\":
                ch, i = _escape(s, i + 1)
                cur.append(ch)
            elif c in " \t":
                break
            else:
                cur.append(c)
                i += 1
        if quote:
            raise ValueError(f"unterminated quote in {line!r}")
        words.append(_dollars("".join(cur)))
    return words
