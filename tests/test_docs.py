"""The documentation cannot drift from the code: the site builds with ``mkdocs build --strict``
(broken links, anchors and missing pages fail), the config reference is the one generated from
``S2MoEConfig``'s docstring, the TensorBoard tag table is the trainer's tag list, every doc
reference in the code resolves to a page and heading, and the README stays short."""
import dataclasses
import glob
import os
import re
import subprocess
import sys
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
sys.path.insert(0, os.path.join(ROOT, "tools"))

import config_reference  # noqa: E402


def slugify(text: str) -> str:
    """Python-Markdown's toc slug (what MkDocs uses for heading anchors)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def headings(page: str):
    in_code = False
    for line in open(os.path.join(ROOT, page), encoding="utf-8"):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            yield line.lstrip("#").strip()


# ---- the site ------------------------------------------------------------------------------------
def test_mkdocs_build_strict(tmp_path):
    import importlib.util
    assert importlib.util.find_spec("mkdocs") and importlib.util.find_spec("mkdocstrings"), \
        "the docs extra is missing: pip install -e '.[docs]' (launch_scripts/setup_env.sh installs it)"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f",
                           os.path.join(ROOT, "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "s2moe_aux_loss" in api and "S2MoEConfig" in api  # the API page is generated from docstrings


def test_every_page_is_in_the_nav():
    import yaml
    nav = yaml.safe_load(open(os.path.join(ROOT, "mkdocs.yml")))["nav"]
    listed = {page for item in nav for page in item.values()}
    assert listed == {os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "*.md"))}


# ---- generated config reference -------------------------------------------------------------------
def test_config_reference_table_is_current():
    assert config_reference.stale_pages() == [], "run python tools/config_reference.py --write"


def test_config_reference_refuses_an_undocumented_field():
    @dataclasses.dataclass
    class Cfg:
        """A config.

        Attributes:
            documented: Has a line.
            renamed: A field that no longer exists.
        """
        documented: int = 1
        new_field: float = 0.5

    with pytest.raises(ValueError, match=r"without a line.*\['new_field'\].*not fields: \['renamed'\]"):
        config_reference.table(Cfg)


def test_config_reference_rows_carry_the_code_defaults():
    from s2moe_dist.config import S2MoEConfig
    text = config_reference.table(S2MoEConfig)
    assert "| `drop_tokens` | `bool` | `False` |" in text and "| `hidden_size` | `int` | required |" in text
    assert text.count("\n| `") == len(dataclasses.fields(S2MoEConfig))


# ---- TensorBoard tags ------------------------------------------------------------------------------
def _table_tags(text: str):
    return set(re.findall(r"^\| `((?:train|eval|moe)/[^`]+)` \|", text, re.M))


def test_tensorboard_tag_table_is_the_trainers_tag_list():
    from s2moe_dist.train import metrics
    code = set(metrics.all_tags(eval_k=["{K}"], moe_blocks=["{i}"], moe_type="s2moe"))
    training = open(os.path.join(DOCS, "training.md"), encoding="utf-8").read()
    section = training.split("## TensorBoard tags", 1)[1].split("\n## ", 1)[0]
    documented = _table_tags(section)
    assert documented - code == set(), "documented tags the trainer does not write"
    everywhere = set().union(*(_table_tags(open(p, encoding="utf-8").read())
                               for p in glob.glob(os.path.join(DOCS, "*.md"))))
    assert code - everywhere == set(), "tags the trainer writes that no docs table lists"


# ---- doc references in the code ----------------------------------------------------------------------
REF = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+)|(?: section)? (\d+(?:\.\d+)*)\b)?")
CODE_GLOBS = ("s2moe_dist/**/*.py", "configs/**/*.yaml", "launch_scripts/*", "slurm/*", "tools/*.py")


def _code_files():
    for pattern in CODE_GLOBS:
        yield from (p for p in glob.glob(os.path.join(ROOT, pattern), recursive=True) if os.path.isfile(p))


def test_doc_references_in_the_code_resolve():
    bad, seen = [], 0
    for path in _code_files():
        text = open(path, encoding="utf-8", errors="replace").read()
        rel = os.path.relpath(path, ROOT)
        for stale in re.findall(r"(?<!docs/)\bDESIGN\.md|\bREADME_\w+", text):
            bad.append(f"{rel}: {stale} (no such document; cite docs/<page>.md)")
        for m in REF.finditer(text):
            seen += 1
            page, anchor, number = m.groups()
            if not os.path.isfile(os.path.join(DOCS, page)):
                bad.append(f"{rel}: {m.group(0)}: no page docs/{page}")
                continue
            heads = list(headings(os.path.join("docs", page)))
            if anchor and anchor not in {slugify(h) for h in heads}:
                bad.append(f"{rel}: {m.group(0)}: no heading with anchor #{anchor} in docs/{page}")
            if number and not any(re.match(re.escape(number) + r"\.?\s", h) for h in heads):
                bad.append(f"{rel}: {m.group(0)}: no section {number} in docs/{page}")
    assert not bad, "\n".join(bad)
    assert seen >= 10  # the modules cite the design sections and the operations page


def test_reference_check_catches_a_missing_section():
    heads = list(headings("docs/design.md"))
    assert any(h.startswith("1.6 ") for h in heads) and not any(h.startswith("1.9") for h in heads)
    assert slugify("A rank dies or hangs: collective timeout") == "a-rank-dies-or-hangs-collective-timeout"


# ---- README ----------------------------------------------------------------------------------------------
def test_readme_is_short_and_keeps_the_two_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.encode("utf-8")) <= 10 * 1024
    assert "bash launch_scripts/quickstart.sh" in text and "bash launch_scripts/test.sh" in text
    assert "sbatch slurm/pretrain.sbatch" in text and "mkdocs serve" in text
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", text):
        assert os.path.isfile(os.path.join(ROOT, link)), link
