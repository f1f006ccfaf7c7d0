"""Pull / merge requests (gitflow/forges.py) against a stand-in forge that answers as each forge's API does.

A forge cannot run here: `StandInForge` is a small HTTP server keeping pull
requests in memory and answering GitHub's, Gitea's and GitLab's requests with
their documented status codes and JSON (created, already exists, updated,
refused token, unknown repository, server errors).
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from taskrunner.config import PullRequestConfig
from taskrunner.gitflow.forges import ForgeError, PullRequest, forge_for, token_from_env

TOKEN = "tok-3f9a-secret-value"
FORGES = ("github", "gitea", "gitlab")


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class StandInForge:
    """One forge's pull request API in memory; `kind` is github, gitea or gitlab."""

    kind: str
    repository: str = "acme/widgets"
    pulls: list[dict[str, Any]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    fail_with: int | None = None  # answer requests with this status: every one, or the first `fail_times`
    fail_times: int | None = None
    hang: threading.Event | None = None  # hold every answer until set
    redirect_to: str | None = None

    def __post_init__(self) -> None:
        forge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                forge.seen.append(Seen(self.command, self.path, dict(self.headers.items()),
                                       json.loads(raw) if raw else None))
                if forge.hang is not None:
                    forge.hang.wait(10)
                status, data, headers = forge.answer(self.command, self.path, dict(self.headers.items()),
                                                     json.loads(raw) if raw else None)
                payload = json.dumps(data).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        base = f"http://{host}:{port}"
        return {"github": base, "gitea": f"{base}/api/v1", "gitlab": f"{base}/api/v4"}[self.kind]

    def close(self) -> None:
        if self.hang is not None:
            self.hang.set()
        self.server.shutdown()
        self.server.server_close()

    def config(self, draft: bool = True, repository: str | None = None) -> PullRequestConfig:
        return PullRequestConfig(forge=self.kind, api_url=self.url, repository=repository or self.repository,
                                 token_env="FORGE_TOKEN", draft=draft)

    # -- the APIs --------------------------------------------------------------------

    def answer(self, method: str, target: str, headers: dict[str, str],
               body: Any) -> tuple[int, Any, dict[str, str]]:
        if self.redirect_to:
            return 301, {}, {"Location": self.redirect_to + target}
        if self.fail_with and (self.fail_times is None or self.fail_times > 0):
            if self.fail_times is not None:
                self.fail_times -= 1
            return self.fail_with, {"message": "Internal Server Error"}, {}
        if not self._authorized(headers):
            return 401, {"message": "Bad credentials" if self.kind == "github" else "401 Unauthorized"}, {}
        path, _, query = target.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        return {"github": self._github, "gitea": self._gitea, "gitlab": self._gitlab}[self.kind](
            method, path, params, body) + ({},)

    def _authorized(self, headers: dict[str, str]) -> bool:
        lowered = {k.lower(): v for k, v in headers.items()}
        if self.kind == "github":
            return lowered.get("authorization") == f"Bearer {TOKEN}"
        if self.kind == "gitea":
            return lowered.get("authorization") == f"token {TOKEN}"
        return lowered.get("private-token") == TOKEN

    def _open(self, branch: str) -> dict[str, Any] | None:
        return next((p for p in self.pulls if p["head"] == branch and p["state"] == "open"), None)

    def _new(self, branch: str, base: str, title: str, body: str, draft: bool, web: str) -> dict[str, Any]:
        number = len(self.pulls) + 1
        pull = {"number": number, "head": branch, "base": base, "title": title, "body": body, "draft": draft,
                "state": "open", "url": f"http://forge.test/{self.repository}/{web}/{number}"}
        self.pulls.append(pull)
        return pull

    def _github(self, method: str, path: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
        base = f"/repos/{self.repository}/pulls"
        def view(p: dict[str, Any]) -> dict[str, Any]:
            return {"number": p["number"], "html_url": p["url"], "title": p["title"], "body": p["body"],
                    "draft": p["draft"], "head": {"ref": p["head"]}, "base": {"ref": p["base"]}}

        if path == base and method == "POST":
            if self._open(body["head"]):
                owner = self.repository.split("/")[0]
                return 422, {"message": "Validation Failed", "errors": [
                    {"resource": "PullRequest", "code": "custom",
                     "message": f"A pull request already exists for {owner}:{body['head']}."}]}
            if body["base"] == body["head"]:
                return 422, {"message": "Validation Failed", "errors": [
                    {"resource": "PullRequest", "code": "custom", "message": "No commits between main and main"}]}
            return 201, view(self._new(body["head"], body["base"], body["title"], body["body"],
                                       bool(body.get("draft")), "pull"))
        if path == base and method == "GET":
            owner, _, branch = params.get("head", "").partition(":")
            found = [p for p in self.pulls if p["head"] == branch and owner == self.repository.split("/")[0]
                     and p["state"] == params.get("state", "open")]
            return 200, [view(p) for p in found]
        if path.startswith(base + "/") and method == "PATCH":
            pull = self.pulls[int(path.rsplit("/", 1)[1]) - 1]
            pull.update({k: v for k, v in body.items() if k in ("title", "body")})
            return 200, view(pull)
        return 404, {"message": "Not Found", "documentation_url": "https://docs.github.com/rest"}

    def _gitea(self, method: str, path: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
        base = f"/api/v1/repos/{self.repository}/pulls"
        def view(p: dict[str, Any]) -> dict[str, Any]:
            return {"number": p["number"], "html_url": p["url"], "title": p["title"], "body": p["body"],
                    "state": p["state"], "head": {"ref": p["head"]}, "base": {"ref": p["base"]}}

        if path == base and method == "POST":
            existing = self._open(body["head"])
            if existing:
                return 409, {"message": f"pull request already exists for these targets [id: {existing['number']}, "
                                        f"issue_id: {existing['number']}, head_branch: {body['head']}, "
                                        f"base_branch: {body['base']}]", "url": ""}
            return 201, view(self._new(body["head"], body["base"], body["title"], body["body"], False, "pulls"))
        if path == base and method == "GET":
            page, limit = int(params.get("page", 1)), int(params.get("limit", 30))
            found = [p for p in self.pulls if p["state"] == "open"]
            return 200, [view(p) for p in found[(page - 1) * limit:page * limit]]
        if path.startswith(base + "/") and method == "PATCH":
            pull = self.pulls[int(path.rsplit("/", 1)[1]) - 1]
            pull.update({k: v for k, v in body.items() if k in ("title", "body")})
            return 201, view(pull)  # Gitea answers an edit with 201
        return 404, {"message": "The target couldn't be found.", "errors": []}

    def _gitlab(self, method: str, path: str, params: dict[str, str], body: Any) -> tuple[int, Any]:
        base = f"/api/v4/projects/{urllib.parse.quote(self.repository, safe='')}/merge_requests"
        def view(p: dict[str, Any]) -> dict[str, Any]:
            return {"iid": p["number"], "id": 1000 + p["number"], "web_url": p["url"], "title": p["title"],
                    "description": p["body"], "source_branch": p["head"], "target_branch": p["base"],
                    "state": "opened" if p["state"] == "open" else p["state"]}

        if path == base and method == "POST":
            existing = self._open(body["source_branch"])
            if existing:
                return 409, {"message": ["Another open merge request already exists for this source branch: "
                                         f"!{existing['number']}"]}
            return 201, view(self._new(body["source_branch"], body["target_branch"], body["title"],
                                       body["description"], body["title"].startswith("Draft: "), "-/merge_requests"))
        if path == base and method == "GET":
            found = [p for p in self.pulls if p["head"] == params.get("source_branch") and p["state"] == "open"
                     and params.get("state") == "opened"]
            return 200, [view(p) for p in found]
        if path.startswith(base + "/") and method == "PUT":
            pull = self.pulls[int(path.rsplit("/", 1)[1]) - 1]
            if "description" in body:
                pull["body"] = body["description"]
            if "title" in body:
                pull["title"] = body["title"]
            return 200, view(pull)
        return 404, {"message": "404 Project Not Found"}


@pytest.fixture(params=FORGES)
def forge(request: pytest.FixtureRequest) -> Iterator[StandInForge]:
    made = StandInForge(request.param)
    yield made
    made.close()


def pr(body: str = "first summary") -> PullRequest:
    return PullRequest(branch="taskrun/add-login", base="main", title="Add login", body=body)


def test_a_pull_request_is_created_for_a_new_branch(forge: StandInForge) -> None:
    opened = forge_for(forge.config(), TOKEN).open(pr())

    assert opened.created and opened.number == 1
    assert opened.url == forge.pulls[0]["url"]
    pull = forge.pulls[0]
    assert (pull["head"], pull["base"], pull["body"]) == ("taskrun/add-login", "main", "first summary")
    assert pull["draft"] if forge.kind != "gitea" else pull["title"].startswith("WIP: ")


def test_an_open_pull_request_is_updated_not_duplicated(forge: StandInForge) -> None:
    client = forge_for(forge.config(), TOKEN)
    first = client.open(pr("first summary"))

    second = client.open(pr("second summary"))

    assert not second.created and second.url == first.url and second.number == first.number
    assert len(forge.pulls) == 1 and forge.pulls[0]["body"] == "second summary"
    assert forge.pulls[0]["title"] == (first_title := forge.pulls[0]["title"]) and "Add login" in first_title


def test_draft_false_opens_a_ready_request(forge: StandInForge) -> None:
    forge_for(forge.config(draft=False), TOKEN).open(pr())

    assert forge.pulls[0]["title"] == "Add login" and not forge.pulls[0]["draft"]


def test_a_refused_token_names_the_variable_and_never_the_token(forge: StandInForge) -> None:
    with pytest.raises(ForgeError) as caught:
        forge_for(forge.config(), "wrong-" + TOKEN).open(pr())

    message = str(caught.value)
    assert "FORGE_TOKEN" in message and "401" in message and not caught.value.retry
    assert TOKEN not in message
    assert not forge.pulls


def test_an_unknown_repository_says_what_to_check(forge: StandInForge) -> None:
    with pytest.raises(ForgeError) as caught:
        forge_for(forge.config(repository="acme/nope"), TOKEN).open(pr())

    assert "404" in str(caught.value) and "acme/nope" in str(caught.value) and not caught.value.retry


def test_a_server_error_may_be_retried(forge: StandInForge) -> None:
    forge.fail_with = 502

    with pytest.raises(ForgeError) as caught:
        forge_for(forge.config(), TOKEN).open(pr())

    assert caught.value.retry and "502" in str(caught.value)


def test_a_forge_that_does_not_answer_times_out(forge: StandInForge) -> None:
    forge.hang = threading.Event()

    with pytest.raises(ForgeError) as caught:
        forge_for(forge.config(), TOKEN, timeout=0.3).open(pr())

    assert caught.value.retry and "cannot reach" in str(caught.value)


def test_an_unreachable_forge_may_be_retried() -> None:
    gone = StandInForge("github")
    config = gone.config()
    gone.close()

    with pytest.raises(ForgeError) as caught:
        forge_for(config, TOKEN).open(pr())

    assert caught.value.retry and "cannot reach" in str(caught.value)


def test_a_redirect_is_refused_and_the_token_never_follows_it() -> None:
    elsewhere = StandInForge("github")
    forge = StandInForge("github", redirect_to=f"http://127.0.0.1:{elsewhere.server.server_address[1]}")
    try:
        with pytest.raises(ForgeError) as caught:
            forge_for(forge.config(), TOKEN).open(pr())
    finally:
        forge.close()
        elsewhere.close()

    assert "redirect" in str(caught.value) and "api_url" in str(caught.value)
    assert not elsewhere.seen


def test_github_validation_errors_are_reported_in_its_words() -> None:
    forge = StandInForge("github")
    try:
        with pytest.raises(ForgeError) as caught:
            forge_for(forge.config(), TOKEN).open(PullRequest("main", "main", "t", "b"))
    finally:
        forge.close()

    assert "422" in str(caught.value) and "No commits between" in str(caught.value)


def test_the_gitlab_project_path_is_one_encoded_segment() -> None:
    forge = StandInForge("gitlab", repository="group/sub/project")
    try:
        forge_for(forge.config(), TOKEN).open(pr())
    finally:
        forge.close()

    assert forge.seen[0].path == "/api/v4/projects/group%2Fsub%2Fproject/merge_requests"


def test_gitea_finds_the_open_request_beyond_the_first_page() -> None:
    forge = StandInForge("gitea")
    try:
        client = forge_for(forge.config(), TOKEN)
        for n in range(60):
            client.open(PullRequest(f"taskrun/other-{n}", "main", "t", "b"))
        client.open(pr("first"))

        again = client.open(pr("second"))
    finally:
        forge.close()

    assert not again.created and again.number == 61 and forge.pulls[60]["body"] == "second"
    assert len(forge.pulls) == 61


def test_a_missing_token_variable_is_named() -> None:
    config = PullRequestConfig("github", "https://api.github.com", "acme/widgets", "FORGE_TOKEN")

    with pytest.raises(ForgeError) as caught:
        token_from_env(config, {})

    assert "FORGE_TOKEN" in str(caught.value) and "not set" in str(caught.value)
    assert token_from_env(config, {"FORGE_TOKEN": TOKEN}) == TOKEN
