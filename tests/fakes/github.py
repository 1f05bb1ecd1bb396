"""A local stand-in for a slice of GitHub's REST API: the user, a repository, creating issues.

Credentials are ``Authorization: Bearer TOKEN`` or the older ``Authorization: token TOKEN``;
a request without one is answered 401 ``Requires authentication``, one with a wrong one 401
``Bad credentials``, both in GitHub's ``{"message", "documentation_url", "status"}`` shape.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from tests.fakes.base import FakeService, RecordedRequest, Response, parse_json_object

DOCS = "https://docs.github.com/rest"


def github_error(status: int, message: str, docs: str = DOCS, **extra: Any) -> Response:
    """An error in GitHub's shape."""
    return Response.json(
        {"message": message, **extra, "documentation_url": docs, "status": str(status)}, status
    )


class FakeGitHub(FakeService):
    """``GET /user``, ``GET /repos/{owner}/{repo}``, ``POST /repos/{owner}/{repo}/issues``.

    ``FakeGitHub(token=None, *, login="octocat", user_id=1, repos=None, host, port, delay)``:
    ``repos`` lists the ``owner/name`` that exist (None: every one does). Created issues are
    kept in ``issues`` (``{"owner/name": [issue, ...]}``).
    """

    server_name = "fake-github"
    auth_scheme_aliases: ClassVar[Mapping[str, str]] = {"token": "bearer"}

    def __init__(
        self,
        token: str | None = None,
        *,
        login: str = "octocat",
        user_id: int = 1,
        repos: Iterable[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
    ) -> None:
        super().__init__(host, port, delay=delay)
        self.token = token
        self.login = login
        self.user_id = user_id
        self.repos = None if repos is None else {r.lower() for r in repos}
        self.issues: dict[str, list[dict[str, Any]]] = {}
        self._issue_ids = itertools.count(1_000_001)
        if token is not None:
            self.expect_auth("Authorization", f"Bearer {token}")
        self.add_route("GET", "/user", self.get_user)
        self.add_route("GET", "/repos/{owner}/{repo}", self.get_repo)
        self.add_route("POST", "/repos/{owner}/{repo}/issues", self.create_issue)

    def _headers(self) -> dict[str, str]:
        return {
            "X-GitHub-Media-Type": "github.v3; format=json",
            "X-GitHub-Api-Version-Selected": "2022-11-28",
            "X-RateLimit-Limit": "5000",
            "X-RateLimit-Remaining": "4999",
        }

    def _user(self, login: str, user_id: int) -> dict[str, Any]:
        return {
            "login": login,
            "id": user_id,
            "node_id": f"U_fake{user_id}",
            "type": "User",
            "site_admin": False,
            "url": f"{self.url}/users/{login}",
            "html_url": f"https://github.com/{login}",
        }

    # Error shapes --------------------------------------------------------------------------

    def auth_error(self, request: RecordedRequest) -> Response:
        if "authorization" not in request.headers:
            return github_error(401, "Requires authentication")
        return github_error(401, "Bad credentials")

    def not_found(self, request: RecordedRequest) -> Response:
        return github_error(404, "Not Found")

    def method_not_allowed(self, request: RecordedRequest) -> Response:
        return github_error(404, "Not Found")

    def bad_request(self, message: str) -> Response:
        return github_error(400, message)

    # Endpoints -----------------------------------------------------------------------------

    def get_user(self, request: RecordedRequest) -> Response:
        return Response.json(
            {**self._user(self.login, self.user_id), "name": self.login.title()},
            headers=self._headers(),
        )

    def _repo(self, owner: str, repo: str) -> dict[str, Any] | None:
        full_name = f"{owner}/{repo}"
        if self.repos is not None and full_name.lower() not in self.repos:
            return None
        repo_id = zlib.crc32(full_name.lower().encode()) % 900_000_000 + 100_000_000
        return {
            "id": repo_id,
            "node_id": f"R_fake{repo_id}",
            "name": repo,
            "full_name": full_name,
            "private": False,
            "owner": self._user(owner, zlib.crc32(owner.lower().encode()) % 10_000_000),
            "html_url": f"https://github.com/{full_name}",
            "url": f"{self.url}/repos/{full_name}",
            "default_branch": "main",
            "has_issues": True,
            "open_issues_count": len(self.issues.get(full_name.lower(), [])),
        }

    def get_repo(self, request: RecordedRequest, owner: str, repo: str) -> Response:
        found = self._repo(owner, repo)
        if found is None:
            return github_error(404, "Not Found", f"{DOCS}/repos/repos#get-a-repository")
        return Response.json(found, headers=self._headers())

    def create_issue(self, request: RecordedRequest, owner: str, repo: str) -> Response:
        found = self._repo(owner, repo)
        if found is None:
            return github_error(404, "Not Found", f"{DOCS}/issues/issues#create-an-issue")
        body = parse_json_object(request)
        if body is None:
            return github_error(400, "Problems parsing JSON")
        title = body.get("title")
        if title is None or title == "":
            return github_error(
                422,
                "Validation Failed",
                f"{DOCS}/issues/issues#create-an-issue",
                errors=[{"resource": "Issue", "code": "missing_field", "field": "title"}],
            )
        full_name = str(found["full_name"])
        with self._lock:
            existing = self.issues.setdefault(full_name.lower(), [])
            number = len(existing) + 1
            issue_id = next(self._issue_ids)
            issue = {
                "id": issue_id,
                "node_id": f"I_fake{issue_id}",
                "number": number,
                "title": str(title),
                "body": body.get("body"),
                "state": "open",
                "labels": [{"name": str(name)} for name in body.get("labels") or []],
                "assignees": [],
                "user": self._user(self.login, self.user_id),
                "url": f"{self.url}/repos/{full_name}/issues/{number}",
                "html_url": f"https://github.com/{full_name}/issues/{number}",
                "comments": 0,
            }
            existing.append(issue)
        return Response.json(issue, 201, {**self._headers(), "Location": str(issue["url"])})
