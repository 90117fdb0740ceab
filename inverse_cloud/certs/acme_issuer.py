"""Account registration and certificate orders over certbot's synchronous ``acme`` library (RFC 8555),
with HTTP-01 or TLS-ALPN-01 (RFC 8737; acme 5 dropped its own support, so the challenge type is declared
here and the answer is built by :mod:`inverse_cloud.certs.tls_alpn`). Imported only when an order or a
registration is due (``acme``, ``josepy`` and ``requests`` cost several MiB that a server with a valid
certificate does not need to hold); see :class:`~inverse_cloud.certs.acme_client.AcmeDriver`, the interface
the rest of the program uses.

The library drops headers on error responses; a ``requests`` response hook keeps the last ``Retry-After``
so 429/503 answers become :class:`~inverse_cloud.errors.RateLimited` with the CA's wait.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import requests
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import crypto_util, messages
from acme import errors as acme_errors
from cryptography import x509
from josepy import jwa, jwk
from josepy.json_util import field as jose_field

from inverse_cloud.certs.acme_base import (
    FIRST_POLL_S,
    MAX_POLL_S,
    NETWORK_TIMEOUT_S,
    NONCE_ATTEMPTS,
    ORDER_DEADLINE_S,
    AccountStore,
    ChallengeAnswers,
    Issued,
    connection_reason,
    generate_key,
)
from inverse_cloud.certs.policy import parse_retry_after, parse_retry_after_detail
from inverse_cloud.certs.tls_alpn import AlpnResponder, challenge_context
from inverse_cloud.config import AcmeConfig
from inverse_cloud.errors import AcmeError, RateLimited

__all__ = ["AcmeIssuer"]

log = logging.getLogger("inverse_cloud.certs.acme_client")

T = TypeVar("T")


@acme_challenges.ChallengeResponse.register
class TLSALPN01Response(acme_challenges.KeyAuthorizationChallengeResponse):
    """The answer to a tls-alpn-01 challenge: an empty object, as for http-01 (RFC 8555 section 7.5.1)."""

    typ = "tls-alpn-01"


@acme_challenges.Challenge.register
class TLSALPN01(acme_challenges.KeyAuthorizationChallenge):
    """tls-alpn-01 (RFC 8737), which acme 5 no longer declares (it would parse as UnrecognizedChallenge)."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: jwk.JWK, **unused_kwargs: Any) -> str:
        """The key authorization; its SHA-256 goes into the challenge certificate."""
        return self.key_authorization(account_key)


_CHALLENGE_TYPES: dict[str, type[acme_challenges.KeyAuthorizationChallenge]] = {
    "http-01": acme_challenges.HTTP01, "tls-alpn-01": TLSALPN01}


class _NewOrderReplacing(messages.NewOrder):
    """newOrder with RFC 9773 ``replaces`` (acme 5.9 has no such field)."""

    replaces: str = jose_field("replaces", omitempty=True)


class _Client(acme_client.ClientV2):
    def new_order_replacing(self, csr_pem: bytes, identifiers: list[messages.Identifier],
                            replaces: str) -> messages.OrderResource:
        # Mirrors ClientV2.new_order (acme 5.9, pinned <6) with the extra field.
        order = _NewOrderReplacing(identifiers=identifiers, replaces=replaces)
        response = self._post(self.directory["newOrder"], order)
        body = messages.Order.from_json(response.json())
        authorizations = [self._authzr_from_response(self._post_as_get(url), uri=url) for url in body.authorizations]
        order_resource: messages.OrderResource = messages.OrderResource(
            body=body, uri=response.headers.get("Location"), authorizations=authorizations, csr_pem=csr_pem)
        return order_resource


class _LastResponse:
    """Per-thread record of the last HTTP response (status, Retry-After), fed by a requests hook."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.bad_nonces = 0   # badNonce answers seen, including those the library retried by itself

    def hook(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        self._local.value = (response.status_code, response.headers.get("Retry-After"), response.url)
        if response.status_code == 400 and b"badNonce" in response.content[:2048]:
            self.bad_nonces += 1
        return response

    def clear(self) -> None:
        self._local.value = None

    @property
    def value(self) -> tuple[int, str | None, str] | None:
        v: tuple[int, str | None, str] | None = getattr(self._local, "value", None)
        return v


class AcmeIssuer:
    """The account and order half of :class:`~inverse_cloud.certs.acme_client.AcmeDriver`, over the ``acme``
    library. Its blocking methods run in the driver's ACME threads (``run``), never on the event loop."""

    def __init__(self, cfg: AcmeConfig, domain: str, accounts: AccountStore, user_agent: str,
                 run: Callable[..., Awaitable[Any]]) -> None:
        self.cfg, self.domain, self.accounts, self.user_agent = cfg, domain, accounts, user_agent
        self._run = run
        self._client: _Client | None = None
        self._key: jwk.JWKEC | None = None
        self._last = _LastResponse()
        self._method = "http-01"   # the challenge type of the order in progress (for error lines)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.net.session.close()

    # --- plumbing --------------------------------------------------------------------------------------

    def _connect(self) -> _Client:
        if self._client is not None:
            return self._client
        self._key = self.accounts.load_or_create_key()
        verify: bool | str = str(self.cfg.ca_bundle) if self.cfg.ca_bundle else True
        # verify_ssl is handed to requests as verify=, which also takes a CA file path.
        net = acme_client.ClientNetwork(self._key, alg=jwa.ES256, verify_ssl=verify,  # type: ignore[arg-type]
                                        user_agent=self.user_agent, timeout=NETWORK_TIMEOUT_S)
        net.session.hooks["response"].append(self._last.hook)
        directory = self._call(acme_client.ClientV2.get_directory, self.cfg.directory, net, step="directory")
        self._client = _Client(directory, net)
        return self._client

    def _call(self, fn: Callable[..., T], *args: Any, step: str) -> T:
        """Run one library call; retry badNonce; translate every failure into one AcmeError line."""
        for attempt in range(NONCE_ATTEMPTS):
            self._last.clear()
            try:
                return fn(*args)
            except messages.Error as exc:
                if exc.code == "badNonce" and attempt + 1 < NONCE_ATTEMPTS:
                    log.debug("badNonce at %s; retrying (%d)", step, attempt + 1)
                    continue
                raise self._translate(exc, step) from exc
            except Exception as exc:  # boundary to the sync library: everything becomes one AcmeError line
                raise self._translate(exc, step) from exc
        raise AssertionError("unreachable")

    def _translate(self, exc: BaseException, step: str) -> AcmeError:
        where = self.cfg.directory
        last = self._last.value
        status = last[0] if last else 0
        now = dt.datetime.now(dt.UTC)
        retry_after = parse_retry_after(last[1], now) if last else None
        if isinstance(exc, messages.Error):
            detail = exc.detail or exc.title or exc.description or str(exc.typ)
            if retry_after is None and exc.detail:
                retry_after = parse_retry_after_detail(exc.detail, now)
            if exc.code == "rateLimited" or status == 429:
                return RateLimited(f"rate-limited by ACME server {where} at {step}: {detail}", retry_after)
            if status == 503:
                return RateLimited(f"ACME server {where} unavailable (HTTP 503) at {step}: {detail}", retry_after)
            return AcmeError(f"ACME server {where} refused {step}: {detail} ({exc.code or exc.typ})")
        if isinstance(exc, acme_errors.ValidationError):
            return AcmeError(f"the CA could not validate {self._where(self._method)}: {_validation_detail(exc)}")
        if isinstance(exc, acme_errors.TimeoutError):
            return AcmeError(f"ACME order at {where} not finished within {ORDER_DEADLINE_S:.0f} s ({step})")
        if isinstance(exc, acme_errors.IssuanceError):
            return AcmeError(f"ACME server {where} did not issue: {exc.error.detail or exc.error.typ}")
        if isinstance(exc, requests.exceptions.SSLError):
            return AcmeError(f"cannot verify the TLS certificate of ACME server {where} "
                             "(for a private CA set [acme] ca_bundle)")
        if isinstance(exc, requests.exceptions.Timeout):
            return AcmeError(f"cannot reach ACME server {where}: timed out ({step})")
        if isinstance(exc, requests.exceptions.ConnectionError):
            return AcmeError(f"cannot reach ACME server {where}: {connection_reason(exc)}")
        if status >= 500 or status == 429:
            cls = RateLimited if status in (429, 503) else None
            msg = f"ACME server {where} answered HTTP {status} at {step}"
            return cls(msg, retry_after) if cls else AcmeError(msg)
        if isinstance(exc, AcmeError):
            return exc
        return AcmeError(f"ACME {step} at {where} failed: {type(exc).__name__}: {exc}")

    @property
    def bad_nonces(self) -> int:
        """How many badNonce answers the CA gave this driver (all retried)."""
        return self._last.bad_nonces

    # --- account ---------------------------------------------------------------------------------------

    def _ensure_account(self, *, fresh: bool = False) -> str:
        client = self._connect()
        directory = self.cfg.directory
        uri = "" if fresh else self.accounts.account_uri(directory)
        if uri:
            client.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
            return uri
        assert self._key is not None
        eab = None
        if self.cfg.eab_kid:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=self._key.public_key(), kid=self.cfg.eab_kid,
                hmac_key=self.cfg.eab_hmac_key, directory=client.directory)
        reg = messages.NewRegistration.from_data(email=self.cfg.email or None, terms_of_service_agreed=True,
                                                 external_account_binding=eab)
        client.net.account = None  # newAccount is signed with the JWK, not a kid
        try:
            regr = self._call(client.new_account, reg, step="newAccount")
            new_uri = str(regr.uri)
        except AcmeError as exc:
            cause = exc.__cause__
            if not isinstance(cause, acme_errors.ConflictError):
                raise
            # The CA already knows this key: that is our account (no duplicate is created).
            new_uri = cause.location
            client.net.account = messages.RegistrationResource(uri=new_uri, body=messages.Registration())
        self.accounts.save_account_uri(directory, new_uri)
        log.info("ACME account %s at %s", new_uri, directory)
        return new_uri

    async def ensure_account(self) -> str:
        """The account URL, registering the (persisted) key if this directory does not know it yet.

        :raises AcmeError: the CA cannot be reached or refuses.
        """
        uri: str = await self._run(self._ensure_account)
        return uri

    def _with_account(self, fn: Callable[[], T], step: str) -> T:
        """Run ``fn``; if the CA no longer knows our account, register the same key again once."""
        self._ensure_account()
        try:
            return fn()
        except AcmeError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, messages.Error) and cause.code == "accountDoesNotExist"):
                raise
        old = self.accounts.account_uri(self.cfg.directory)
        new = self._ensure_account(fresh=True)
        log.warning("ACME server %s no longer knows account %s; registered the same key again as %s "
                    "(update the CAA record: inverse-cloud cert caa)", self.cfg.directory, old, new)
        return fn()

    # --- issuance --------------------------------------------------------------------------------------

    def _new_order(self, csr_pem: bytes, replaces: str) -> messages.OrderResource:
        client = self._connect()
        if replaces and _offers(client.directory, "renewalInfo"):
            ident = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=self.domain)]
            try:
                return self._call(client.new_order_replacing, csr_pem, ident, replaces, step="newOrder")
            except RateLimited:
                raise
            except AcmeError as exc:
                # alreadyReplaced, or a CA that rejects the field: ARI must never block a renewal.
                log.info("newOrder with replaces=%s refused (%s); ordering without it", replaces, exc)
        return self._call(client.new_order, csr_pem, step="newOrder")

    def _poll_authorization(self, authzr: messages.AuthorizationResource, deadline: float
                            ) -> messages.AuthorizationResource:
        client = self._connect()
        delay = FIRST_POLL_S
        while True:
            authzr, response = self._call(client.poll, authzr, step="authorization")
            if authzr.body.status != messages.STATUS_PENDING:
                return authzr
            if time.monotonic() + delay > deadline:
                raise AcmeError(f"the CA did not validate {self.domain} within {ORDER_DEADLINE_S:.0f} s")
            time.sleep(_poll_delay(response, delay))  # in the ACME worker thread, never on the loop
            delay = min(delay * 2, MAX_POLL_S)

    def _finalize(self, orderr: messages.OrderResource, deadline: float) -> messages.OrderResource:
        client = self._connect()
        orderr = self._call(client.begin_finalization, orderr, step="finalize")
        delay = FIRST_POLL_S
        while True:
            body = orderr.body
            if body.status == messages.STATUS_VALID and body.certificate:
                cert = self._call(client._post_as_get, body.certificate, step="certificate download")
                done: messages.OrderResource = orderr.update(fullchain_pem=cert.text)
                return done
            if body.status == messages.STATUS_INVALID:
                detail = body.error.detail if body.error is not None else "no reason given"
                raise AcmeError(f"ACME server {self.cfg.directory} marked the order invalid: {detail}")
            if time.monotonic() + delay > deadline:
                raise AcmeError(f"ACME order at {self.cfg.directory} not finished within {ORDER_DEADLINE_S:.0f} s")
            time.sleep(delay)  # in the ACME worker thread
            response = self._call(client._post_as_get, orderr.uri, step="order")
            orderr = orderr.update(body=messages.Order.from_json(response.json()))
            delay = min(delay * 2, MAX_POLL_S)

    def _where(self, method: str) -> str:
        if method == "tls-alpn-01":
            return f"{self.domain}:443 (tls-alpn-01)"
        return f"http://{self.domain}/.well-known/acme-challenge/…"

    async def issue(self, challenges: ChallengeAnswers, *, alpn: AlpnResponder | None = None, method: str = "http-01",
                    replaces: str = "") -> Issued:
        """Order, answer ``method`` (HTTP-01 through ``challenges``, a ChallengeStore; TLS-ALPN-01 through
        ``alpn``, the HTTPS listener's responder), finalize, download.

        :raises RateLimited: 429/503 with the CA's Retry-After; :raises AcmeError: anything else.
        """
        kind = _CHALLENGE_TYPES[method]
        self._method = method
        if method == "tls-alpn-01" and alpn is None:
            raise AcmeError("tls-alpn-01 needs the HTTPS listener's responder (none given)")
        key_pem = await self._run(generate_key, self.cfg.key_type)
        csr_pem = await self._run(crypto_util.make_csr, key_pem, [self.domain])
        orderr = await self._run(self._with_account, lambda: self._new_order(csr_pem, replaces), "newOrder")
        deadline = time.monotonic() + ORDER_DEADLINE_S
        published: list[str] = []
        published_names: list[str] = []
        try:
            for authzr in orderr.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue
                challb = next((c for c in authzr.body.challenges if isinstance(c.chall, kind)), None)
                name = authzr.body.identifier.value
                if challb is None:
                    raise AcmeError(f"ACME server {self.cfg.directory} offers no {method} challenge for {name}")
                assert self._key is not None
                response, validation = challb.response_and_validation(self._key)
                if alpn is not None and method == "tls-alpn-01":
                    alpn.set(name, await self._run(challenge_context, name, validation))
                    published_names.append(name)
                else:
                    token = challb.chall.encode("token")
                    challenges.set(token, validation)
                    published.append(token)
                client = self._client
                assert client is not None
                await self._run(functools.partial(self._call, client.answer_challenge, challb, response,
                                                  step="challenge"))
                done = await self._run(self._poll_authorization, authzr, deadline)
                if done.body.status != messages.STATUS_VALID:
                    raise AcmeError(f"the CA could not validate {self._where(method)}: {_authz_detail(done)}")
            orderr = await self._run(self._finalize, orderr, deadline)
        finally:
            for token in published:
                challenges.remove(token)
            for name in published_names:
                assert alpn is not None
                alpn.remove(name)
        if not orderr.fullchain_pem:
            raise AcmeError(f"ACME server {self.cfg.directory} returned no certificate")
        chain = orderr.fullchain_pem.encode()
        try:
            x509.load_pem_x509_certificates(chain)
        except ValueError as exc:
            raise AcmeError(f"ACME server {self.cfg.directory} returned an unparsable certificate ({exc})") from exc
        return Issued(chain, key_pem, str(orderr.uri or ""))


def _offers(directory: messages.Directory, name: str) -> bool:
    # Directory has __getitem__ but no __contains__: "in" would iterate with integer keys.
    try:
        directory[name]
    except KeyError:
        return False
    return True


def _poll_delay(response: requests.Response, default: float) -> float:
    ra = parse_retry_after(response.headers.get("Retry-After"), dt.datetime.now(dt.UTC))
    return min(max(ra if ra is not None else default, 0.05), 10.0)


def _authz_detail(authzr: messages.AuthorizationResource) -> str:
    for chall in authzr.body.challenges:
        if chall.error is not None:
            return str(chall.error.detail or chall.error.typ)
    return f"authorization {authzr.body.status}"


def _validation_detail(exc: acme_errors.ValidationError) -> str:
    details = [_authz_detail(a) for a in exc.failed_authzrs]
    return "; ".join(details) or "validation failed"


