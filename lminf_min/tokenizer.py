"""Text <-> token ids: tokenizer.json through `tokenizers`, or tokenizer.model through
sentencepiece."""

from pathlib import Path

from .config import UserError


class Tokenizer:
    """Whichever tokenizer the checkpoint directory holds; tokenizer.json wins if both are there.
    rows: the model's embedding rows, if known: ids beyond them are refused."""

    def __init__(self, ckpt, rows=None):
        ckpt = Path(ckpt)
        json_path, sp_path = ckpt / "tokenizer.json", ckpt / "tokenizer.model"
        if not json_path.is_file() and not sp_path.is_file():
            raise UserError(
                f"no tokenizer.json or tokenizer.model in {ckpt}; copy the model's tokenizer there"
            )
        try:
            if json_path.is_file():
                from tokenizers import Tokenizer as HFTokenizer

                # its post-processor decides about BOS
                self.hf = HFTokenizer.from_file(str(json_path))
                self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
                self.ids = lambda text: self.hf.encode(text).ids
                self.decode = lambda ids: self.hf.decode(ids, skip_special_tokens=False)
            else:
                import sentencepiece

                sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
                self.vocab_size = sp.get_piece_size()
                # Llama's sentencepiece models start with BOS
                bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
                self.ids = lambda text: bos + sp.encode(text)
                self.decode = lambda ids: sp.decode(list(ids))
        except Exception as e:  # both libraries raise their own exception types on a corrupt file
            raise UserError(
                f"the tokenizer in {ckpt} could not be loaded ({type(e).__name__}: {e}); replace "
                "it with the model's own"
            ) from None
        self.ckpt, self.rows = ckpt, rows
        if rows is not None and self.vocab_size > rows:
            raise UserError(
                f"the tokenizer has {self.vocab_size} tokens but the model only {rows}; use the "
                f"tokenizer that came with {ckpt}"
            )

    def encode(self, text):
        """Token ids of a text; a clear error if there are none, or one the model has no row for."""
        ids = self.ids(text)
        if text and not ids:
            raise UserError(
                f"the text encodes to no tokens with the tokenizer in {self.ckpt}; pass more text"
            )
        if self.rows is not None and max(ids, default=0) >= self.rows:
            raise UserError(
                f"the tokenizer in {self.ckpt} gives token id {max(ids)}, but the model has only "
                f"{self.rows} rows; use the tokenizer that came with the model"
            )
        return ids
