"""The item bank: an item learned once (in a per-item finetune) and used in any other session without
finetuning the two together. A bank file (:mod:`.files`) holds the item's tokens, its own adapter, its crop
and mask, its name and template and the base model's identity; ``session.export_item`` writes one,
``session.import_item`` adds one to a session, and an image edit can take its source from one
(``Editor.image(..., source_item_file=path)``). ``python -m dedit_nb.bank list|show|export|import``."""
from .files import BankFileError, BankItem, read, write

__all__ = ["BankFileError", "BankItem", "read", "write"]
