"""The agents of ``test_bridge``, copied into the environment as ``/home/user/agent.py``.

Nothing here runs on the host: each function is an entrypoint (``agent.py:<name>``) that runs
inside a real sandbox, on the sandbox's own Python, with the official ``openai`` and
``anthropic`` SDKs installed in the environment. Each returns what it observed, as JSON.

``call`` talks to the bridge with exactly the token it is given (or none), so an agent can
present a forged, stolen or tampered token. ``scan`` looks for regular expressions in
everything the sandbox can read: its environment, every readable ``/proc/*/environ`` and
``cmdline``, every readable file (bounded), the memory of every process it may read (through
``/proc/<pid>/mem``), and every string and bytes object alive in its own Python.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

OWN = "<own>"  # as a token: this run's own
JWT = r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{20,}"
# A marker only this file holds: the file scan must find it here (its control).
FS_CANARY = "CORRAL-FS-CANARY-424242"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping the bridge"}]}

PER_FILE = 8 << 20  # bytes read from one file
ALL_FILES = 768 << 20  # bytes read from files in all
ALL_MEMORY = 1536 << 20  # bytes read from process memory in all
CHUNK = 16 << 20
OVERLAP = 4096  # a match across two chunks is still seen whole


def _sdk() -> Any:
    from corral_runner import sdk

    return sdk


def gateway() -> str:
    return str(urllib.parse.urlsplit(_sdk().bridge_url()).hostname)


def my_address() -> str:
    """This sandbox's address (a UDP connect sends nothing; it only picks the source)."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.connect((gateway(), 9))
        return str(u.getsockname()[0])
    finally:
        u.close()


def call(
    connection: str,
    path: str,
    token: str | None = OWN,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """One request to the bridge; ``token`` None sends no credential at all."""
    sdk = _sdk()
    sent = dict(headers or {})
    if token == OWN:
        token = sdk.token()
    if token is not None:
        sent["authorization"] = "Bearer " + token
    data = body
    if isinstance(body, dict | list):
        data = json.dumps(body).encode()
        sent.setdefault("content-type", "application/json")
    request = urllib.request.Request(
        sdk.bridge_url(connection) + path, data=data, method=method, headers=sent
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as refusal:
        status, raw = refusal.code, refusal.read()
    except (urllib.error.URLError, OSError) as exc:
        return {"status": None, "failure": repr(exc), "seconds": _since(started)}
    try:
        payload: Any = json.loads(raw)
    except ValueError:
        payload = raw.decode("utf-8", "replace")[:4000]
    error = payload.get("error") if isinstance(payload, dict) else None
    return {"status": status, "error": error, "body": payload, "seconds": _since(started)}


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)


def hook(name: str, **args: Any) -> Any:
    """Ask the host's test control service (connection ``ctl``) to do something."""
    answer = call("ctl", "/hook/" + name, method="POST", body=args)
    if answer["status"] != 200:
        raise RuntimeError(f"hook {name} failed: {answer}")
    return answer["body"]["answer"]


# -- looking for secrets ---------------------------------------------------------------------


class _Finder:
    def __init__(self, patterns: list[str], limit: int = 64) -> None:
        self.regexes = {p: re.compile(p.encode()) for p in patterns}
        self.found: dict[str, dict[str, set[str]]] = {p: {} for p in patterns}
        self.limit = limit

    def look(self, where: str, data: bytes) -> None:
        for pattern, regex in self.regexes.items():
            hits = self.found[pattern]
            for match in regex.finditer(data):
                text = match.group().decode("latin-1")
                if text in hits or len(hits) < self.limit:
                    places = hits.setdefault(text, set())
                    if len(places) < 16:
                        places.add(where)

    def report(self) -> dict[str, dict[str, list[str]]]:
        return {p: {m: sorted(w) for m, w in hits.items()} for p, hits in self.found.items()}


def _pids() -> list[str]:
    return sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)


def _scan_environ(finder: _Finder, stats: dict[str, Any]) -> None:
    finder.look("environ", b"\n".join(k + b"=" + v for k, v in os.environb.items()))
    readable = []
    for pid in _pids():
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            finder.look(f"proc:{pid}:{name}", data)
            readable.append(f"{pid}:{name}")
    stats["proc_files"] = readable


def _scan_files(finder: _Finder, stats: dict[str, Any]) -> None:
    files = total = 0
    capped = False
    for top, dirs, names in os.walk("/", onerror=lambda _: None):
        if top == "/":
            dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
        for name in names:
            path = os.path.join(top, name)
            try:
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                with open(path, "rb") as f:
                    data = f.read(PER_FILE)
            except OSError:
                continue
            files += 1
            total += len(data)
            finder.look("file:" + path, data)
            if total >= ALL_FILES:
                capped = True
                break
        if capped:
            break
    stats.update(files=files, file_bytes=total, files_capped=capped)


def _scan_memory(finder: _Finder, stats: dict[str, Any]) -> None:
    total = 0
    readable: list[str] = []
    refused: list[str] = []
    for pid in ["self", *_pids()]:
        if pid != "self" and int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read().splitlines()
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError as exc:
            refused.append(f"{pid}:{type(exc).__name__}")
            continue
        where = "memory:" + ("self" if pid == "self" else pid)
        read_any = False
        try:
            for line in maps:
                fields = line.split()
                if len(fields) < 2 or "r" not in fields[1]:
                    continue
                if len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                at = start
                while at < end and total < ALL_MEMORY:
                    size = min(CHUNK + OVERLAP, end - at)
                    try:
                        data = os.pread(fd, size, at)
                    except OSError:
                        break
                    if not data:
                        break
                    read_any = True
                    total += len(data)
                    finder.look(where, data)
                    at += CHUNK
        finally:
            os.close(fd)
        (readable if read_any else refused).append(pid)
    stats.update(memory_bytes=total, memory_readable=readable, memory_refused=refused)


def _scan_python(finder: _Finder, stats: dict[str, Any]) -> None:
    """Every str and bytes object reachable from a tracked container (module globals too)."""
    seen: set[int] = set()
    parts: list[bytes] = []
    for obj in gc.get_objects():
        for ref in gc.get_referents(obj):
            kind = type(ref)
            if kind in (str, bytes, bytearray) and id(ref) not in seen:
                seen.add(id(ref))
                parts.append(ref.encode("utf-8", "backslashreplace") if kind is str else bytes(ref))
    finder.look("python", b"\n".join(parts))
    stats["python_objects"] = len(parts)


def scan(patterns: list[str], files: bool = True) -> dict[str, Any]:
    finder = _Finder(patterns)
    stats: dict[str, Any] = {}
    started = time.monotonic()
    _scan_environ(finder, stats)
    if files:
        _scan_files(finder, stats)
    _scan_python(finder, stats)
    _scan_memory(finder, stats)
    stats["seconds"] = _since(started)
    return {"found": finder.report(), "stats": stats}


# -- the agents ------------------------------------------------------------------------------


def chatty(input: Any) -> Any:
    sdk = _sdk()
    sdk.log("chatty says hello", n=3, tag=input.get("tag"))
    return {"said": "hello", "token": sdk.token(), "tag": input.get("tag")}


def snoop(input: Any) -> Any:
    """Use the credential (through the bridge), then look for it everywhere."""
    global DECOY, REFLECTED
    DECOY = input["decoy"]
    used = call("openai", "/v1/chat/completions", method="POST", body=CHAT)
    # An upstream that reflects every request header back: the bridge must redact it.
    REFLECTED = call("echo", "/echo/reflect", method="POST", body={"hello": "echo"})
    found = scan([input["secret_pattern"], JWT, FS_CANARY, r"PATH=[^\x00\n]{1,200}"])
    reflected = REFLECTED["body"]
    return {
        "used": used["status"],
        "reflected_status": REFLECTED["status"],
        "reflected_headers": reflected.get("headers") if isinstance(reflected, dict) else None,
        "token": _sdk().token(),
        **found,
    }


REFLECTED: Any = None
DECOY = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def knock(input: Any) -> Any:
    """Present every kind of bad token; the host minted some of them with this run's claims."""
    sdk = _sdk()
    own = sdk.token()
    header, payload, signature = own.split(".")
    minted = hook("mint", run=sdk.context()["run_id"], address=my_address())
    claims = json.loads(_unb64(payload))
    claims.update(sub="someone-else", con=["*"])
    tampered = ".".join((header, _b64(json.dumps(claims).encode()), signature))
    alg_none = ".".join((_b64(json.dumps({"alg": "none", "typ": "JWT"}).encode()), payload, ""))
    cases = {
        "control": ("openai", own),
        "no_token": ("openai", None),
        "garbage": ("openai", "not-a-token"),
        "forged_unknown_key": ("openai", minted["unknown_key"]),
        "forged_known_kid": ("openai", minted["known_kid"]),
        "tampered": ("openai", tampered),
        "alg_none": ("openai", alg_none),
        "expired": ("openai", minted["expired"]),
        "revoked": ("openai", input["finished_token"]),
        "out_of_scope": ("github", own),
        "no_credential": ("slack", own),
    }
    out = {}
    for name, (connection, token) in cases.items():
        path = "/v1/chat/completions" if connection == "openai" else "/anything"
        out[name] = call(connection, path, token, method="POST", body=CHAT)
    return {"calls": out, "address": my_address(), "claims": json.loads(_unb64(payload))}


def hold(input: Any) -> Any:
    """Hand the host this run's token, wait to be released, then use the token itself."""
    sdk = _sdk()
    hook("handover", token=sdk.token(), address=my_address())
    deadline = time.monotonic() + float(input.get("hold", 30))
    released = False
    while not released and time.monotonic() < deadline:
        released = bool(hook("released"))
        if not released:
            time.sleep(0.1)
    own = call("openai", "/v1/chat/completions", method="POST", body=CHAT)
    return {"released": released, "own": own, "address": my_address()}


def borrow(input: Any) -> Any:
    """Use another live sandbox's token, then this run's own."""
    stolen = call("openai", "/v1/chat/completions", input["token"], method="POST", body=CHAT)
    own = call("openai", "/v1/chat/completions", method="POST", body=CHAT)
    return {"stolen": stolen, "own": own, "address": my_address()}


def sdks(input: Any) -> Any:
    """The official SDKs, unchanged, pointed at the bridge with the run token as their key."""
    import anthropic
    import openai
    from anthropic.types import TextBlock

    sdk = _sdk()
    prompt = input["prompt"]
    out: dict[str, Any] = {"versions": [openai.__version__, anthropic.__version__]}
    oai = openai.OpenAI(
        base_url=sdk.bridge_url("openai") + "/v1", api_key=sdk.token(), max_retries=0, timeout=20
    )
    done = oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
    )
    # What the SDK parsed, as it is: a missing part shows as None and fails on the host.
    out["openai"] = {
        "text": done.choices[0].message.content,
        "usage": None
        if done.usage is None
        else [done.usage.prompt_tokens, done.usage.completion_tokens],
    }
    pieces: list[str] = []
    usage: list[int] | None = None
    stream = oai.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": prompt + " streamed"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
    out["openai_stream"] = {"text": "".join(pieces), "usage": usage, "chunks": len(pieces)}

    ant = anthropic.Anthropic(
        base_url=sdk.bridge_url("anthropic"), api_key=sdk.token(), max_retries=0, timeout=20
    )
    message = ant.messages.create(
        model="claude-haiku-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": prompt + " to claude"}],
    )
    out["anthropic"] = {
        "text": "".join(b.text for b in message.content if isinstance(b, TextBlock)),
        "usage": [message.usage.input_tokens, message.usage.output_tokens],
    }
    with ant.messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": prompt + " streamed to claude"}],
    ) as streamed:
        texts = list(streamed.text_stream)
        final = streamed.get_final_message()
    out["anthropic_stream"] = {
        "text": "".join(texts),
        "usage": [final.usage.input_tokens, final.usage.output_tokens],
        "chunks": len(texts),
    }
    out["token"] = sdk.token()
    out.update(scan([input["secret_pattern"], JWT], files=False))
    return out


def oauth(input: Any) -> Any:
    """Call an OAuth 2 API twice; between the calls the host expires the access token."""
    connection = input["connection"]
    first = call(connection, "/v1/data")
    hook("expire")
    second = call(connection, "/v1/data")
    return {
        "first": first,
        "second": second,
        "token": _sdk().token(),
        **scan([input["token_pattern"], JWT], files=False),
    }


def bad(input: Any) -> Any:
    out: dict[str, Any] = {}
    out["unknown"] = call(input["unknown"], "/v1/chat/completions", method="POST", body=CHAT)
    hook("upstream_timeout", seconds=1.0)
    try:
        out["timeout"] = call("slow", "/delay/4")
    finally:
        hook("restore")
    out["reset"] = call("slow", "/reset", method="POST", body={"x": 1})
    hook("max_body", bytes=4096)
    try:
        out["too_big"] = call(
            "slow",
            "/echo/big",
            method="POST",
            body=b"x" * 8000,
            headers={"content-type": "application/octet-stream"},
        )
    finally:
        hook("restore")
    out["github"] = call("github", "/user")
    out["slack"] = call(
        "slack",
        "/api/chat.postMessage",
        method="POST",
        body={"channel": "#general", "text": "through the bridge"},
    )
    out["after"] = call("slow", "/echo/after", method="POST", body=b"z" * 8000)
    return out


def oversize(input: Any) -> Any:
    """Bodies far over the bridge's limit (64 MiB against 4 KiB), sized and chunked: the
    bridge refuses them at once; the question is whether the sandbox gets to read why."""
    out: dict[str, Any] = {}
    size = int(input["size"])
    hook("max_body", bytes=4096)
    try:
        out["sized"] = call(
            "slow",
            "/echo/sized",
            method="POST",
            body=b"x" * size,
            headers={"content-type": "application/octet-stream"},
        )
        out["chunked"] = call(
            "slow",
            "/echo/chunked",
            method="POST",
            body=iter([b"y" * 16384] * (size // 16384)),
            headers={"content-type": "application/octet-stream"},
        )
    finally:
        hook("restore")
    out["after"] = call("slow", "/echo/after", method="POST", body=b"z" * 8000)
    return out


def smuggle(input: Any) -> Any:
    """Raw bytes to the bridge: a GET whose chunked body is the start of another request, in
    the hope that the upstream reads it as one and the next caller's request becomes its body."""
    sdk = _sdk()
    inner = input["inner"].encode()
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner)
    head = (
        "GET /slow/echo/smuggler HTTP/1.1\r\nhost: bridge\r\n"
        f"authorization: Bearer {sdk.token()}\r\ntransfer-encoding: chunked\r\n\r\n"
    ).encode()
    port = int(urllib.parse.urlsplit(sdk.bridge_url()).port or 80)
    with socket.create_connection((gateway(), port), timeout=10) as s:
        s.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
    return {"status": int(answer.split(b" ", 2)[1])}


def fetch(input: Any) -> Any:
    """An ordinary call of the echo upstream (the victim's, or the attacker's read-back)."""
    return call("slow", input["path"])
