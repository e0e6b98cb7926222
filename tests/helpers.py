"""Helpers several test modules share (checkpoints and files crafted as an attacker would,
OpenAI-style archives, the paper's release layout, a trainer in its own process)."""
import json
import os
import shutil
import signal  # noqa: F401  (the callers pass signals to stop_after)
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

import bacgcn
import checkpoints
import config
import data
import synthetic as S

ROOT = Path(__file__).resolve().parent.parent
COPIES = 4          # 3 real photos x 4 = 12 images per split
CAPTION = "a photo of {} in the city street"


def launch_train(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the CPU path, as a user runs it
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def epoch_saved(out: Path) -> int:
    try:
        with safe_open(str(out / "state.safetensors"), "pt") as f:
            return int(f.metadata()["epoch"])
    except (OSError, KeyError, ValueError):
        return 0


def stop_after(proc, out: Path, epochs: int, sig) -> None:
    """Send `sig` as soon as the state after `epochs` epochs is on disk."""
    deadline = time.time() + 600
    while epoch_saved(out) < epochs:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)


def voc_tree(real, base, splits, copies):
    """A VOC2007 tree at `base` with the real photos copied `copies` times and per-class
    ImageSets files for `splits` (from the XML); returns {caption key: captions naming each
    image's classes}."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    ids, captions = [], {}
    for xml in sorted((real / "Annotations").glob("*.xml")):
        ann = data.read_voc_annotation(xml)
        names = sorted({o.name for o in ann.objects})
        for k in range(copies):
            image_id = f"{xml.stem}_{k}"
            shutil.copy(real / "JPEGImages" / f"{xml.stem}.jpg", base / "JPEGImages" / f"{image_id}.jpg")
            text = xml.read_text().replace(f"{xml.stem}.jpg", f"{image_id}.jpg")
            (base / "Annotations" / f"{image_id}.xml").write_text(text)
            ids.append((image_id, names))
            captions[f"{image_id}."] = [CAPTION.format(" and a ".join(names))] * 6
    main = base / "ImageSets" / "Main"
    for split in splits:
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i, _ in ids))
        for c in data.VOC_CLASSES:
            (main / f"{c}_{split}.txt").write_text("".join(f"{i} {1 if c in n else -1}\n" for i, n in ids))
    return captions


def release_layout(real, data_folder, copies=COPIES):
    """The paper's release layout: data_folder/voc2007/ with each tar as it unpacks (trainval
    and test in separate trees, the same photos in both) and captions.json beside them."""
    folder = data_folder / "voc2007"
    captions = voc_tree(real, folder / "VOCtrainval_06-Nov-2007" / "VOCdevkit" / "VOC2007", ("trainval",), copies)
    voc_tree(real, folder / "VOCtest_06-Nov-2007" / "VOCdevkit" / "VOC2007", ("test",), copies)
    (folder / "captions.json").write_text(json.dumps(captions))


def torchscript_archive(state: dict, path):
    """An archive shaped like OpenAI's ViT-B-16.pt: a TorchScript module whose state dict has
    CLIP's keys plus OpenAI's three metadata entries."""
    class Node(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, value in {**state, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                       "vocab_size": torch.tensor(49408)}.items():
        *path_parts, leaf = key.split(".")
        node = root
        for part in path_parts:
            if not hasattr(node, part):
                node.add_module(part, Node())
            node = getattr(node, part)
        if value.is_floating_point():
            node.register_parameter(leaf, torch.nn.Parameter(value.half(), requires_grad=False))
        else:
            node.register_buffer(leaf, value)
    torch.jit.save(torch.jit.script(root), str(path))


def one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def write_checkpoint(path, cfg: config.BACGCNConfig, dim: int = 32):
    """A checkpoint as train.py writes it, of an untrained head over the world's categories."""
    classes, categories = list(S.CLASS_NAMES), list(S.CLASS_NAMES) + list(S.BACKGROUNDS)
    gen = torch.Generator().manual_seed(0)
    m = torch.randint(0, 20, (len(categories), len(categories)), generator=gen).float()
    m = m + m.t()
    prompts = torch.nn.functional.normalize(torch.randn(len(categories), dim, generator=gen), dim=-1)
    model = bacgcn.build_model(cfg, prompts, len(classes), m, m.diagonal() + 5, 100.0)
    checkpoints.save_checkpoint(path, model, cfg, classes, categories, m.numpy(), (m.diagonal() + 5).numpy(),
                             {"mAP": 50.0}, "synthetic-tiny")
    return path


def rewrite_file(path, meta=None, tensors=None, digest=True):
    """Change a checkpoint's (or run state's) metadata and tensors; by default as a crafted file
    would, with a digest that fits, so that the checks behind the digest are what is tested."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        old_meta, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    new_meta = {k: v for k, v in {**old_meta, **(meta or {})}.items() if v is not None}
    new = {k: v for k, v in {**old, **(tensors or {})}.items() if v is not None}
    save_file(new, str(path), metadata=checkpoints.with_digest(new, new_meta) if digest else new_meta)


def fake_hub_cache(cache: Path, weights: Path, name: str = "openai") -> str:
    """A Hugging Face hub cache at `cache` laid out as huggingface_hub writes it (blobs/ named by
    the file's sha256, snapshots/<revision>/ pointing at them, refs/main), holding `weights` as the
    file the registry's `name` pins. Returns the file's sha256: OpenAI's own bytes are not here,
    so a test pins that digest instead (`pinned`)."""
    import hashlib

    import frozen_clip

    entry = frozen_clip.PRETRAINED[name]
    repo = cache / ("models--" + frozen_clip.hub_repository(entry).replace("/", "--"))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copy(weights, repo / "blobs" / digest)
    snapshot = repo / "snapshots" / entry.revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / entry.filename).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(entry.revision)
    return digest


def pinned_command(sha256: str, script: str, *args: str, name: str = "openai") -> list[str]:
    """A command line that runs `script` (train.py, eval.py, ...) with the registry's `name` pinned
    to `sha256` instead of the real file's digest, as a user runs it otherwise."""
    launch = (f"import dataclasses, runpy, sys; sys.path.insert(0, {str(ROOT)!r}); import frozen_clip; "
              f"frozen_clip.PRETRAINED[{name!r}] = dataclasses.replace(frozen_clip.PRETRAINED[{name!r}], "
              f"sha256={sha256!r}); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", launch, str(ROOT / script), *args]


TINY_WORDS = """question answer what is in the photo are shown tell us about objects present this image please
explain detail background of excluding a an and with on person people man car dog cat horse bicycle bus sky road
grass tree wall building field ? , .""".split()


def _tiny_tokenizer():
    """A word-level tokenizer over a small vocabulary, OPT-style (</s> is BOS and EOS)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *TINY_WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
    tk.decoder = decoders.WordPiece()  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="</s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def tiny_blip2(out: Path) -> Path:
    """A tiny randomly initialised BLIP-2 (no download) saved at `out` as save_pretrained writes
    it: the captioner's tests run the real code path on the CPU in seconds."""
    import transformers

    tokenizer = _tiny_tokenizer()
    processor = transformers.Blip2Processor(transformers.BlipImageProcessor(size={"height": 32, "width": 32}),
                                            tokenizer, num_query_tokens=4)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vocab = len(tokenizer)
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            vocab_size=vocab, max_position_embeddings=64),
        text_config=transformers.OPTConfig(vocab_size=vocab, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=128,
                                           word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=1),
        num_query_tokens=4, image_token_index=image_token)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # The default init is near zero, so greedy decoding would emit one token forever; wide
        # weights make the answers depend on image and prompt, and words rather than <unk>/<pad>.
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)
        model.get_input_embeddings().weight[[0, 2, image_token]] = 0
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def run_timed(command: list[str], cwd, env: dict) -> tuple[int, str, str, float, str]:
    """Run `command` and time what it shows: (exit status, stdout, stderr, the longest silence in
    seconds between two things shown, the line after it). A progress bar's redraw counts as
    something shown, as it does on a terminal."""
    import threading

    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shown: list[tuple[float, str]] = []
    texts = {"out": [], "err": []}

    def pump(stream, name):
        while chunk := stream.read1(65536):
            now = time.time()
            texts[name].append(chunk)
            shown.extend((now, piece.decode(errors="replace")) for piece in chunk.replace(b"\r", b"\n").split(b"\n")
                         if piece.strip())

    pumps = [threading.Thread(target=pump, args=(proc.stdout, "out")),
             threading.Thread(target=pump, args=(proc.stderr, "err"))]
    for t in pumps:
        t.start()
    proc.wait(timeout=1800)
    for t in pumps:
        t.join()
    shown.sort(key=lambda item: item[0])
    gap, after = 0.0, ""
    for (t0, _), (t1, text) in zip(shown, shown[1:]):
        if t1 - t0 > gap:
            gap, after = t1 - t0, text
    return (proc.returncode, b"".join(texts["out"]).decode(), b"".join(texts["err"]).decode(), gap, after)
