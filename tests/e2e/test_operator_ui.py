"""The operator's path in a real browser: a `client-report` custom run from the Prefect UI.

Playwright for Python drives Debian's `/usr/bin/chromium` headless (installed by
`TENANTFLOW_WITH_BROWSER=1 scripts/bootstrap.sh`, which `make test` runs; Playwright's own
browser download is never used). The browser opens the address `make up` prints, signs in
on the UI's login form with the stack's Prefect API auth string, follows the server to
its default UI (Prefect 3.9's React UI under `/v2/`), goes to the
`client-report` deployment, starts a custom run filling the form as an operator would
(client id, two dates through the date picker; the member's plain access token pasted by
mistake, which the form and the server refuse without repeating it; then the token
`tenantflow token` printed for exactly this run, the member signed in with `tenantflow
login`), waits for Completed on the run page and opens the
report artifact. The API and the database then confirm what the page showed, and that
the token was not kept.

Evidence lands in `test-output/operator-ui/` (gitignored): a screenshot per milestone,
`timings.json`, and on failure a screenshot and the page's HTML (token removed) for the
step that failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Playwright,
    Response,
    Route,
    async_playwright,
)
from playwright.async_api import (
    TimeoutError as PlaywrightTimeoutError,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterName,
)
from prefect.client.schemas.objects import StateType

from tenantflow.sealing import public_key
from tenantflow.tenancy.run_token import SPENT
from tenantflow_dev import Stack
from tenantflow_dev.demo import ACME, DEMO_MEMBERSHIPS

pytestmark = [pytest.mark.slow, pytest.mark.stack]

PROJECT = Path(__file__).resolve().parents[2]
OUTPUT = PROJECT / "test-output" / "operator-ui"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
DEPLOYMENT = "client-report/client-report"
#: Alice: an accepted member (owner) of Acme Corp in the demo data.
MEMBER = next(e for e, c, _, accepted in DEMO_MEMBERSHIPS if c == ACME and accepted)
COMPLETED_WITHIN = 120.0  # seconds from Submit to Completed on the run page
UI_TIMEOUT_MS = 30_000  # each single UI expectation; the SPA loads lazily on a busy machine
RELOAD_EVERY_MS = 5_000
SUBMIT_ATTEMPTS = 3
TOAST_TIMEOUT_MS = 3_000


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Evidence:
    """Screenshots per milestone, timings; on a failing step its screenshot, HTML, console."""

    def __init__(self, page: Page, *secrets: str) -> None:
        self.page = page
        self.secrets = secrets
        self.console: list[str] = []
        self.timings: dict[str, Any] = {"step_s": {}}
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        page.on("response", self._response)

    def _console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.console.append(f"http {response.status}: {response.request.method} {response.url}")

    async def shot(self, name: str) -> Path:
        path = OUTPUT / f"{name}.png"
        await self.page.screenshot(path=path, full_page=True)
        return path

    @asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[None]:
        started = time.monotonic()
        try:
            yield
        except BaseException as exc:
            stem = OUTPUT / f"failure-{_slug(name)}"
            notes = [f"step: {name}", f"url: {self.page.url}", f"error: {exc!r}", ""]
            try:
                await self.page.screenshot(path=stem.with_suffix(".png"), full_page=True)
                html = await self.page.content()
                # React mirrors a controlled input's value into the DOM: keep secrets out.
                for secret in self.secrets:
                    html = html.replace(secret, "<secret>")
                stem.with_suffix(".html").write_text(html)
            except Exception as capture_error:  # the page may be gone; keep the first error
                notes.append(f"(could not capture the page: {capture_error!r})")
            stem.with_suffix(".log").write_text("\n".join([*notes, *self.console]) + "\n")
            raise
        finally:
            self.timings["step_s"][name] = round(time.monotonic() - started, 1)
            self.save_timings()

    def save_timings(self) -> None:
        (OUTPUT / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n")


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `make test` installs it "
            "(or run `TENANTFLOW_WITH_BROWSER=1 bash scripts/bootstrap.sh`)"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    playwright: Playwright
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def context(browser: Browser, stack: Stack) -> AsyncIterator[BrowserContext]:
    ui = urlsplit(stack.config.prefect_ui_url).netloc
    context = await browser.new_context(
        viewport={"width": 1400, "height": 1000},
        locale="en-US",
        # An operator far from UTC: the dates typed must reach the run unshifted.
        timezone_id="Pacific/Auckland",
        service_workers="block",
    )

    async def only_the_stack(route: Route) -> None:
        # The UI reports analytics to a third party: keep the run hermetic and offline.
        if urlsplit(route.request.url).netloc == ui:
            await route.continue_()
        else:
            await route.abort()

    await context.route("**/*", only_the_stack)
    context.set_default_timeout(UI_TIMEOUT_MS)
    context.set_default_navigation_timeout(UI_TIMEOUT_MS)
    try:
        yield context
    finally:
        await context.close()


def _creates_the_run(response: Response) -> bool:
    return response.request.method == "POST" and response.url.endswith("/create_flow_run")


def _validates_the_form(response: Response) -> bool:
    return response.request.method == "POST" and response.url.endswith("/ui/schemas/validate")


def _field(page: Page, schema: dict[str, Any], name: str) -> Locator:
    """A parameter's input, found by its label: the schema's title, or the name itself.

    Prefect 3.9 labels a field with the schema's `title` (today the parameter's name: it
    does not carry `Annotated[..., Field(title=...)]` over) and puts the docstring's
    description beside the label, not in it.
    """
    title = schema.get("properties", {}).get(name, {}).get("title") or name
    label = "|".join(re.escape(text) for text in {name, title})
    return page.get_by_label(re.compile(rf"^\s*({label})\b"))


async def _fill_date(trigger: Locator, day: date) -> None:
    """Prefect's React date picker: a button opening a popover with a yyyy-MM-dd box."""
    page = trigger.page
    await trigger.click()
    popover = page.get_by_role("dialog")
    await popover.get_by_label("Date (yyyy-MM-dd)").fill(day.isoformat())
    await popover.get_by_label("Date (yyyy-MM-dd)").press("Enter")
    if await popover.is_visible():
        await page.keyboard.press("Escape")
    await popover.wait_for(state="hidden")
    # The button now reads e.g. "November 18th, 2026".
    text = await trigger.inner_text()
    assert day.strftime("%B") in text, text
    assert str(day.year) in text, text


async def _submit(page: Page) -> tuple[uuid.UUID, int]:
    """Click Submit; click again (as an operator would) if the server answered 503.

    Prefect answers 503 for database errors a client may retry (SQLite "database is
    locked" when other runs keep the server busy). Returns the id of the flow run the
    UI created and the number of clicks.
    """
    for attempt in range(1, SUBMIT_ATTEMPTS + 1):
        async with page.expect_response(_creates_the_run) as answer:
            await page.get_by_role("button", name="Submit", exact=True).click()
        response = await answer.value
        if response.ok:
            created = await response.json()
            return uuid.UUID(created["id"]), attempt
        if response.status != 503 or attempt == SUBMIT_ATTEMPTS:
            raise AssertionError(
                f"create_flow_run answered {response.status}: {await response.text()}"
            )
        await page.wait_for_timeout(3_000)
    raise AssertionError("unreachable")


async def _wait_for_final_state(page: Page, deadline: float) -> tuple[str, int]:
    """Watch the run page's state badge, reloading now and then, until a final state.

    Returns the state's name and how many reloads it took.
    """
    final = (
        page.get_by_text(re.compile(r"^(Completed|Failed|Crashed|Cancelled)$"))
        .filter(visible=True)
        .first
    )
    reloads = 0
    while True:
        try:
            # The SPA changes the URL before it swaps the page: wait for the run page's own
            # tabs, or the previous page's state badges would be read as this run's.
            await page.get_by_role("tab", name="Logs", exact=True).wait_for()
            await final.wait_for(state="visible", timeout=RELOAD_EVERY_MS)
            return (await final.inner_text()).strip(), reloads
        except PlaywrightTimeoutError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the run page did not show a final state within {COMPLETED_WITHIN:.0f}s"
                ) from None
            await page.reload()
            reloads += 1


def _signed_in_tokens(stack: Stack, home: Path, period: tuple[date, date]) -> tuple[str, str]:
    """What the operator's own shell gives them: `tenantflow login` as the member (the
    password on stdin), then `tenantflow token` for the run they will start in the UI.
    Returns the member's plain access token (from the session file) and the sealed one."""
    config = stack.config
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "SUPABASE_URL": config.supabase_url,
        "SUPABASE_ANON_KEY": config.secrets.anon_key,
        "SEAL_PUBLIC_KEY": public_key(config.secrets.seal_private_key),
    }
    command = [str(Path(sys.executable).parent / "tenantflow")]

    def run(*args: str, stdin: str = "") -> str:
        done = subprocess.run(
            [*command, *args], input=stdin, env=env, cwd=home, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout, done.stderr)
        return done.stdout

    run("login", "--email", MEMBER, "--password-stdin", stdin=config.secrets.demo_password(MEMBER))
    # NOTE: a seal binds every parameter of its run: the dates the operator will pick.
    sealed = run(
        "token", "--flow", "client-report", "--client", str(ACME.id),
        "--param", f"period_start={period[0]}", "--param", f"period_end={period[1]}",
    ).strip()  # fmt: skip
    session = json.loads((home / ".config" / "tenantflow" / "session.json").read_text())
    return session["access_token"], sealed


async def test_operator_runs_a_client_report_from_the_ui(
    stack: Stack, context: BrowserContext, admin_conn: asyncpg.Connection, tmp_path: Path
) -> None:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    config = stack.config
    run_name = f"operator-ui-{uuid.uuid4().hex[:8]}"
    period_end = datetime.now(UTC).date()
    period_start = period_end - timedelta(days=6)
    token, sealed = _signed_in_tokens(stack, tmp_path, (period_start, period_end))
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(DEPLOYMENT)

    page = await context.new_page()
    auth_string = config.secrets.prefect_auth_string
    evidence = Evidence(page, token, auth_string)
    timings = evidence.timings
    timings["run_name"] = run_name

    async with evidence.step("sign in"):
        await page.goto(config.prefect_ui_url)
        # The API wants basic auth: the UI shows its login form, which takes the whole
        # `user:password` auth string (`make up` prints it).
        await page.wait_for_url(re.compile(r"/login"))
        password = page.get_by_placeholder("admin:pass")
        assert await password.get_attribute("type") == "password"
        await evidence.shot("00-login")
        await password.fill(auth_string)
        await page.get_by_role("button", name="Login", exact=True).click()
        await page.get_by_role("link", name="Deployments", exact=True).wait_for()
        assert "/login" not in page.url

    async with evidence.step("open the UI"):
        # `/` sends a browser to the default UI; in Prefect 3.9 that is the React UI.
        assert "/v2/" in page.url, f"expected Prefect's default (v2) UI, landed on {page.url}"
        await page.get_by_role("link", name="Deployments", exact=True).click()
        await page.wait_for_url(re.compile(r"/v2/deployments"))

    async with evidence.step("open the client-report deployment"):
        # The row has two links named client-report (deployment and flow): take the deployment.
        await page.locator(f'a[href$="/deployments/deployment/{deployment.id}"]').first.click()
        await page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment.id}"))

    async with evidence.step("open the custom run form"):
        await page.get_by_role("button", name="Run", exact=True).click()
        await page.get_by_role("menuitem", name="Custom run").click()
        await page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment.id}/run"))

    async with evidence.step("fill the form"):
        await page.get_by_label("Run Name", exact=True).fill(run_name)
        schema = deployment.parameter_openapi_schema or {}
        await _field(page, schema, "client_id").fill(str(ACME.id))
        await _fill_date(_field(page, schema, "period_start"), period_start)
        await _fill_date(_field(page, schema, "period_end"), period_end)
        token_box = _field(page, schema, "access_token")
        assert await token_box.get_attribute("type") == "password"

    async with evidence.step("a plain token is refused without being repeated"):
        # The operator pastes the member's plain access token by mistake: the form shows
        # the schema's refusal, which names what was expected, never the value, and the
        # server refuses to create the run.
        await token_box.fill(token)
        async with page.expect_response(_creates_the_run) as answer:
            await page.get_by_role("button", name="Submit", exact=True).click()
        response = await answer.value
        assert response.status in (409, 422), response.status
        refused = await response.text()
        refusal = page.get_by_text("a sealed access token (tenantflow seal)' was expected")
        await refusal.filter(visible=True).first.wait_for()
        toast = page.get_by_role("listitem").filter(has_text="Error creating flow run")
        await toast.wait_for()
        await evidence.shot("01-plain-token-refused")
        # What the page shows (input values aside) and what the server answered.
        for text in (await page.locator("body").inner_text(), refused):
            assert token not in text
            assert token.split(".")[1] not in text and token.split(".")[2] not in text
        async with get_client() as client:
            created = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name]))
            )
        assert created == [], "a run was created with a plain access token"
        # The toast covers Submit, and stays while the pointer rests on it.
        await page.mouse.move(0, 0)
        await toast.wait_for(state="hidden")

    async with evidence.step("paste the sealed token"):
        # The sealed token, as `make up` prints it, in the same one-line box.
        await token_box.fill(sealed)
        # NOTE: once Prefect 3.9's form has shown errors, its next Submit only validates
        # the form again (through the server) and clears them; the click after submits.
        async with page.expect_response(_validates_the_form) as checked:
            await page.get_by_role("button", name="Submit", exact=True).click()
        assert (await (await checked.value).json())["valid"] is True
        await refusal.filter(visible=True).first.wait_for(state="hidden")
        await evidence.shot("01-custom-run-form")

    async with evidence.step("submit"):
        submitted = time.monotonic()
        flow_run_id, timings["submit_clicks"] = await _submit(page)
        timings["flow_run_id"] = str(flow_run_id)
        # Back on the deployment page, a toast "<run name> scheduled to start now" offers
        # "View run". (The page's run list hides the run while it is still Scheduled.)
        await page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment.id}(\?|$)"))
        toast = page.get_by_role("listitem").filter(has_text=run_name)
        try:
            await toast.get_by_role("button", name="View run").click(timeout=TOAST_TIMEOUT_MS)
            timings["run_page_via"] = "toast"
        except PlaywrightTimeoutError:
            # The toast is gone after a few seconds: a slow machine may miss it.
            await page.goto(f"{config.prefect_ui_url}/v2/runs/flow-run/{flow_run_id}")
            timings["run_page_via"] = "link"
        await page.wait_for_url(re.compile(rf"/runs/flow-run/{flow_run_id}"))

    async with evidence.step("wait for Completed"):
        shown, reloads = await _wait_for_final_state(page, submitted + COMPLETED_WITHIN)
        timings["submit_to_completed_in_ui_s"] = round(time.monotonic() - submitted, 1)
        timings["run_page_reloads"] = reloads
        if shown != "Completed":
            async with get_client() as client:
                state = (await client.read_flow_run(flow_run_id)).state
            raise AssertionError(f"the run ended {shown}: {state!r}")

    async with evidence.step("the parameters shown hold only ciphertext"):
        await page.get_by_role("tab", name="Parameters", exact=True).click()
        await page.get_by_text(run_name, exact=True).first.wait_for()
        # NOTE: the sealed value, or what the worker's housekeeping leaves of it once the run
        # has ended (a pass may fall between Completed and this page).
        await page.get_by_text(sealed[:40]).or_(page.get_by_text(SPENT)).first.wait_for()
        content = await page.content()
        assert token not in content and token.split(".")[2] not in content
        await evidence.shot("02-run-completed-parameters")

    async with evidence.step("open the report artifact"):
        await page.get_by_role("tab", name="Artifacts", exact=True).click()
        key = f"client-report-{ACME.id}"
        await (
            page.get_by_role("link")
            .filter(has=page.get_by_role("heading", name=key, exact=True))
            .click()
        )
        await page.wait_for_url(re.compile(r"/artifacts/artifact/"))
        await page.get_by_role("heading", name=f"Report for {ACME.name}").wait_for()
        await page.get_by_text(f"{period_start} to {period_end}").first.wait_for()
        assert token not in await page.content()
        await evidence.shot("03-report-artifact")

    # What the page showed, confirmed through the API and the database.
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    assert run.name == run_name
    assert run.deployment_id == deployment.id
    assert run.state and run.state.type == StateType.COMPLETED
    # The value the form stored; once the run ended, the workers' housekeeping may have
    # removed it already.
    assert run.parameters["access_token"] in (sealed, SPENT)
    assert token.split(".")[2] not in json.dumps(run.parameters)
    assert run.parameters["client_id"] == str(ACME.id)
    # The date picker kept the days the operator typed (no time-zone shift).
    assert run.parameters["period_start"] == period_start.isoformat()
    assert run.parameters["period_end"] == period_end.isoformat()
    assert f"client-report-{ACME.id}" in {a.key for a in artifacts}

    rows = await admin_conn.fetch(
        "SELECT client_id, period_start, period_end FROM public.client_reports "
        "WHERE flow_run_id = $1",
        flow_run_id,
    )
    assert [tuple(r) for r in rows] == [(ACME.id, period_start, period_end)]

    if run.start_time and run.end_time:
        timings["run_created_to_start_s"] = round((run.start_time - run.created).total_seconds(), 1)
        timings["run_start_to_end_s"] = round((run.end_time - run.start_time).total_seconds(), 1)
    evidence.save_timings()
