"""supabase-py's own Auth client against the stand-in: GoTrue's contract for signing in.

Every call goes through `supabase_auth` unchanged (the client an operator's machine uses),
so its requests, its parsing of sessions and users, and the typed errors it raises
(`AuthApiError.code`) are those it has against Supabase.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from supabase_auth import SyncGoTrueAdminAPI, SyncGoTrueClient
from supabase_auth.errors import AuthApiError
from supabase_auth.types import Session

from tenantflow.auth import OPERATOR_ROLE, app_metadata_grants_operator
from tenantflow.sealing import public_key
from tenantflow_dev import Stack, StackConfig
from tenantflow_dev.auth_stand_in import (
    create_user,
    delete_user,
    latest_one_time_code,
    mailbox_folder,
)
from tenantflow_dev.cli import sign_ins
from tenantflow_dev.demo import DEMO_MEMBER, DEMO_OPERATOR
from tests.auth.support import claims_of

pytestmark = pytest.mark.stack


class PasswordUser:
    def __init__(self, email: str, user_id: uuid.UUID, password: str) -> None:
        self.email, self.id, self.password = email, user_id, password


def client(config: StackConfig) -> SyncGoTrueClient:
    """The client as supabase-py builds it: the project's Auth URL and the anon key."""
    return SyncGoTrueClient(
        url=f"{config.supabase_url}/auth/v1",
        headers={"apikey": config.secrets.anon_key},
        auto_refresh_token=False,
    )


def admin_api(config: StackConfig, bearer: str | None = None) -> SyncGoTrueAdminAPI:
    """The admin API as `create_client(url, service_role_key).auth.admin` calls it."""
    key = config.secrets.service_role_key
    return SyncGoTrueAdminAPI(
        url=f"{config.supabase_url}/auth/v1",
        headers={"apikey": key, "Authorization": f"Bearer {bearer or key}"},
    )


def new_email() -> str:
    return f"gotrue-test-{uuid.uuid4().hex[:10]}@example.test"


async def _password_user(config: StackConfig) -> AsyncIterator[PasswordUser]:
    email, password = new_email(), secrets.token_urlsafe(12)
    user_id = await create_user(config, email, password=password)
    yield PasswordUser(email, user_id, password)
    await forget(config, email)


async def forget(config: StackConfig, email: str) -> None:
    """Delete a test user and its mailbox file."""
    await delete_user(config, email)
    (mailbox_folder(config) / email).unlink(missing_ok=True)


@pytest.fixture
async def password_user(stack: Stack) -> AsyncIterator[PasswordUser]:
    async for created in _password_user(stack.config):
        yield created


@pytest.fixture
def gotrue(stack: Stack) -> Iterator[SyncGoTrueClient]:
    with client(stack.config) as created:
        yield created


def signed_in(config: StackConfig, user: PasswordUser) -> Session:
    with client(config) as fresh:
        session = fresh.sign_in_with_password({"email": user.email, "password": user.password})
    assert session.session is not None
    return session.session


class Refusal:
    """What an `AuthApiError` carries. NOTE: `code` is a plain string here: supabase-py's
    `ErrorCode` type leaves out some codes GoTrue sends (`refresh_token_not_found`,
    `refresh_token_already_used`), though it passes them on."""

    def __init__(self, error: AuthApiError) -> None:
        self.code: str | None = error.code
        self.status, self.message = error.status, error.message


def refused(call: Callable[..., object], *args: object) -> Refusal:
    with pytest.raises(AuthApiError) as caught:
        call(*args)
    return Refusal(caught.value)


# --------------------------------------------------------------------------- password


def test_password_sign_in_gives_a_gotrue_session(
    stack: Stack, gotrue: SyncGoTrueClient, password_user: PasswordUser
) -> None:
    response = gotrue.sign_in_with_password(
        {"email": password_user.email, "password": password_user.password}
    )

    session = response.session
    assert session is not None and response.user is not None
    assert session.token_type == "bearer" and session.expires_in == 3600
    assert session.expires_at == claims_of(session.access_token)["exp"]
    assert response.user.id == str(password_user.id) and response.user.email == password_user.email
    assert response.user.last_sign_in_at is not None
    claims = claims_of(session.access_token)
    assert claims["sub"] == str(password_user.id)
    assert claims["amr"][0]["method"] == "password"
    user = gotrue.get_user(session.access_token)
    assert user is not None and user.user.id == str(password_user.id)


def test_a_wrong_password_and_an_unknown_email_are_refused_alike(
    gotrue: SyncGoTrueClient, password_user: PasswordUser
) -> None:
    wrong = refused(
        gotrue.sign_in_with_password, {"email": password_user.email, "password": "not-it"}
    )
    unknown = refused(
        gotrue.sign_in_with_password, {"email": new_email(), "password": password_user.password}
    )

    for error in (wrong, unknown):
        assert error.code == "invalid_credentials"
        assert error.status == 400
        assert error.message == "Invalid login credentials"


async def test_a_user_without_a_password_cannot_sign_in_with_one(
    stack: Stack, gotrue: SyncGoTrueClient
) -> None:
    email = new_email()
    await create_user(stack.config, email)
    try:
        error = refused(gotrue.sign_in_with_password, {"email": email, "password": "anything"})
    finally:
        await delete_user(stack.config, email)
    assert error.code == "invalid_credentials"


def test_the_demo_users_sign_in_with_the_printed_passwords(
    stack: Stack, gotrue: SyncGoTrueClient
) -> None:
    # What `make up` prints: a heading, then one line per user, the email, then the password.
    _, *lines = sign_ins(stack.config, DEMO_MEMBER).splitlines()
    printed = [line.split() for line in lines]
    assert [(who, email, said) for who, email, said, _ in printed] == [
        ("operator:", DEMO_OPERATOR, "password:"),
        ("member:", DEMO_MEMBER, "password:"),
    ]
    for _, email, _, password in printed:
        response = gotrue.sign_in_with_password({"email": email, "password": password})
        assert response.user is not None and response.user.email == email
    operator_token = gotrue.sign_in_with_password(
        {"email": DEMO_OPERATOR, "password": stack.config.secrets.demo_password(DEMO_OPERATOR)}
    )
    assert operator_token.session is not None
    assert app_metadata_grants_operator(
        claims_of(operator_token.session.access_token)["app_metadata"]
    )
    member = refused(
        gotrue.sign_in_with_password,
        {"email": DEMO_MEMBER, "password": stack.config.secrets.demo_password(DEMO_OPERATOR)},
    )
    assert member.code == "invalid_credentials"


# --------------------------------------------------------------------------- refresh


def test_refresh_rotates_the_token_and_keeps_the_session(
    stack: Stack, gotrue: SyncGoTrueClient, password_user: PasswordUser
) -> None:
    first = signed_in(stack.config, password_user)

    second = gotrue.refresh_session(first.refresh_token).session

    assert second is not None
    assert second.refresh_token != first.refresh_token
    assert (
        claims_of(second.access_token)["session_id"] == claims_of(first.access_token)["session_id"]
    )
    # NOTE: the stack's reuse interval is GoTrue's 10 s: a client that lost the answer to its
    # refresh may send the used token again right away.
    retried = gotrue.refresh_session(first.refresh_token).session
    assert retried is not None
    third = gotrue.refresh_session(second.refresh_token).session
    assert third is not None and third.refresh_token not in {
        first.refresh_token,
        second.refresh_token,
    }


def test_a_used_refresh_token_is_refused_after_the_reuse_interval_and_revokes_the_session(
    impatient_stand_in: StackConfig, password_user: PasswordUser
) -> None:
    first = signed_in(impatient_stand_in, password_user)
    with client(impatient_stand_in) as gotrue:
        second = gotrue.refresh_session(first.refresh_token).session
        assert second is not None

        reused = refused(gotrue.refresh_session, first.refresh_token)
        newest = refused(gotrue.refresh_session, second.refresh_token)

    assert reused.code == "refresh_token_already_used" and reused.status == 400
    assert reused.message == "Invalid Refresh Token: Already Used"
    # NOTE: GoTrue takes a late reuse for a stolen token and revokes the token family.
    assert newest.code == "refresh_token_already_used"


def test_an_unknown_refresh_token_is_not_found(gotrue: SyncGoTrueClient) -> None:
    error = refused(gotrue.refresh_session, secrets.token_urlsafe(16))

    assert error.code == "refresh_token_not_found" and error.status == 400


# --------------------------------------------------------------------------- one-time codes


def test_a_one_time_code_from_the_mailbox_signs_in_once(
    stack: Stack, gotrue: SyncGoTrueClient, password_user: PasswordUser
) -> None:
    response = gotrue.sign_in_with_otp(
        {"email": password_user.email, "options": {"should_create_user": False}}
    )
    assert response.user is None and response.session is None
    code = latest_one_time_code(stack.config, password_user.email)
    assert code is not None and len(code) == 6 and code.isdigit()
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"

    wrong_error = refused(
        gotrue.verify_otp, {"type": "email", "email": password_user.email, "token": wrong}
    )
    signed = gotrue.verify_otp({"type": "email", "email": password_user.email, "token": code})
    used_error = refused(
        gotrue.verify_otp, {"type": "email", "email": password_user.email, "token": code}
    )

    assert wrong_error.code == "otp_expired" and wrong_error.status == 403
    assert wrong_error.message == "Token has expired or is invalid"
    assert signed.session is not None and signed.user is not None
    assert signed.user.id == str(password_user.id)
    assert claims_of(signed.session.access_token)["amr"][0]["method"] == "otp"
    assert used_error.code == "otp_expired"


def test_a_magiclink_verification_takes_the_code_too(
    stack: Stack, gotrue: SyncGoTrueClient, password_user: PasswordUser
) -> None:
    gotrue.sign_in_with_otp({"email": password_user.email})
    code = latest_one_time_code(stack.config, password_user.email)
    assert code is not None

    signed = gotrue.verify_otp({"type": "magiclink", "email": password_user.email, "token": code})

    assert signed.session is not None


def test_an_expired_one_time_code_is_refused(
    impatient_stand_in: StackConfig, password_user: PasswordUser
) -> None:
    with client(impatient_stand_in) as gotrue:
        gotrue.sign_in_with_otp({"email": password_user.email})
        code = latest_one_time_code(impatient_stand_in, password_user.email)
        assert code is not None

        error = refused(
            gotrue.verify_otp, {"type": "email", "email": password_user.email, "token": code}
        )

    assert error.code == "otp_expired" and error.status == 403


async def test_a_one_time_code_signs_up_a_new_email_unless_told_not_to(
    stack: Stack, gotrue: SyncGoTrueClient
) -> None:
    email = new_email()
    try:
        disabled = refused(
            gotrue.sign_in_with_otp, {"email": email, "options": {"should_create_user": False}}
        )
        assert disabled.code == "otp_disabled" and disabled.status == 422
        assert latest_one_time_code(stack.config, email) is None

        gotrue.sign_in_with_otp({"email": email})
        code = latest_one_time_code(stack.config, email)
        assert code is not None
        signed = gotrue.verify_otp({"type": "email", "email": email, "token": code})
    finally:
        await forget(stack.config, email)

    assert signed.user is not None and signed.user.email == email
    assert signed.user.email_confirmed_at is not None


def test_the_mailbox_command_prints_the_latest_code(
    stack: Stack, gotrue: SyncGoTrueClient, password_user: PasswordUser
) -> None:
    gotrue.sign_in_with_otp({"email": password_user.email})
    gotrue.sign_in_with_otp({"email": password_user.email})
    code = latest_one_time_code(stack.config, password_user.email)
    assert code is not None

    listed = subprocess.run(
        [sys.executable, "-m", "tenantflow_dev.cli", "mailbox", "--email", password_user.email],
        capture_output=True,
        text=True,
        check=True,
    )
    bare = subprocess.run(
        [
            sys.executable,
            "-m",
            "tenantflow_dev.cli",
            "mailbox",
            "--email",
            password_user.email,
            "--code-only",
        ],
        capture_output=True,
        text=True,
        check=True,
    )

    assert listed.stdout.count("\n") == 1 and f"code: {code}" in listed.stdout
    assert bare.stdout == f"{code}\n"
    # NOTE: only the latest code is good: a new one replaces the unused one, as in GoTrue.
    signed = gotrue.verify_otp({"type": "email", "email": password_user.email, "token": code})
    assert signed.session is not None


# --------------------------------------------------------------------------- logout


def test_logout_revokes_the_refresh_tokens_and_the_session(
    stack: Stack, password_user: PasswordUser
) -> None:
    with client(stack.config) as gotrue:
        session = gotrue.sign_in_with_password(
            {"email": password_user.email, "password": password_user.password}
        ).session
        assert session is not None
        gotrue.sign_out()

        refresh = refused(gotrue.refresh_session, session.refresh_token)
        user = refused(gotrue.get_user, session.access_token)

    assert refresh.code == "refresh_token_not_found"
    assert user.code == "session_not_found" and user.status == 403


def test_a_local_logout_keeps_the_other_sessions(stack: Stack, password_user: PasswordUser) -> None:
    kept = signed_in(stack.config, password_user)
    with client(stack.config) as gotrue:
        ended = gotrue.sign_in_with_password(
            {"email": password_user.email, "password": password_user.password}
        ).session
        assert ended is not None
        gotrue.sign_out({"scope": "local"})

        refused_refresh = refused(gotrue.refresh_session, ended.refresh_token)
        still = gotrue.refresh_session(kept.refresh_token).session

    assert refused_refresh.code == "refresh_token_not_found"
    assert still is not None


# --------------------------------------------------------------------------- admin API


def test_admin_grants_the_operator_role_which_a_refresh_then_carries(
    stack: Stack, gotrue: SyncGoTrueClient, password_user: PasswordUser
) -> None:
    admin = admin_api(stack.config)
    before = signed_in(stack.config, password_user)
    assert not app_metadata_grants_operator(claims_of(before.access_token)["app_metadata"])

    granted = admin.update_user_by_id(
        str(password_user.id), {"app_metadata": {"roles": [OPERATOR_ROLE]}}
    )
    refreshed = gotrue.refresh_session(before.refresh_token).session

    # NOTE: merged like GoTrue: the keys not named stay.
    assert granted.user.app_metadata == {
        "provider": "email",
        "providers": ["email"],
        "roles": [OPERATOR_ROLE],
    }
    assert admin.get_user_by_id(str(password_user.id)).user.app_metadata == (
        granted.user.app_metadata
    )
    assert refreshed is not None
    assert app_metadata_grants_operator(claims_of(refreshed.access_token)["app_metadata"])

    revoked = admin.update_user_by_id(str(password_user.id), {"app_metadata": {"roles": None}})
    after = gotrue.refresh_session(refreshed.refresh_token).session
    assert "roles" not in revoked.user.app_metadata
    assert after is not None
    assert not app_metadata_grants_operator(claims_of(after.access_token)["app_metadata"])


def test_admin_creates_lists_and_deletes_users(stack: Stack, gotrue: SyncGoTrueClient) -> None:
    admin = admin_api(stack.config)
    email, password = new_email(), secrets.token_urlsafe(12)
    created = admin.create_user({"email": email, "password": password, "email_confirm": True})
    try:
        duplicate = refused(admin.create_user, {"email": email, "password": password})
        page = admin.list_users(page=1, per_page=2)
        signed = gotrue.sign_in_with_password({"email": email, "password": password})
    finally:
        admin.delete_user(created.user.id)

    assert duplicate.code == "email_exists" and duplicate.status == 422
    assert len(page) == 2
    assert signed.user is not None and signed.user.id == created.user.id
    gone = refused(admin.get_user_by_id, created.user.id)
    assert gone.code == "user_not_found" and gone.status == 404


def test_the_admin_api_refuses_any_bearer_but_the_service_role(
    stack: Stack, password_user: PasswordUser
) -> None:
    user_token = signed_in(stack.config, password_user).access_token

    for bearer in (user_token, stack.config.secrets.anon_key):
        error = refused(admin_api(stack.config, bearer).list_users)
        assert error.code == "not_admin" and error.status == 403
        update = refused(
            admin_api(stack.config, bearer).update_user_by_id,
            str(password_user.id),
            {"app_metadata": {"roles": [OPERATOR_ROLE]}},
        )
        assert update.code == "not_admin"
    user = admin_api(stack.config).get_user_by_id(str(password_user.id)).user
    assert not app_metadata_grants_operator(user.app_metadata)


# --------------------------------------------------------------------------- settings


def test_the_env_settings_carry_the_seal_public_key_but_never_the_service_role_key(
    stack: Stack,
) -> None:
    environment = stack.config.environment()

    assert environment["SEAL_PUBLIC_KEY"] == public_key(stack.config.secrets.seal_private_key)
    assert environment["SUPABASE_ANON_KEY"] == stack.config.secrets.anon_key
    assert stack.config.secrets.service_role_key not in "".join(environment.values())
    assert stack.config.secrets.jwt_secret not in "".join(environment.values())
