"""The export's encryption (ops/backup_crypt.py) in this process: age with a passphrase, authenticated."""

from __future__ import annotations

from inverse_cloud.ops import backup_crypt
from inverse_cloud.ops.backup_crypt import AGE_MAGIC, decrypt, encrypt, is_encrypted

SECRET = b"BEGIN:VCARD\r\nFN:Alice Example\r\nEND:VCARD\r\n" * 20


def test_an_export_round_trips_and_hides_its_text():
    sealed = encrypt(SECRET, "correct horse")
    assert isinstance(sealed, bytes)
    assert sealed.startswith(AGE_MAGIC)
    assert b"Alice Example" not in sealed
    assert decrypt(sealed, "correct horse") == SECRET


def test_a_wrong_passphrase_is_none_not_an_exception():
    assert decrypt(encrypt(SECRET, "correct horse"), "battery staple") is None


def test_one_flipped_bit_anywhere_in_the_body_is_refused():
    sealed = bytearray(encrypt(SECRET, "correct horse"))
    for where in (len(sealed) // 2, len(sealed) - 1):
        damaged = bytearray(sealed)
        damaged[where] ^= 0x01
        assert decrypt(bytes(damaged), "correct horse") is None


def test_the_age_magic_is_recognised_only_as_a_prefix():
    assert is_encrypted(AGE_MAGIC + b"-> scrypt")
    assert is_encrypted(encrypt(b"x", "p")[:len(AGE_MAGIC)])
    assert not is_encrypted(AGE_MAGIC[:-1])                 # the header line without its newline
    assert not is_encrypted(b"\x1f\x8b\x08" + AGE_MAGIC)      # a gzip'd tar that happens to hold the text
    assert not is_encrypted(b"")
    assert backup_crypt.AGE_MAGIC == b"age-encryption.org/v1\n"
