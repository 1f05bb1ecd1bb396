"""The vault: users' credentials for their connections, sealed at rest, opened host-side;
and the bridge's signing keys, sealed the same way. The only code that encrypts at rest.

``keys.py`` owns the master keys (``CORRAL_MASTER_KEY`` or the key file), ``sealed.py`` the
envelope encryption, ``kinds.py`` what each kind of credential holds, ``signing.py`` the
bridge's signing keys in the store, and ``vault.py`` the ``Vault`` that ties them to the
store's ``credentials`` table and rotates the master keys under both. Nothing in this package
may run inside a sandbox, and nothing it returns outside ``Vault.resolve`` (and the signing
keys' ``load``, for the process that mints and checks run tokens) holds a secret.
"""

from corral.vault.keys import MasterKeyRing, MasterKeys, key_id
from corral.vault.kinds import KINDS, Credential, CredentialInfo, Kind
from corral.vault.vault import KeyStatus, Rotation, Vault

__all__ = [
    "KINDS",
    "Credential",
    "CredentialInfo",
    "KeyStatus",
    "Kind",
    "MasterKeyRing",
    "MasterKeys",
    "Rotation",
    "Vault",
    "key_id",
]
