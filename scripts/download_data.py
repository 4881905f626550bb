#!/usr/bin/env python
"""Download, verify, unpack (and optionally convert) the published datasets.

    python scripts/download_data.py 3bpa  [--dest data/]                     # BOTNet-datasets tarball
    python scripts/download_data.py 3bpa  --split acs                       # the ACS SI zip instead
    python scripts/download_data.py oc20  --split 200k [--split val_id] [--ref]
    python scripts/download_data.py mptrj [--split json|extxyz]
    python scripts/download_data.py --list                                  # what is known, with URLs

Every download goes to ``<dest>/<DATASET>/`` through a ``.part`` file, is checked against the published
checksum (MD5; git blob SHA-1 for the BOTNet 3BPA tarball; MPtrj's JSON has none published, so its SHA-256
is printed for your records) and only then renamed and unpacked. OC20's ``*.extxyz.xz``/``*.txt.xz`` are
kept compressed (the loader reads ``.xz`` directly). ``--convert`` then builds the graph cache
(``--cutoff``, default 5 Å) with the same loader training uses.

Sources (see ``../shared/design/dataset-formats.md``):
  * 3BPA: github.com/davkovacs/BOTNet-datasets (``dataset_3BPA.tar.gz``, MIT) or the JCTC SI zip
    (doi:10.1021/acs.jctc.1c00647, ``ct1c00647_si_002.zip``).
  * OC20 S2EF: dl.fbaipublicfiles.com/opencatalystproject/data/ (CC BY 4.0), table from fairchem's docs;
    ``oc20_ref.pkl`` (per-system reference energies) from the OC22 docs.
  * MPtrj: figshare article 23713842 (``MPtrj_2022.9_full.json``, ~11 GB; CC BY 4.0 + MP terms) and the
    Matbench-Discovery extxyz zip (figshare files/49034296).

Without network access it stops with one line saying what could not be reached and where to get the file
by hand, instead of a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from potentials.errors import PotentialsError, cli_errors  # noqa: E402

OC20_BASE = "https://dl.fbaipublicfiles.com/opencatalystproject/data/"
# split -> (file, md5); fairchem docs/core/datasets/oc20.md (== OCP DATASET.md)
OC20_S2EF = {
    "200k": ("s2ef_train_200K.tar", "f8d0909c2623a393148435dede7d3a46"),
    "2M": ("s2ef_train_2M.tar", "953474cb93f0b08cdc523399f03f7c36"),
    "20M": ("s2ef_train_20M.tar", "863bc983245ffc0285305a1850e19cf7"),
    "all": ("s2ef_train_all.tar", "12a7087bfd189a06ccbec9bc7add2bcd"),
    "val_id": ("s2ef_val_id.tar", "f57f7f5c1302637940f2cc858e789410"),
    "val_ood_ads": ("s2ef_val_ood_ads.tar", "431ab0d7557a4639605ba8b67793f053"),
    "val_ood_cat": ("s2ef_val_ood_cat.tar", "532d6cd1fe541a0ddb0aa0f99962b7db"),
    "val_ood_both": ("s2ef_val_ood_both.tar", "5731862978d80502bbf7017d68c2c729"),
    "test": ("s2ef_test_lmdbs.tar.gz", "bcada432482f6e87b24e14b6b744992a"),
    "rattled": ("s2ef_rattled.tar", "40431149b27b64ce1fb40cac4e2e064b"),
    "md": ("s2ef_md.tar", "9fed845aaab8fb4bf85e3a8db57796e0"),
}
OC20_REF = (OC20_BASE + "oc22/oc20_ref.pkl", "oc20_ref.pkl", "md5", "043e1e0b0cce64c62f01a8563dbc3178")

DATASETS = {
    "3bpa": {
        "default": "botnet",
        "splits": {
            # git blob SHA-1 of the tarball at BOTNet-datasets HEAD 29e6d467…
            "botnet": [("https://github.com/davkovacs/BOTNet-datasets/raw/"
                        "29e6d467317e4b5967b7ea5cbee54de953fa0d45/dataset_3BPA.tar.gz",
                        "dataset_3BPA.tar.gz", "gitblob", "220edbf2afcd5df28cc59571df06f7ca89fce236")],
            "acs": [("https://pubs.acs.org/doi/suppl/10.1021/acs.jctc.1c00647/suppl_file/ct1c00647_si_002.zip",
                     "ct1c00647_si_002.zip", None, None)],
        },
    },
    "oc20": {
        "default": "200k",
        "splits": {k: [(OC20_BASE + f, f, "md5", md5)] for k, (f, md5) in OC20_S2EF.items()},
    },
    "mptrj": {
        "default": "json",
        "splits": {
            "json": [("https://figshare.com/ndownloader/files/41619375", "MPtrj_2022.9_full.json", None, None)],
            "extxyz": [("https://figshare.com/files/49034296", "2024-09-03-mp-trj.extxyz.zip", "md5",
                        "7f433171e4e5f2ef9304dccd42d5488f")],
        },
    },
}


def digest(path: Path, kind: str) -> str:
    if kind == "gitblob":
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        h = hashlib.new(kind)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_online(url: str, timeout: float) -> None:
    host = urllib.request.urlparse(url).hostname
    try:
        socket.getaddrinfo(host, 443)
        with socket.create_connection((host, 443), timeout=timeout):
            pass
    except OSError as exc:
        raise PotentialsError(
            f"cannot reach {host} ({exc.__class__.__name__}: {exc}); this machine seems to be offline. "
            f"Download {url} by hand and rerun with --from-dir DIR (or unpack it under --dest yourself)"
        ) from None


def fetch(url: str, dest: Path, timeout: float) -> None:
    part = dest.with_name(dest.name + ".part")
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "potentials-download/1"})
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            try:
                from tqdm import tqdm

                bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=dest.name)
            except ImportError:  # pragma: no cover
                bar = None
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
            if bar is not None:
                bar.close()
    except (urllib.error.URLError, OSError) as exc:
        raise PotentialsError(f"download of {url} failed: {exc}; the partial file is {part}") from None
    os.replace(part, dest)


def unpack(path: Path, into: Path) -> list[Path]:
    """Extract a .tar/.tar.gz/.zip into ``into``; returns the top-level entries (or ``[path]``)."""
    name = path.name
    try:
        if name.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(path) as tar:
                names = tar.getnames()
                try:
                    tar.extractall(into, filter="data")
                except TypeError:  # Python without extraction filters
                    tar.extractall(into)
        elif name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                zf.extractall(into)
        else:
            return [path]
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PotentialsError(f"cannot unpack {path} (truncated download?): {exc}") from None
    print(f"unpacked {path} into {into}")
    return sorted({into / n.split("/")[0] for n in names if n.strip("/")})


def get(dataset: str, split: str, dest: Path, timeout: float, from_dir: Path | None, keep: bool) -> list[Path]:
    spec = DATASETS[dataset]
    if dataset == "oc20" and split == "ref":
        items = [OC20_REF]
    elif split in spec["splits"]:
        items = list(spec["splits"][split])
    else:
        raise PotentialsError(f"{dataset}: unknown split {split!r}; known: {sorted(spec['splits'])}")
    out_dir = dest / dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for url, fname, kind, expected in items:
        target = out_dir / fname
        if from_dir is not None:
            src = from_dir / fname
            if not src.exists():
                raise PotentialsError(f"{src} does not exist (expected the file from {url})")
            shutil.copy2(src, target)
        elif not target.exists():
            check_online(url, timeout)
            print(f"downloading {url}")
            fetch(url, target, timeout)
        if kind is not None:
            got = digest(target, kind)
            if got != expected:
                bad = target.with_name(target.name + ".bad")
                os.replace(target, bad)
                raise PotentialsError(f"{fname}: {kind} {got} does not match the published {expected}; moved to {bad}")
            print(f"verified {fname} ({kind} {expected})")
        else:
            print(f"{fname}: no published checksum; sha256 {digest(target, 'sha256')}")
        done.extend(unpack(target, out_dir))
        if not keep and target.name.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
            target.unlink()
    return done


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", choices=sorted(DATASETS))
    p.add_argument("--split", action="append", help="which part (repeatable); default per dataset")
    p.add_argument("--ref", action="store_true", help="oc20: also fetch oc20_ref.pkl (per-system references)")
    p.add_argument("--dest", default="data", help="download directory (default data/)")
    p.add_argument("--from-dir", help="take the files from this directory instead of downloading")
    p.add_argument("--keep-archives", action="store_true", help="keep the .tar/.zip after unpacking")
    p.add_argument("--timeout", type=float, default=10.0, help="network timeout in seconds")
    p.add_argument("--convert", action="store_true", help="build the graph cache after unpacking")
    p.add_argument("--cutoff", type=float, default=5.0, help="cutoff (Å) for --convert")
    p.add_argument("--list", action="store_true", help="list the known datasets, splits and URLs")
    args = p.parse_args(argv)
    if args.list or not args.dataset:
        for name, spec in DATASETS.items():
            for split, items in spec["splits"].items():
                for url, fname, kind, expected in items:
                    print(f"{name:6} {split:13} {url}  [{kind or 'no checksum'}{' ' + expected if expected else ''}]")
        print(f"oc20   ref           {OC20_REF[0]}  [md5 {OC20_REF[3]}]")
        return 0
    dest = Path(args.dest)
    splits = args.split or [DATASETS[args.dataset]["default"]]
    if args.ref and args.dataset == "oc20":
        splits.append("ref")
    from_dir = Path(args.from_dir) if args.from_dir else None
    for split in splits:
        if not (args.dataset == "oc20" and split == "ref") and split not in DATASETS[args.dataset]["splits"]:
            known = sorted(DATASETS[args.dataset]["splits"])
            raise PotentialsError(f"{args.dataset}: unknown split {split!r}; known: {known}")
    roots = []
    for split in splits:
        got = get(args.dataset, split, dest, args.timeout, from_dir, args.keep_archives)
        if split != "ref":
            roots.append(got[0] if got else dest / args.dataset)
    if args.convert:
        import logging

        from potentials.data.formats import load_dataset

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        for root in roots:
            ds = load_dataset(args.dataset, root=str(root), cutoff=args.cutoff, cache_dir=str(dest / "cache"),
                              progress=True)
            print(f"converted {root}: {len(ds)} frames into {ds.path}")
    for root in roots:
        print(f"done: {root}; train with: python scripts/train.py data={args.dataset} data.root={root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
