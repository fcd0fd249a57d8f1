"""The CUDA kernels' activation codes are the package's: the C++ `enum Activation` in csrc/ is
parsed from the header source (no build needed) and checked against
llm_adapters._numerics.ACTIVATION_CODES, the one table every backend passes codes from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llm_adapters._numerics import ACTIVATION_CODES, ACTIVATIONS

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_ENUM = re.compile(r"\benum\s+Activation\b[^{;]*\{([^}]*)\}", re.S)
_ENUMERATOR = re.compile(r"^k([A-Z][A-Za-z0-9]*)\s*=\s*(\d+)$")


def _csrc_files() -> list[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cuh", ".cu", ".cpp", ".h"))


def parse_activation_enum(source: str) -> dict[str, int]:
    """{name: code} of the `enum Activation` in C++ `source`, names as in Python (kGelu -> gelu).
    Every enumerator must have an explicit value: an implicit one would let the codes shift
    silently when an activation is inserted."""
    found = _ENUM.findall(source)
    if len(found) != 1:
        raise ValueError(f"expected one `enum Activation {{...}}`, found {len(found)}")
    body = re.sub(r"//[^\n]*|/\*.*?\*/", "", found[0], flags=re.S)
    codes: dict[str, int] = {}
    for item in (part.strip() for part in body.split(",")):
        if not item:
            continue
        match = _ENUMERATOR.match(item)
        if match is None:
            raise ValueError(f"enumerator {item!r} is not of the form kName = <integer>")
        name = match.group(1).lower()
        if name in codes:
            raise ValueError(f"enumerator k{match.group(1)} appears twice")
        codes[name] = int(match.group(2))
    return codes


def _enum_source() -> tuple[Path, str]:
    hits = [(p, p.read_text()) for p in _csrc_files()]
    hits = [(p, text) for p, text in hits if _ENUM.search(text)]
    assert len(hits) == 1, (
        "exactly one file in csrc/ defines enum Activation, found: "
        f"{[p.name for p, _ in hits]}"
    )
    return hits[0]


def test_cuda_activation_enum_matches_numerics():
    path, source = _enum_source()
    codes = parse_activation_enum(source)
    assert codes == ACTIVATION_CODES, (
        f"{path.name}: enum Activation {codes} differs from "
        f"llm_adapters._numerics.ACTIVATION_CODES {ACTIVATION_CODES}"
    )


def test_cuda_activation_check_covers_the_table():
    """ops.cpp rejects codes outside the table: its bounds are the first and last enumerator and
    its message lists the names in code order."""
    source = (CSRC / "ops.cpp").read_text()
    first, last = ACTIVATIONS[0].capitalize(), ACTIVATIONS[-1].capitalize()
    assert re.search(rf"act >= k{first} && act <= k{last}\b", source), (
        f"ops.cpp: check_activation must accept exactly k{first}..k{last}"
    )
    message = re.search(r"expected (\d+)\.\.(\d+): ([a-z, ]+)\)", source)
    assert message is not None, "ops.cpp: check_activation's message lists the codes"
    lo, hi, names = int(message.group(1)), int(message.group(2)), message.group(3)
    assert (lo, hi) == (min(ACTIVATION_CODES.values()), max(ACTIVATION_CODES.values()))
    assert tuple(n.strip() for n in names.split(",")) == ACTIVATIONS


def test_enum_parser_sees_a_mismatch():
    """The parser reads values, not positions: a swapped or implicit code is caught."""
    good = "enum Activation : int { kIdentity = 0, kTanh = 1, kRelu = 2, kGelu = 3, kSilu = 4 };"
    assert parse_activation_enum(good) == ACTIVATION_CODES
    swapped = good.replace("kGelu = 3, kSilu = 4", "kSilu = 3, kGelu = 4")
    assert parse_activation_enum(swapped) != ACTIVATION_CODES
    with pytest.raises(ValueError, match="kName = <integer>"):
        parse_activation_enum(good.replace("kRelu = 2", "kRelu"))
    with pytest.raises(ValueError, match="appears twice"):
        parse_activation_enum(good.replace("kSilu = 4", "kTanh = 4"))
    with pytest.raises(ValueError, match="found 0"):
        parse_activation_enum("enum Other { kA = 0 };")


def test_build_lists_every_included_header():
    """Every header a csrc/ file includes is in the build's header list (setup.py's depends),
    so editing it rebuilds the extension; every listed file exists."""
    from llm_adapters import _cuda_build

    listed = {Path(p).name for p in _cuda_build.headers()}
    assert {Path(p).name for p in _cuda_build.sources()} == {"ops.cpp", "kernels.cu"}
    included = {
        name
        for path in _csrc_files()
        for name in re.findall(r'^\s*#include\s+"([^"]+)"', path.read_text(), re.M)
    }
    assert included, "no local #include found in csrc/"
    assert included <= listed, f"headers missing from _cuda_build.headers(): {included - listed}"
    assert all((CSRC / name).is_file() for name in listed)
