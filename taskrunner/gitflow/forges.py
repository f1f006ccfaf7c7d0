"""Pull / merge requests on a forge's web API: open one for a branch, or update the one that is open.

    ForgeError           (TaskrunError) the forge cannot be reached, refused the token, or answered otherwise
                         than its API documents; `retry` says whether trying later may help

Each forge, as its API documents it (the stand-in server of
tests/unit/test_forges.py answers the same way):

- GitHub (REST v3, docs.github.com/rest/pulls): `POST /repos/{owner}/{repo}/pulls`
  {title, head, base, body, draft} -> 201 {number, html_url}. When one is open
  for the branch: 422 with an error "A pull request already exists for
  owner:branch." -> `GET /repos/{o}/{r}/pulls?head={owner}:{branch}&state=open`
  -> `PATCH /repos/{o}/{r}/pulls/{number}` {body}.
  Token: `Authorization: Bearer`.
- Gitea / Forgejo (api/v1, swagger): `POST /repos/{owner}/{repo}/pulls`
  {title, head, base, body} -> 201 {number, html_url}; draft is the "WIP: "
  title prefix (both forges' default work-in-progress prefix). When one is
  open: 409 -> the open pulls are listed (`GET .../pulls?state=open`, paged)
  and the one whose head ref is the branch is updated with `PATCH
  /repos/{o}/{r}/pulls/{index}` {body}. Token: `Authorization: token`.
- GitLab (REST v4, docs.gitlab.com/api/merge_requests):
  `POST /projects/{url-encoded path}/merge_requests` {source_branch,
  target_branch, title, description} -> 201 {iid, web_url}; draft is the
  "Draft: " title prefix. When one is open: 409 "Another open merge request
  already exists for this source branch" -> `GET .../merge_requests?
  source_branch=..&target_branch=..&state=opened` -> `PUT .../merge_requests/{iid}`
  {description}. Token: `PRIVATE-TOKEN`.

An update changes the body (description) only: a title a person edited, or
a draft a person marked ready, stays as they left it.

The token comes from the daemon's environment (`token_env`); it is sent in a
header only, never put in a message, and a redirect is refused rather than
followed (urllib would send the token on to wherever it points). Every call
has a timeout and an answer is read up to MAX_ANSWER_BYTES.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from taskrunner.config import PullRequestConfig
from taskrunner.errors import TaskrunError
from taskrunner.textsafe import clean

#: Seconds a call to a forge may take (connect, and each read).
TIMEOUT_SECONDS = 30.0
#: The most of an answer read; a forge's JSON for one request, or one page of them, is far smaller.
MAX_ANSWER_BYTES = 4 * 1024 * 1024
#: Open pulls listed per page when Gitea / Forgejo are searched for the branch's, and the most pages read.
PAGE_SIZE = 50
MAX_PAGES = 20
#: The title prefixes that make a draft where the API has no draft flag.
GITEA_DRAFT = "WIP: "
GITLAB_DRAFT = "Draft: "
USER_AGENT = "taskrun"


class ForgeError(TaskrunError):
    """Raised when a pull / merge request cannot be opened or updated; the message says what to do.

    `retry`: True when the same call may succeed later (unreachable, timed
    out, a 5xx or 429 answer), False when something must change first.
    """

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class PullRequest:
    """What to open: `branch` (already on the forge) into `base`, with `title` and `body` (markdown)."""

    branch: str
    base: str
    title: str
    body: str


@dataclass(frozen=True)
class Opened:
    """The pull / merge request for the branch: its web URL, its number, and whether this call created it."""

    url: str
    number: int
    created: bool


@dataclass(frozen=True)
class Answer:
    status: int
    data: Any


#: How a call reaches the forge: (method, url, headers, body bytes or None, timeout) -> Answer.
Transport = Callable[[str, str, Mapping[str, str], "bytes | None", float], Answer]


def token_from_env(config: PullRequestConfig, environ: Mapping[str, str] | None = None) -> str:
    """The API token from the daemon's environment variable `token_env`; ForgeError naming it when unset."""
    value = (os.environ if environ is None else environ).get(config.token_env, "")
    if not value.strip():
        raise ForgeError(f"git.pull_requests.token_env: the environment variable {config.token_env} is not set "
                         f"in the daemon's environment; export it (a {config.forge} token that may open pull "
                         "requests) before `taskrun up`")
    return value.strip()


def forge_for(config: PullRequestConfig, token: str, transport: Transport | None = None,
              timeout: float = TIMEOUT_SECONDS) -> Forge:
    """The client for `config.forge`."""
    kind = {"github": GitHub, "gitea": Gitea, "gitlab": GitLab}[config.forge]
    return kind(config, token, transport or urllib_transport, timeout)


class Forge:
    """One forge's pull request API; `open` is the one call (see the module doc for each forge's requests)."""

    name = "forge"
    #: The keys of a pull request's web URL and number in the API's JSON.
    url_key = "html_url"
    number_key = "number"

    def __init__(self, config: PullRequestConfig, token: str, transport: Transport,
                 timeout: float = TIMEOUT_SECONDS) -> None:
        self.config = config
        self._token = token
        self._transport = transport
        self._timeout = timeout

    def open(self, request: PullRequest) -> Opened:
        """Open a pull request for `request.branch`, or update the body of the one open; ForgeError."""
        raise NotImplementedError

    # -- HTTP ------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        raise NotImplementedError

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None,
              query: Mapping[str, str | int] | None = None) -> Answer:
        url = self.config.api_url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT, **self._auth()}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            answer = self._transport(method, url, headers, data, self._timeout)
        except ForgeError as exc:
            raise ForgeError(self._scrub(f"{method} {self._shown(url)}: {exc}"), exc.retry) from None
        if answer.status == 403 and "rate limit" in self._detail(answer).lower():  # GitHub's rate limits answer 403
            raise ForgeError(f"{self.name} rate-limits the token (HTTP 403{self._detail(answer)}); will try again "
                             "later", retry=True)
        if answer.status in (401, 403):
            raise ForgeError(f"{self.name} refused the token in {self.config.token_env} (HTTP {answer.status} on "
                             f"{method} {self._shown(url)}{self._detail(answer)}): give it the right to open pull "
                             f"requests in {self.config.repository}, or replace it")
        if answer.status == 404:
            raise ForgeError(f"{self.name} knows no {self._shown(url)} (HTTP 404{self._detail(answer)}): check "
                             f"git.pull_requests.api_url and repository ('{self.config.repository}'), and that "
                             f"the token in {self.config.token_env} can see the repository")
        if answer.status == 429 or answer.status >= 500:
            raise ForgeError(f"{self.name} answered HTTP {answer.status} to {method} {self._shown(url)}"
                             f"{self._detail(answer)}; will try again later", retry=True)
        return answer

    def _opened(self, data: Any, created: bool) -> Opened:
        """The request a created or found pull request's JSON describes; ForgeError when it lacks URL or number."""
        url, number = (data.get(self.url_key), data.get(self.number_key)) if isinstance(data, dict) else (None, None)
        if not isinstance(url, str) or not isinstance(number, int) or isinstance(number, bool):
            raise ForgeError(f"{self.name}'s answer has no '{self.url_key}' and '{self.number_key}': is "
                             "git.pull_requests.api_url the API's address?")
        return Opened(url, number, created)

    def _unexpected(self, method: str, path: str, answer: Answer) -> ForgeError:
        return ForgeError(f"{self.name} answered HTTP {answer.status} to {method} {path}{self._detail(answer)}")

    def _detail(self, answer: Answer) -> str:
        """The forge's own words from an error answer, cleaned and short (it may quote what was sent)."""
        data = answer.data
        message: object = ""
        if isinstance(data, dict):
            message = data.get("message") or data.get("error") or ""
            errors = data.get("errors")
            if isinstance(errors, list) and errors:
                message = f"{message}: " + "; ".join(str(e.get("message", e) if isinstance(e, dict) else e)
                                                     for e in errors[:3])
        elif isinstance(data, str):
            message = data
        text = self._scrub(clean(str(message)))[:300].strip()
        return f": {text}" if text else ""

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _shown(self, url: str) -> str:
        return url.split("?", 1)[0]


class GitHub(Forge):
    name = "GitHub"

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28"}

    def open(self, request: PullRequest) -> Opened:
        base = f"/repos/{_path(self.config.repository)}/pulls"
        answer = self._call("POST", base, {"title": request.title, "head": request.branch, "base": request.base,
                                           "body": request.body, "draft": self.config.draft})
        if answer.status == 201:
            return self._opened(answer.data, True)
        if answer.status != 422 or "already exists" not in json.dumps(answer.data):
            raise self._unexpected("POST", base, answer)
        owner = self.config.repository.split("/", 1)[0]
        found = self._call("GET", base, query={"head": f"{owner}:{request.branch}", "state": "open"})
        if found.status != 200 or not isinstance(found.data, list) or not found.data:
            raise ForgeError(f"GitHub says a pull request for {request.branch} exists, but lists none open for "
                             f"{owner}:{request.branch}{self._detail(found)}")
        number = self._opened(found.data[0], False).number
        updated = self._call("PATCH", f"{base}/{number}", {"body": request.body})
        if updated.status != 200:
            raise self._unexpected("PATCH", f"{base}/{number}", updated)
        return self._opened(updated.data, False)


class Gitea(Forge):
    """Gitea and Forgejo (Forgejo keeps Gitea's API)."""

    name = "Gitea"

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self._token}"}

    def open(self, request: PullRequest) -> Opened:
        base = f"/repos/{_path(self.config.repository)}/pulls"
        title = GITEA_DRAFT + request.title if self.config.draft else request.title
        answer = self._call("POST", base, {"title": title, "head": request.branch, "base": request.base,
                                           "body": request.body})
        if answer.status == 201:
            return self._opened(answer.data, True)
        if answer.status != 409:
            raise self._unexpected("POST", base, answer)
        number = self._find(base, request)
        updated = self._call("PATCH", f"{base}/{number}", {"body": request.body})
        if updated.status not in (200, 201):
            raise self._unexpected("PATCH", f"{base}/{number}", updated)
        return self._opened(updated.data, False)

    def _find(self, base: str, request: PullRequest) -> int:
        """The number of the open pull from `request.branch` (the API lists, it does not filter by head)."""
        for page in range(1, MAX_PAGES + 1):
            found = self._call("GET", base, query={"state": "open", "page": page, "limit": PAGE_SIZE})
            if found.status != 200 or not isinstance(found.data, list):
                raise self._unexpected("GET", base, found)
            for pull in found.data:
                head = pull.get("head") if isinstance(pull, dict) else None
                if isinstance(head, dict) and head.get("ref") == request.branch:
                    return self._opened(pull, False).number
            if len(found.data) < PAGE_SIZE:
                break
        raise ForgeError(f"Gitea says a pull request for {request.branch} exists, but none open has it as head")


class GitLab(Forge):
    name = "GitLab"
    url_key = "web_url"
    number_key = "iid"

    def _auth(self) -> dict[str, str]:
        return {"PRIVATE-TOKEN": self._token}

    def open(self, request: PullRequest) -> Opened:
        base = f"/projects/{urllib.parse.quote(self.config.repository, safe='')}/merge_requests"
        title = GITLAB_DRAFT + request.title if self.config.draft else request.title
        answer = self._call("POST", base, {"source_branch": request.branch, "target_branch": request.base,
                                           "title": title, "description": request.body})
        if answer.status == 201:
            return self._opened(answer.data, True)
        if answer.status != 409:
            raise self._unexpected("POST", base, answer)
        found = self._call("GET", base, query={"source_branch": request.branch, "target_branch": request.base,
                                               "state": "opened"})
        if found.status != 200 or not isinstance(found.data, list) or not found.data:
            raise ForgeError(f"GitLab says a merge request for {request.branch} exists, but lists none open"
                             f"{self._detail(found)}")
        iid = self._opened(found.data[0], False).number
        updated = self._call("PUT", f"{base}/{iid}", {"description": request.body})
        if updated.status != 200:
            raise self._unexpected("PUT", f"{base}/{iid}", updated)
        return self._opened(updated.data, False)


def _path(repository: str) -> str:
    """`owner/name` as two escaped path segments."""
    owner, _, name = repository.partition("/")
    if not owner or not name or "/" in name:
        raise ForgeError(f"git.pull_requests.repository: expected owner/name, got '{repository}'")
    return f"{urllib.parse.quote(owner, safe='')}/{urllib.parse.quote(name, safe='')}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        fp.close()
        raise ForgeError(f"the forge redirects (HTTP {code}) to {newurl.split('?', 1)[0]}; set git.pull_requests."
                         "api_url to the API's own address (redirects are not followed: they would carry the token)")


_OPENER = urllib.request.build_opener(_NoRedirect())


def urllib_transport(method: str, url: str, headers: Mapping[str, str], body: bytes | None,
                     timeout: float) -> Answer:
    """The real transport: one HTTP(S) request with urllib; ForgeError(retry=True) when the forge cannot be reached."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Answer(response.status, _json(response.read(MAX_ANSWER_BYTES)))
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, _json(exc.read(MAX_ANSWER_BYTES)))
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ForgeError(f"cannot reach the forge: {reason}; check git.pull_requests.api_url and the network "
                         "(will try again later)", retry=True) from None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return raw[:300].decode("utf-8", errors="replace")
