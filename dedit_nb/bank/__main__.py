"""``python -m dedit_nb.bank``: list, show, export and import bank items.

    python -m dedit_nb.bank list FOLDER            the bank files in a folder (and a session's imported ones)
    python -m dedit_nb.bank show FILE              one bank file: name, template, tokens, base model, sizes
    python -m dedit_nb.bank export SESSION IMAGE ITEM FILE [--overwrite]
    python -m dedit_nb.bank import SESSION FILE [--name NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..session import SESSION_FILE, Session, SessionError
from . import files


def describe(item: files.BankItem, path: Path) -> str:
    params = sum(v.numel() for v in item.adapter.values())
    base = item.base
    return "\n".join([f"{path}", f"  name: {item.name}", f"  template: {item.template}",
                      f"  tokens: {' '.join(item.tokens)}",
                      f"  base model: {base['model_id']} (config {base['config_sha256']}, weights "
                      f"{base['weights_sha256']})",
                      f"  adapter: rank {item.rank}, {params:,} parameters; crop {item.crop.shape[1]}x"
                      f"{item.crop.shape[0]}", f"  file: {path.stat().st_size:,} bytes",
                      f"  from: {item.source}"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dedit_nb.bank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="bank files in a folder, or a session's imported bank items")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("show", help="one bank file")
    p.add_argument("file", type=Path)
    p = sub.add_parser("export", help="write an item of a per-item session as a bank file")
    for name in ("session", "image", "item"):
        p.add_argument(name)
    p.add_argument("file", type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace a bank file of that name (never another file)")
    p = sub.add_parser("import", help="add a bank file to a session's bank items (no training)")
    p.add_argument("session")
    p.add_argument("file", type=Path)
    p.add_argument("--name", help="the name it gets in the session (default: its own)")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            if (args.folder / SESSION_FILE).exists():
                for entry in Session.open(args.folder).bank_items:
                    print(f"{entry['name']}\t{entry['file']}\t{entry['base']['model_id']}")
                return 0
            for path in sorted(args.folder.glob(f"*{files.SUFFIX}")):
                try:
                    item = files.read(path)
                except files.BankFileError:
                    continue   # another kind of safetensors file
                print(f"{path.name}\t{item.name}\t{item.base['model_id']}")
        elif args.command == "show":
            print(describe(files.read(args.file), args.file))
        elif args.command == "export":
            image = int(args.image) if args.image.isdigit() else args.image
            item = int(args.item) if args.item.isdigit() else args.item
            print(Session.open(args.session).export_item(image, item, args.file, overwrite=args.overwrite))
        else:
            print(Session.open(args.session).import_item(args.file, name=args.name))
    except (SessionError, files.BankFileError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
