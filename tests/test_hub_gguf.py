"""`verm-local pull hf.co/USER/REPO[:QUANT]` (issue 35) against the hub look-alike, with
repositories laid out as the community lays them out: `Visual-ERM.Q4_K_M.gguf`,
`Visual-ERM.mmproj-f16.gguf`, a README, several quants, a split model; a repository of
another architecture, a tag that matches nothing, an ambiguous tag, a file whose bytes
do not match the hub's sha256, a download dropped halfway, another source already in the
store."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from verm_local.errors import FetchError, InputError, ModelError
from verm_local.fileio import read_manifest, sha256_file
from verm_local.hub_gguf import HubRef, choose_mmproj, choose_model, parse_ref, pull_gguf

from .conftest import run_cli, run_here
from .hubserver import Hub, Repo, start

COMMUNITY = "community/Visual-ERM-GGUF"


# ---------------------------------------------------------------- names (pure)


def test_references_parse_as_ollama_and_llama_cpp_write_them():
    assert parse_ref("gguf-q4_k_m") is None and parse_ref("auto") is None
    assert parse_ref("hf.co/a/b:Q4_K_M") == HubRef("a/b", "Q4_K_M")
    assert parse_ref("https://huggingface.co/a/b-GGUF") == HubRef("a/b-GGUF", None)
    assert parse_ref("a/b:q8_0") == HubRef("a/b", "q8_0")
    with pytest.raises(InputError):
        parse_ref("hf.co/not-a-repo")
    with pytest.raises(InputError):
        parse_ref("hf.co/a/b:Q4 K")


def test_tags_pick_files_as_llama_cpp_does():
    names = [
        "README.md",
        "Visual-ERM.Q4_K_M.gguf",
        "Visual-ERM.Q4_K_S.gguf",
        "Visual-ERM.IQ4_XS.gguf",
        "Visual-ERM-Q8_0-00001-of-00002.gguf",
        "Visual-ERM-Q8_0-00002-of-00002.gguf",
        "Visual-ERM.mmproj-f16.gguf",
        "Visual-ERM.mmproj-Q8_0.gguf",
        "Visual-ERM.imatrix.gguf",
    ]
    assert choose_model(names, "q4_k_m") == ["Visual-ERM.Q4_K_M.gguf"]
    assert choose_model(names, "IQ4_XS") == ["Visual-ERM.IQ4_XS.gguf"]
    assert choose_model(names, "Q8_0") == names[4:6]  # the split parts, in order
    with pytest.raises(InputError, match="no file matches the tag Q4_K;.*Q4_K_M, Q4_K_S"):
        choose_model(names, "Q4_K")  # not a prefix of Q4_K_M or Q4_K_S
    with pytest.raises(InputError, match="matches 2 models"):
        choose_model(["a.Q4_K_M.gguf", "b.Q4_K_M.gguf"], "Q4_K_M")
    with pytest.raises(ModelError, match="1 of its 2 split parts"):
        choose_model(names[4:5], "Q8_0")
    assert choose_mmproj(names) == "Visual-ERM.mmproj-f16.gguf"
    assert choose_mmproj(names, "q8_0") == "Visual-ERM.mmproj-Q8_0.gguf"
    with pytest.raises(InputError, match="no mmproj of quant BF16"):
        choose_mmproj(names, "bf16")
    with pytest.raises(ModelError, match="no mmproj"):
        choose_mmproj(names[:3])


# ---------------------------------------------------------------- against the hub


def _other_architecture(path: Path) -> Path:
    """A small GGUF of another architecture (llama), as gguf-py writes one."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def split_q8(tiny_hf, tmp_path_factory) -> Path:
    """The tiny model as a Q8_0 split in parts of 30 tensors by llama.cpp's own converter
    (`--split-max-tensors`), as split GGUFs are published."""
    from verm_local.convert.llama_sources import llama_cpp_dir
    from verm_local.settings import child_env

    src = llama_cpp_dir()
    out = tmp_path_factory.mktemp("split") / "Visual-ERM-Q8_0.gguf"
    proc = subprocess.run(
        [sys.executable, str(src / "convert_hf_to_gguf.py"), str(tiny_hf), "--outfile", str(out),
         "--outtype", "q8_0", "--split-max-tensors", "30"],
        env=child_env(PYTHONPATH=str(src / "gguf-py")), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    parts = sorted(out.parent.glob("Visual-ERM-Q8_0-*-of-*.gguf"))
    assert len(parts) >= 2, list(out.parent.iterdir())
    return out.parent


@pytest.fixture(scope="module")
def hub(tiny_gguf, split_q8, tmp_path_factory):
    t = tiny_gguf
    h = Hub()

    def repo(name: str, files: dict[str, bytes]) -> None:
        h.repos[name] = Repo(files, hashlib.sha1(name.encode()).hexdigest())

    q4, q8 = (t / "model-Q4_K_M.gguf").read_bytes(), (t / "model-Q8_0.gguf").read_bytes()
    mm = (t / "mmproj-f16.gguf").read_bytes()
    readme = b"# Visual-ERM GGUF\nQuantized by the community.\n"
    repo(COMMUNITY, {
        "README.md": readme,
        "Visual-ERM.Q4_K_M.gguf": q4,
        "Visual-ERM.Q8_0.gguf": q8,
        "Visual-ERM.mmproj-f16.gguf": mm,
        "Visual-ERM.mmproj-q8_0.gguf": mm,
    })  # fmt: skip
    repo("other/Visual-ERM-GGUF", {"visual-erm-q4_k_m.gguf": q4, "mmproj-visual-erm-f16.gguf": mm})
    repo("other/twins-GGUF", {"a.Q4_K_M.gguf": q4, "b.Q4_K_M.gguf": q4, "mmproj-f16.gguf": mm})
    split = {p.name: p.read_bytes() for p in sorted(split_q8.glob("*-of-*.gguf"))}
    repo("community/split-GGUF", {**split, "mmproj-F16.gguf": mm})
    llama = _other_architecture(tmp_path_factory.mktemp("llama") / "x.gguf").read_bytes()
    repo("someone/Llama-GGUF", {"Llama.Q4_K_M.gguf": llama, "mmproj-f16.gguf": mm})
    server, h = start(h)
    yield h
    server.shutdown()


@pytest.fixture
def home(hub, tmp_path):
    hub.log.clear()
    hub.drop_once.clear()
    hub.corrupt.clear()
    return tmp_path / "home"


def _pull(hub, home, ref: str, **kw):
    return pull_gguf(parse_ref(ref), plan_quant="Q4_K_M", endpoint=hub.url, home=home, **kw)


def test_a_community_repository_is_pulled_verified_and_recorded(hub, home, tiny_gguf):
    path = _pull(hub, home, f"hf.co/{COMMUNITY}:q4_k_m")
    assert path.name == "gguf-q4_k_m"
    assert sorted(p.name for p in path.iterdir()) == [
        "Visual-ERM.Q4_K_M.gguf", "Visual-ERM.mmproj-f16.gguf", "manifest.json"
    ]  # fmt: skip
    assert not hub.gets("Visual-ERM.Q8_0.gguf") and not hub.gets("Visual-ERM.mmproj-q8_0.gguf")
    m = read_manifest(path)
    src = m["store"]
    assert src["repository"] == COMMUNITY and len(src["revision"]) == 40
    assert src["files"]["Visual-ERM.Q4_K_M.gguf"] == sha256_file(tiny_gguf / "model-Q4_K_M.gguf")
    assert src["shape"] == "test shape tiny" and src["source"].startswith(f"hf.co/{COMMUNITY}:")
    from verm_local.modelref import resolve_model

    resolved = resolve_model(path)
    assert resolved.quant == "Q4_K_M" and resolved.mmproj.name == "Visual-ERM.mmproj-f16.gguf"
    # Again: found verified, nothing downloaded.
    hub.log.clear()
    assert _pull(hub, home, f"{COMMUNITY}:Q4_K_M") == path
    assert not [e for e in hub.log if "/resolve/" in e[1]]
    # Without a tag: the plan's quant (Q4_K_M here); --mmproj-quant picks the projector.
    q8 = _pull(hub, home, f"hf.co/{COMMUNITY}:Q8_0", mmproj_quant="q8_0")
    assert read_manifest(q8)["mmproj"] == "Visual-ERM.mmproj-q8_0.gguf"


def test_another_source_is_not_replaced_without_force(hub, home):
    first = _pull(hub, home, f"hf.co/{COMMUNITY}")
    before = read_manifest(first)["store"]
    with pytest.raises(ModelError, match="from hf.co/community/Visual-ERM-GGUF.*--force"):
        _pull(hub, home, "hf.co/other/Visual-ERM-GGUF:Q4_K_M")
    assert read_manifest(first)["store"] == before  # untouched
    again = _pull(hub, home, "hf.co/other/Visual-ERM-GGUF:Q4_K_M", force=True)
    assert read_manifest(again)["store"]["repository"] == "other/Visual-ERM-GGUF"
    assert sorted(p.name for p in again.iterdir()) == [
        "manifest.json", "mmproj-visual-erm-f16.gguf", "visual-erm-q4_k_m.gguf"
    ]  # fmt: skip


def test_refusals_store_nothing(hub, home):
    with pytest.raises(ModelError, match="architecture 'llama'"):
        _pull(hub, home, "hf.co/someone/Llama-GGUF:Q4_K_M")
    # Refused on the header read from the hub: the model was never downloaded whole.
    assert all(e[2].startswith("bytes=0-") for e in hub.gets("Llama.Q4_K_M.gguf"))
    with pytest.raises(InputError, match="no file matches the tag IQ2_XXS.*Q4_K_M, Q8_0"):
        _pull(hub, home, f"hf.co/{COMMUNITY}:IQ2_XXS")
    with pytest.raises(InputError, match="matches 2 models"):
        _pull(hub, home, "hf.co/other/twins-GGUF:Q4_K_M")
    hub.corrupt.add("Visual-ERM.Q4_K_M.gguf")
    with pytest.raises(FetchError, match="integrity check failed"):
        _pull(hub, home, f"hf.co/{COMMUNITY}:Q4_K_M")
    assert not (home / "gguf-q4_k_m").exists()
    assert not [p for p in home.rglob("*.gguf") if ".staging" not in p.parts]


def test_a_dropped_download_resumes(hub, home, tiny_gguf):
    name = "Visual-ERM.Q4_K_M.gguf"
    hub.drop_once[name] = 25_000_000
    path = _pull(hub, home, f"hf.co/{COMMUNITY}:Q4_K_M")
    full = [e for e in hub.gets(name) if not e[2].startswith("bytes=0-")]
    assert len(full) == 2 and 0 < int(full[1][2].removeprefix("bytes=").split("-")[0])
    assert sha256_file(path / name) == sha256_file(tiny_gguf / "model-Q4_K_M.gguf")


@pytest.mark.slow
def test_cli_pull_then_judge_and_the_errors(hub, tmp_path, pair):
    """The whole flow as a user runs it (the pulls and the first judgement through the
    console script): a split model pulled by tag, listed with its source, judged by
    `--variant`; the plan's quant judged with no flag; the refusals as one line each with
    their exit codes."""
    env = {
        "HF_ENDPOINT": hub.url, "VERM_LOCAL_HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf"),
    }  # fmt: skip
    proc = run_cli("pull", "hf.co/community/split-GGUF:Q8_0", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stored = Path(proc.stdout.strip())
    assert len(list(stored.glob("Visual-ERM-Q8_0-*-of-*.gguf"))) >= 2
    proc = run_cli("pull", f"hf.co/{COMMUNITY}", "--no-check", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(run_here("models", "--json", env=env).stdout)
    assert {r["variant"]: r["source"].split("@")[0] for r in rows} == {
        "gguf-q4_k_m": f"hf.co/{COMMUNITY}:Q4_K_M",
        "gguf-q8_0": "hf.co/community/split-GGUF:Q8_0",
    }
    gt, pred = pair
    flags = ["--json", "--max-tokens", "120", "--image-tokens", "64"]
    proc = run_cli("judge", gt, pred, "--variant", "gguf-q8_0", *flags, env=env)
    assert proc.returncode in (0, 7), proc.stderr[-2000:]
    assert json.loads(proc.stdout)["model"]["quant"] == "Q8_0"
    proc = run_here("judge", gt, pred, *flags, env=env)  # the plan's quant: Q4_K_M
    assert proc.returncode in (0, 7), proc.stderr[-2000:]
    doctor = json.loads(run_here("doctor", "--json", env=env).stdout)
    assert doctor["store"]["source"].startswith(f"hf.co/{COMMUNITY}:Q4_K_M@")
    for args, code, words in (
        (["hf.co/someone/Llama-GGUF:Q4_K_M"], 3, ("architecture 'llama'",)),
        ([f"hf.co/{COMMUNITY}:IQ2_XXS"], 2, ("IQ2_XXS", "Q4_K_M, Q8_0")),
        (["hf.co/other/Visual-ERM-GGUF:Q4_K_M"], 3, ("--force",)),
    ):
        proc = run_here("pull", *args, env=env)  # the same refusals in-process: no start-up
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("verm-local: error")]
        assert proc.returncode == code and len(errors) == 1, proc.stderr[-2000:]
        assert all(w in errors[0] for w in words), errors[0]
        assert "Traceback" not in proc.stderr
