"""CLIP weights by name (`--clip-weights=openai`, the ViT-B/16 presets' default): open_clip's
registry names the Hugging Face repository, the project pins its revision and the file's sha256.
No network here: a hub cache laid out as huggingface_hub writes it holds random ViT-B/16 weights,
and the tests pin their digest in place of OpenAI's."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import constants

import checkpoints
import config
import frozen_clip
import pipeline
import tinyclip
import train
from tests.helpers import fake_hub_cache, pinned_command, release_layout

OPENAI = frozen_clip.PRETRAINED["openai"]


@pytest.fixture(scope="module")
def vitb16_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random-vitb16.safetensors"
    tinyclip.save_clip(frozen_clip.create_clip("ViT-B-16-quickgelu"), path, {})
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache of this test's own (never the machine's)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_the_registry_pins_open_clips_repository_at_a_revision():
    assert frozen_clip.hub_repository(OPENAI) == "timm/vit_base_patch16_clip_224.openai"
    assert OPENAI.model == "ViT-B-16-quickgelu" and OPENAI.filename.endswith(".safetensors")
    assert len(OPENAI.revision) == 40 and len(OPENAI.sha256) == 64
    for preset in ("voc2007-vitb16", "voc2012-vitb16", "coco2014-vitb16", "nuswide-vitb16", "voc2007-vitb16-beyond"):
        assert config.PRESETS[preset]["clip_weights"] == "openai"


def test_named_weights_load_strict_from_the_hub_cache(hub, vitb16_weights, monkeypatch):
    digest = fake_hub_cache(hub, vitb16_weights)
    monkeypatch.setitem(frozen_clip.PRETRAINED, "openai", dataclasses.replace(OPENAI, sha256=digest))
    path = frozen_clip.weights_file("openai", "ViT-B-16-quickgelu")
    assert path.parent.name == OPENAI.revision and path.resolve().name == digest
    clip = frozen_clip.create_clip("ViT-B-16-quickgelu", path)
    want = frozen_clip.read_state_dict(vitb16_weights)
    assert all(torch.equal(v, want[k]) for k, v in clip.state_dict().items())


def test_a_cached_file_that_is_not_the_pinned_one_is_refused(hub, vitb16_weights):
    fake_hub_cache(hub, vitb16_weights)          # random weights where OpenAI's are pinned
    with pytest.raises(frozen_clip.DataError, match="not OpenAI's ViT-B/16 weights as pinned for "
                                                    "--clip-weights=openai \\(sha256 .*delete its cache folder "
                                                    ".*models--timm--vit_base_patch16_clip_224.openai and run again"):
        frozen_clip.weights_file("openai", "ViT-B-16-quickgelu")


def test_offline_with_nothing_cached_is_one_line_naming_the_file_and_where(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.main(["--dataset=voc07", "--data-root=nowhere", "--device=cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    weights = [line for line in lines if "--clip-weights=openai" in line]
    assert len(weights) == 1 and "Traceback" not in "".join(lines)
    assert weights[0].startswith("error: --clip-weights=openai: OpenAI's ViT-B/16 weights are not in the Hugging Face "
                                 f"cache ({hub}) and cannot be downloaded (offline (HF_HUB_OFFLINE=1)): download "
                                 f"https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/"
                                 f"{OPENAI.revision}/open_clip_model.safetensors and pass --clip-weights=FILE")


def test_a_name_for_another_architecture_is_one_line(capsys):
    assert train.main(["--dataset=voc07", "--clip-model=ViT-B-32", "--data-root=nowhere", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert ("error: --clip-weights=openai: OpenAI's ViT-B/16 weights load into ViT-B-16-quickgelu, not ViT-B-32 "
            "(pass --clip-model=ViT-B-16-quickgelu)") in err


def _run(command, cwd, hub_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_CACHE=str(hub_dir), HF_HUB_OFFLINE="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def test_a_checkpoint_finds_its_weights_by_name_on_another_machine(shared_data, tmp_path, vitb16_weights):
    """train.py --dataset voc07 with the preset's default weights (by name, from the hub cache),
    then eval.py of its checkpoint elsewhere: another hub cache, the trained-with file gone."""
    release_layout(shared_data / "real_sample" / "voc", tmp_path / "data_folder", copies=1)
    digest = fake_hub_cache(tmp_path / "hub", vitb16_weights)
    done = _run(pinned_command(digest, "train.py", "--dataset=voc07", "--image-size=224", "--epochs=1",
                               "--use-reso=false", "--batch-size=4", "--workers=0", "--out=run", "--device=cpu"),
                tmp_path, tmp_path / "hub")
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "ckpt.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["clip_weights"] == "openai"
    record = json.loads(meta["clip_weights"])
    assert record["name"] == "openai" and record["sha256"] == digest
    assert record["path"].endswith(f"snapshots/{OPENAI.revision}/open_clip_model.safetensors")
    report = json.loads((tmp_path / "run" / "report.json").read_text())

    other = tmp_path / "elsewhere"
    other.mkdir()
    fake_hub_cache(other / "hub", vitb16_weights)
    import shutil
    shutil.rmtree(tmp_path / "hub")
    done = _run(pinned_command(digest, "eval.py", str(tmp_path / "run" / "ckpt.safetensors")), other, other / "hub")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loading CLIP weights openai" in done.stdout and f"mAP {report['mAP']:.2f}" in done.stdout
    # no cache at all: one line saying which --clip-weights to pass
    done = _run(pinned_command(digest, "eval.py", str(tmp_path / "run" / "ckpt.safetensors")), other,
                other / "empty")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "--clip-weights=openai: OpenAI's ViT-B/16 weights are not in the Hugging Face cache" in done.stderr
    assert "pass --clip-weights=FILE" in done.stderr


def test_a_checkpoint_whose_weights_file_is_gone_names_the_option(tmp_path, vitb16_weights, capsys):
    """Recorded as a file (a user's own), missing here: by the name its digest has, else one line
    with the digest of the file to pass."""
    cfg = config.BACGCNConfig(clip_model="ViT-B-16-quickgelu", clip_weights=str(tmp_path / "gone.safetensors"))
    record = {"name": None, "sha256": "ab" * 32, "path": cfg.clip_weights}
    with pytest.raises(frozen_clip.DataError, match="its CLIP weights .*gone.safetensors are not on this machine: "
                                                    "pass --clip-weights=FILE, the file with sha256 abab"):
        checkpoints.clip_weights_here("ckpt.safetensors", cfg, record, given=False)
    named = checkpoints.clip_weights_here("ckpt.safetensors", cfg, dict(record, name="openai"), given=False)
    assert named.clip_weights == "openai"
    # a file given that is not the trained-with one: said, and used
    given = cfg.replace(clip_weights=str(vitb16_weights))
    assert checkpoints.clip_weights_here("ckpt.safetensors", given, record, given=True) == given
    assert "holds other CLIP weights than ckpt.safetensors was trained with" in capsys.readouterr().out


def test_a_local_file_keeps_working(tmp_path, vitb16_weights):
    cfg, _ = config.parse_overrides(["--dataset=voc07", f"--clip-weights={vitb16_weights}"])
    assert pipeline.clip_weights_file(cfg) == vitb16_weights and pipeline.clip_weights_problem(cfg) is None
    record = checkpoints.clip_weights_record(cfg)
    assert record["name"] is None and record["path"] == str(vitb16_weights)


class _Hub:
    """A loopback stand-in for the Hugging Face hub (127.0.0.1, a free port): it serves `body` as
    every repository's file at any revision, with the headers huggingface_hub reads."""

    def __init__(self, body: bytes, revision: str):
        import hashlib
        import http.server
        import threading

        hub = self
        self.requests: list[tuple[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 30

            def _headers(self) -> bool:
                hub.requests.append((self.command, self.path))
                if "/resolve/" not in self.path:
                    self.send_response(404)
                    self.end_headers()
                    return False
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", revision)
                self.end_headers()
                return True

            def do_HEAD(self):
                self._headers()

            def do_GET(self):
                if self._headers():
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_port}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _fetch(digest: str, endpoint: str, cache, offline: bool = False):
    """frozen_clip.weights_file('openai') in a process of its own (huggingface_hub reads its
    endpoint when imported), the pin set to `digest`."""
    code = (f"import dataclasses, sys; sys.path.insert(0, {str(pipeline.ROOT)!r}); import cli, frozen_clip; "
            f"frozen_clip.PRETRAINED['openai'] = dataclasses.replace(frozen_clip.PRETRAINED['openai'], "
            f"sha256={digest!r}); "
            "sys.exit(cli.run_command(lambda: print(frozen_clip.weights_file('openai', 'ViT-B-16-quickgelu'))))")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_named_weights_are_downloaded_once_into_the_hub_cache(tmp_path, vitb16_weights):
    """The first use downloads from the hub (a loopback one here) into its cache at the pinned
    revision; the next one, offline, reads the cache; a download that is not the pinned file is
    refused; a hub that cannot be reached is one line."""
    import hashlib

    body = vitb16_weights.read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    with _Hub(body, OPENAI.revision) as endpoint:
        hub = _fetch(digest, endpoint, tmp_path / "cache")
        wrong = _fetch("0" * 64, endpoint, tmp_path / "cache2")
    assert hub.returncode == 0, hub.stderr[-2000:]
    assert hub.stderr.startswith(f"OpenAI's ViT-B/16 weights: not in the Hugging Face cache ({tmp_path / 'cache'}) "
                                 f"yet: fetching https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/"
                                 f"{OPENAI.revision}/open_clip_model.safetensors (once)")
    path = hub.stdout.strip()
    assert path.endswith(f"models--timm--vit_base_patch16_clip_224.openai/snapshots/{OPENAI.revision}/"
                         "open_clip_model.safetensors")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    again = _fetch(digest, "http://127.0.0.1:9", tmp_path / "cache", offline=True)
    assert again.returncode == 0 and again.stdout.strip() == path and again.stderr == ""
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 2       # the fetching line, then the refusal
    assert "not OpenAI's ViT-B/16 weights as pinned for --clip-weights=openai" in wrong.stderr.splitlines()[1]
    # nothing listens on the port: the fetching line, then one line naming the file to fetch by hand and where
    down = _fetch(digest, "http://127.0.0.1:9", tmp_path / "cache3")
    lines = down.stderr.splitlines()
    assert down.returncode == 2 and len(lines) == 2 and "Retry" not in down.stderr
    assert lines[1].startswith(f"error: --clip-weights=openai: OpenAI's ViT-B/16 weights are not in the Hugging "
                               f"Face cache ({tmp_path / 'cache3'}) and cannot be downloaded (")
