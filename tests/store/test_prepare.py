"""Model store preparation: random Paraformer builder, model directory validators and the
twopass-prepare-models CLI (offline behaviour, random store, idempotency, local dirs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from twopass_asr.audio import pcm16_to_float
from twopass_asr.first_pass.options import DEFAULT_STEP_SAMPLES as CHUNK_SAMPLES
from twopass_asr.store import model_store, prepare
from twopass_asr.store.model_store import ModelDirError
from twopass_asr.store.random_paraformer import SIZES, build_random_paraformer, token_list

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_paraformer(tmp_path_factory) -> Path:
    return build_random_paraformer(tmp_path_factory.mktemp("paraformer") / "tiny", "tiny", seed=0)


def load_state(model_dir: Path) -> dict:
    return torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)


def test_tiny_paraformer_is_deterministic_by_seed(tiny_paraformer, tmp_path):
    reference = load_state(tiny_paraformer)
    same = load_state(build_random_paraformer(tmp_path / "same", "tiny", seed=0))
    other = load_state(build_random_paraformer(tmp_path / "other", "tiny", seed=1))

    assert reference.keys() == same.keys()
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert any(not torch.equal(reference[k], other[k]) for k in reference if reference[k].is_floating_point())
    for name in ("config.yaml", "tokens.json", "am.mvn", "configuration.json"):
        assert (tiny_paraformer / name).read_bytes() == (tmp_path / "same" / name).read_bytes()


def test_tiny_paraformer_files_match_the_real_layout(tiny_paraformer):
    from funasr.frontends.wav_frontend import load_cmvn

    tokens = json.loads((tiny_paraformer / "tokens.json").read_text(encoding="utf-8"))
    assert tokens[:3] == ["<blank>", "<s>", "</s>"] and tokens[-1] == "<unk>"
    assert len(tokens) == SIZES["tiny"].vocab_size == len(set(tokens))
    metas = json.loads((tiny_paraformer / "configuration.json").read_text())["file_path_metas"]
    assert metas == {"init_param": "model.pt", "config": "config.yaml",
                     "tokenizer_conf": {"token_list": "tokens.json"}, "frontend_conf": {"cmvn_file": "am.mvn"}}
    cmvn = load_cmvn(str(tiny_paraformer / "am.mvn"))  # FunASR's own parser
    assert tuple(cmvn.shape) == (2, 80 * 7)
    # Shift is minus a log-mel mean (negative), scale an inverse std (positive).
    assert (cmvn[0] < 0).all() and (cmvn[1] > 0).all()


def test_tiny_paraformer_streams_text_through_funasr(tiny_paraformer, speech_wav):
    from funasr import AutoModel

    model = AutoModel(model=str(tiny_paraformer), disable_update=True, disable_pbar=True, disable_log=True,
                      ncpu=1)
    audio = pcm16_to_float(speech_wav.pcm)

    def stream() -> list[str]:
        cache: dict = {}
        texts = []
        for start in range(0, len(audio), CHUNK_SAMPLES):
            result = model.generate(input=audio[start:start + CHUNK_SAMPLES], cache=cache,
                                    is_final=start + CHUNK_SAMPLES >= len(audio), chunk_size=[0, 10, 5],
                                    encoder_chunk_look_back=4, decoder_chunk_look_back=1)
            texts.append(result[0]["text"] if result else "")
        return texts

    first, second = stream(), stream()
    assert first == second, "identical audio must decode identically (no dither, fixed weights)"
    with_text = [t for t in first if t]
    assert len(with_text) >= len(first) // 2, f"the CIF predictor fired in too few chunks: {first}"
    vocabulary = set(token_list(SIZES["tiny"].vocab_size)[3:-1])
    assert set("".join(with_text).replace(" ", "")) <= vocabulary


def test_paraformer_validator_names_missing_file(tiny_paraformer, tmp_path):
    broken = shutil.copytree(tiny_paraformer, tmp_path / "no_tokens")
    (broken / "tokens.json").unlink()
    with pytest.raises(ModelDirError, match=r"no_tokens has no tokens\.json"):
        model_store.validate_paraformer_dir(broken)


def test_paraformer_validator_names_wrong_shaped_tensor(tiny_paraformer, tmp_path):
    broken = shutil.copytree(tiny_paraformer, tmp_path / "bad_shape")
    state = load_state(broken)
    name = "decoder.output_layer.weight"
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    torch.save(state, broken / "model.pt")
    with pytest.raises(ModelDirError, match=rf"tensor {name} has shape \[405, 64\] but config.yaml builds \[404, 64\]"):
        model_store.validate_paraformer_dir(broken)


def test_paraformer_validator_names_missing_tensor_and_cmvn_mismatch(tiny_paraformer, tmp_path):
    broken = shutil.copytree(tiny_paraformer, tmp_path / "no_tensor")
    state = load_state(broken)
    del state["predictor.cif_output.bias"]
    torch.save(state, broken / "model.pt")
    with pytest.raises(ModelDirError, match=r"lack tensor predictor\.cif_output\.bias"):
        model_store.validate_paraformer_dir(broken)

    narrow = shutil.copytree(tiny_paraformer, tmp_path / "narrow_mvn")
    shift, scale = model_store.read_cmvn(narrow / "am.mvn")
    from twopass_asr.store.random_paraformer import write_am_mvn

    write_am_mvn(narrow / "am.mvn", shift[:400], scale[:400])
    with pytest.raises(ModelDirError, match=r"am\.mvn has 400 dimensions but .* produces 560"):
        model_store.validate_paraformer_dir(narrow)


def test_vad_validator_accepts_real_vad_and_names_missing_weights(tmp_path):
    real = model_store.bundled_vad_dir()
    model_store.validate_vad_dir(real)
    broken = shutil.copytree(real, tmp_path / "vad")
    (broken / "model.pt").unlink()
    with pytest.raises(ModelDirError, match=r"VAD model directory .*vad has no model\.pt"):
        model_store.validate_vad_dir(broken)


@pytest.mark.parametrize("hub,host", [("ms", "modelscope"), ("hf", "huggingface")])
def test_download_without_network_fails_before_the_hub_client_with_guidance(tmp_path, hub, host):
    """Offline, the answer comes from prepare's own bounded probe of the hub, before the hub's
    client is asked for anything (its retries take minutes), and says what to do instead."""
    address = prepare.hub_address(hub)
    if prepare.probe(*address) is None:
        pytest.skip(f"{host} is reachable from this machine; the offline path cannot be exercised")
    run = subprocess.run([sys.executable, "-m", "twopass_asr.store.prepare", "--store", str(tmp_path), "--hub", hub],
                         capture_output=True, text=True, timeout=120)

    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"cannot reach {prepare.HUB_NAMES[hub]} at {address[0]}:{address[1]} (" in errors[0], errors[0]
    assert "failed:" not in run.stderr, "the hub's client was asked to download"
    for hint in ("cannot reach", host, "--paraformer-dir", "--nano-dir", "--random tiny|full", "--fallback-random"):
        assert hint in errors[0], f"{hint!r} missing from: {errors[0]}"
    assert not (tmp_path / model_store.PARAFORMER).exists()


def model_files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_random_tiny_store_is_valid_and_idempotent(tmp_path, capsys):
    store = tmp_path / "store"
    assert prepare.main(["--store", str(store), "--random", "tiny", "--seed", "3"]) == 0
    manifest = model_store.read_manifest(store)
    assert manifest[model_store.VAD]["source"] == "real"
    for name in (model_store.PARAFORMER, model_store.NANO):
        assert manifest[name]["source"] == "random-tiny" and manifest[name]["seed"] == 3
        assert not (store / f".partial-{name}").exists()
    model_store.validate_vad_dir(store / model_store.VAD)
    model_store.validate_paraformer_dir(store / model_store.PARAFORMER)
    prepare.validate_nano_dir(store / model_store.NANO)
    before = model_files(store)
    capsys.readouterr()

    assert prepare.main(["--store", str(store), "--random", "tiny", "--seed", "3"]) == 0
    assert model_files(store) == before
    err = capsys.readouterr().err
    assert err.count("up to date") == 2 and "vad: kept as it is" in err

    # Offline, --fallback-random asks for exactly what the store holds: loud warning, no rebuild.
    if prepare.probe(*prepare.hub_address("ms")) is not None:
        assert prepare.main(["--store", str(store), "--fallback-random", "tiny", "--seed", "3"]) == 0
        assert "MEANINGLESS" in capsys.readouterr().err
        assert model_files(store) == before

    # A different seed rebuilds only the random models.
    assert prepare.main(["--store", str(store), "--random", "tiny", "--seed", "4"]) == 0
    assert model_store.read_manifest(store)[model_store.PARAFORMER]["seed"] == 4
    err = capsys.readouterr().err
    assert "up to date" not in err and "vad: kept as it is" in err


def test_local_directories_are_validated_and_linked(tiny_paraformer, tmp_path, capsys):
    store = tmp_path / "store"
    broken = shutil.copytree(tiny_paraformer, tmp_path / "broken")
    (broken / "am.mvn").unlink()
    assert prepare.main(["--store", str(store), "--paraformer-dir", str(broken), "--random", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.strip().endswith(f"Paraformer model directory {broken} has no am.mvn"), err
    assert "Traceback" not in err

    assert prepare.main(["--store", str(store), "--paraformer-dir", str(tiny_paraformer),
                         "--vad-dir", str(model_store.bundled_vad_dir()), "--random", "tiny"]) == 0
    linked = store / model_store.PARAFORMER
    assert linked.is_symlink() and linked.resolve() == tiny_paraformer.resolve()
    entry = model_store.read_manifest(store)[model_store.PARAFORMER]
    assert prepare.source_of(entry) == {"source": "local", "path": str(tiny_paraformer.resolve()), "mode": "symlink"}
    np.testing.assert_array_equal(
        model_store.read_cmvn(store / model_store.VAD / "am.mvn")[0],
        model_store.read_cmvn(model_store.bundled_vad_dir() / "am.mvn")[0],
    )


# ---------------------------------------------------------------- what a store holds is kept


def hub_reachable() -> bool:
    return prepare.probe(*prepare.hub_address("ms")) is None


@pytest.fixture(scope="module")
def user_models(tmp_path_factory) -> Path:
    """A user's own Paraformer and Nano directories (seed 7, unlike anything prepare builds
    by default)."""
    root = tmp_path_factory.mktemp("user_models")
    assert prepare.main(["--store", str(root), "--random", "tiny", "--seed", "7"]) == 0
    return root


def store_snapshot(root: Path) -> dict:
    """Every file (content hash and mtime) and link of a store, and its manifest."""
    import hashlib

    files = {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
             for p in root.rglob("*") if p.is_file()}
    links = {str(p.relative_to(root)): str(p.readlink()) for p in root.iterdir() if p.is_symlink()}
    return {"files": files, "links": links, "manifest": model_store.read_manifest(root)}


def serve_prepare_step(store: Path) -> subprocess.CompletedProcess:
    """What `serve --store STORE` runs before starting tritonserver, with its defaults."""
    from twopass_asr.serving.serve import parse_args, prepare_command

    return subprocess.run(prepare_command(parse_args(["--store", str(store)])), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("mode", ["copy", "symlink"])
def test_serve_keeps_the_models_a_user_prepared(user_models, tmp_path, mode):
    store = tmp_path / "store"
    copy = ["--copy"] if mode == "copy" else []
    assert prepare.main(["--store", str(store), "--paraformer-dir", str(user_models / model_store.PARAFORMER),
                         "--nano-dir", str(user_models / model_store.NANO), *copy]) == 0
    before = store_snapshot(store)

    run = serve_prepare_step(store)
    assert run.returncode == 0, run.stderr
    assert store_snapshot(store) == before
    for name in (model_store.PARAFORMER, model_store.NANO):
        path = (user_models / name).resolve()
        assert before["manifest"][name]["source"] == "local" and before["manifest"][name]["path"] == str(path)
        assert f"{name}: local {path} ({mode})" in run.stderr, run.stderr
        assert ((store / name).resolve() == path) == (mode == "symlink")
    assert "RANDOM" not in run.stderr


def test_serve_keeps_random_full_models(user_models, tmp_path):
    """A store made with --random full is not rebuilt as serve's default tiny fallback.
    Stand-in: tiny weights recorded as random-full, as building full-size ones takes minutes."""
    store = shutil.copytree(user_models, tmp_path / "store", symlinks=True)
    manifest = model_store.read_manifest(store)
    for name in (model_store.PARAFORMER, model_store.NANO):
        manifest[name]["source"] = "random-full"
    model_store.write_manifest(store, manifest)
    before = store_snapshot(store)

    run = serve_prepare_step(store)
    assert run.returncode == 0, run.stderr
    assert store_snapshot(store) == before
    assert f"{model_store.PARAFORMER}: random-full seed 7" in run.stderr
    assert "RANDOM-WEIGHT models for paraformer_streaming, funasr_nano" in run.stderr


def test_only_a_missing_entry_is_filled(user_models, tmp_path):
    if hub_reachable():
        pytest.skip("the hub is reachable: the missing model would be downloaded, which this test must not do")
    store = shutil.copytree(user_models, tmp_path / "store", symlinks=True)
    shutil.rmtree(store / model_store.NANO)
    kept = {name: store_snapshot(store / name) for name in (model_store.VAD, model_store.PARAFORMER)}
    manifest = model_store.read_manifest(store)

    run = serve_prepare_step(store)
    assert run.returncode == 0, run.stderr
    assert {name: store_snapshot(store / name) for name in kept} == kept
    after = model_store.read_manifest(store)
    assert after[model_store.PARAFORMER] == manifest[model_store.PARAFORMER]
    assert after[model_store.NANO]["source"] == "random-tiny" and after[model_store.NANO]["seed"] == 0
    assert f"{model_store.NANO}: to be filled (its directory is missing)" in run.stderr
    assert "building random tiny weights for funasr_nano only" in run.stderr
    prepare.validate_nano_dir(store / model_store.NANO)


def test_a_vanished_or_broken_linked_model_stops_with_the_ways_out(user_models, tmp_path, capsys):
    mine = shutil.copytree(user_models / model_store.PARAFORMER, tmp_path / "mine")
    store = tmp_path / "store"
    assert prepare.main(["--store", str(store), "--paraformer-dir", str(mine), "--random", "tiny"]) == 0
    capsys.readouterr()
    before = store_snapshot(store)

    (mine / "am.mvn").unlink()
    assert prepare.main(["--store", str(store), "--fallback-random", "tiny"]) == 1
    err = capsys.readouterr().err
    assert f"the store's {model_store.PARAFORMER} (local {mine} (symlink)) no longer validates" in err
    assert "has no am.mvn" in err and "--paraformer-dir DIR, --random tiny|full" in err and "--force" in err

    shutil.rmtree(mine)
    assert prepare.main(["--store", str(store), "--fallback-random", "tiny"]) == 1
    err = capsys.readouterr().err
    assert f"the store's {model_store.PARAFORMER} links {mine}, which no longer exists" in err
    assert "Traceback" not in err
    assert store_snapshot(store) == before, "nothing is rebuilt in its place"


def test_an_explicit_request_replaces_a_kept_model(user_models, tmp_path, capsys):
    store = tmp_path / "store"
    assert prepare.main(["--store", str(store), "--paraformer-dir", str(user_models / model_store.PARAFORMER),
                         "--nano-dir", str(user_models / model_store.NANO)]) == 0
    assert prepare.main(["--store", str(store), "--random", "tiny", "--seed", "2"]) == 0
    manifest = model_store.read_manifest(store)
    for name in (model_store.PARAFORMER, model_store.NANO):
        assert manifest[name]["source"] == "random-tiny" and manifest[name]["seed"] == 2
        assert not (store / name).is_symlink()
    assert (user_models / model_store.PARAFORMER / "model.pt").is_file(), "the user's directory is untouched"


def test_a_model_placed_in_the_store_by_hand_is_kept(user_models, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(user_models / model_store.PARAFORMER, store / model_store.PARAFORMER)
    broken = shutil.copytree(user_models / model_store.NANO, store / model_store.NANO)
    (broken / "model.pt").unlink()
    assert prepare.main(["--store", str(store), "--fallback-random", "tiny"]) == 1
    err = capsys.readouterr().err
    assert f"{broken} was not made by this command and does not validate" in err
    assert not (broken / "model.pt").exists() and (broken / "config.yaml").exists(), "left as it was"

    shutil.rmtree(broken)
    shutil.copytree(user_models / model_store.NANO, broken)
    assert prepare.main(["--store", str(store), "--fallback-random", "tiny"]) == 0
    entry = model_store.read_manifest(store)[model_store.PARAFORMER]
    assert (entry["source"], entry["mode"]) == ("local", "in store")
    assert "not recorded by an earlier run; keeping it" in capsys.readouterr().err
