"""A local stand-in for Supabase Auth, speaking the same HTTP contract as the real one.

One concern per module: `keys` (the signing-key store and token signing), `users`
(`auth.users` and the stand-in's own `auth.sessions`), `tokens` (signing a user in: the
access token GoTrue would mint), `app` (the HTTP application and its endpoints), and
`mailbox` (one-time codes, delivered to files in the stack folder), and `service`
(`AuthServer`, the app as a process of the local stack). This package gathers their public
names.
"""

from __future__ import annotations

from tenantflow_dev.auth_stand_in.app import create_app
from tenantflow_dev.auth_stand_in.keys import (
    KeyAlgorithm,
    SigningKey,
    TokenAlgorithm,
    add_signing_key,
    ensure_signing_keys,
    load_signing_keys,
    remove_signing_key,
    sign_token,
)
from tenantflow_dev.auth_stand_in.mailbox import (
    Mail,
    latest_one_time_code,
    mailbox_folder,
    read_mailbox,
)
from tenantflow_dev.auth_stand_in.service import AuthServer
from tenantflow_dev.auth_stand_in.tokens import mint_access_token
from tenantflow_dev.auth_stand_in.users import (
    UnknownUser,
    create_user,
    delete_user,
    ensure_auth_schema,
    set_operator,
)

__all__ = [
    "AuthServer",
    "KeyAlgorithm",
    "Mail",
    "SigningKey",
    "TokenAlgorithm",
    "UnknownUser",
    "add_signing_key",
    "create_app",
    "create_user",
    "delete_user",
    "ensure_auth_schema",
    "ensure_signing_keys",
    "latest_one_time_code",
    "load_signing_keys",
    "mailbox_folder",
    "mint_access_token",
    "read_mailbox",
    "remove_signing_key",
    "set_operator",
    "sign_token",
]
