"""Every "§n" the repository cites names a section of docs/design.md, the design that the code,
csrc/ and the README refer to (its numbers are stable)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"
CITED = re.compile(r"§\s*(\d+(?:\.\d+)?)")


def design_sections() -> set[str]:
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", DESIGN.read_text(), flags=re.MULTILINE)
    return set(headings)


def repository_lines():
    """(file:line, text) of the text files git tracks (and new ones it does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".cu", ".h", ".cpp", ".sh", ".toml", ".yaml") and path.is_file():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                yield f"{name}:{number}", line


def cited_sections() -> dict[str, list[str]]:
    """{section: [file:line, ...]} of every "§n" in the repository."""
    cited: dict[str, list[str]] = {}
    for where, line in repository_lines():
        for section in CITED.findall(line):
            cited.setdefault(section, []).append(where)
    return cited


def test_every_cited_section_exists():
    sections = design_sections()
    assert {"1.2", "1.3", "1.4", "2", "2.1", "5", "6", "7", "8"} <= sections
    cited = cited_sections()
    assert cited, "no § reference found: the scan is broken"
    missing = {s: where for s, where in cited.items() if s not in sections}
    assert not missing, f"sections cited but not in docs/design.md: {missing}"


STALE = "DESIGN" + " §"  # spelled in two parts so that this file does not match itself


def test_references_name_the_design_in_the_repository():
    """References of the form DESIGN-section pointed at a specification outside the repository."""
    stale = [where for where, line in repository_lines() if STALE in line]
    assert not stale, f"cite docs/design.md instead: {stale}"
